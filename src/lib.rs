//! Hall: a local policy router for AI agents.
//!
//! The crate is a pure decision core wrapped in a thin shell:
//! - [`engine`]: the pure core. `decide(&Snapshot, &Request)`; no I/O, no clock.
//! - [`load`]: files on disk -> validated [`engine::Snapshot`], with `file:line:col` errors.
//! - [`store`]: sled-backed state: the audit log, tokens, secrets.
//! - [`server`]: the actix-web daemon (`hall serve`).
//! - [`cli`]: the `hall` command line (offline commands and thin HTTP clients).
//! - [`config`]: `hall.toml`, `HALL_*` variables and flags, merged.
//! - [`origin`]: `Origin` and `Host` values parsed strictly (a leaf: config and server use it).
//! - [`clock`]: the wall clock in one place: `now_ms`, and RFC 3339 text.
//! - [`text`]: the character policy for free text that is recorded or shown.
//! - [`suggest`]: "did you mean" for mistyped names (used by the loader, config and CLI).

pub mod cli;
pub mod clock;
pub mod config;
pub mod engine;
pub mod load;
pub mod origin;
pub mod server;
pub mod store;
pub mod suggest;
pub mod text;
