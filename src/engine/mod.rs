//! The pure decision core: no I/O, no clock, no randomness.
//!
//! [`Snapshot`] is an immutable, compiled policy set (built by [`crate::load`]);
//! [`decide`] answers one [`Request`] against it. Everything that touches disks,
//! sockets or time lives outside this module, so the engine is cheap to test,
//! to fuzz and to share between `hall serve`, `hall test` and `hall route --offline`.

mod decide;
mod lint;
mod model;
mod snapshot;

pub use decide::decide;
pub use lint::{lint, Diagnostic, Severity};
pub use model::*;
pub use snapshot::*;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
