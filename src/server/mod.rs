//! (filled in by the engine/daemon work)

pub mod guard;
