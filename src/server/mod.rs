//! The daemon (`hall serve`).

use crate::cli::{CliResult, ServeArgs};

/// Run the daemon until SIGTERM/SIGINT.
pub fn run(_args: ServeArgs) -> CliResult {
    Err("the daemon is not built yet".into())
}
