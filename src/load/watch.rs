//! Hot reload (written with the daemon).
