//! (filled in by the engine/daemon work)
