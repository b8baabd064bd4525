//! Hall: a local policy router for AI agents.
//!
//! The crate is a pure decision core wrapped in a thin shell:
//! - [`engine`]: the pure core. `decide(&Snapshot, &Request)`; no I/O, no clock.
//! - [`load`]: files on disk -> validated [`engine::Snapshot`], with `file:line:col` errors,
//!   in stages, one module each: `read` -> `parse` -> `settings` -> `registry` -> `rules` ->
//!   cross-check -> compile (+ lint); `reuse` is the reloader's incremental reuse.
//! - [`store`]: sled-backed state: the audit log, tokens, secrets, approvals, keys.
//! - [`server`]: the actix-web daemon: `server::run(Config)`. Handlers build what they
//!   record (`route` builds its audit entry, `record` only appends); every HTTP error goes
//!   through `server::errors` (`Code` -> status and code, in one place).
//! - [`cli`]: the `hall` command line (offline commands and thin HTTP clients); it builds
//!   the [`config::Config`] that `hall serve` runs with. Every command fails with a
//!   `cli::CliError`, which keeps its causes and alone chooses the exit code.
//! - [`config`]: `hall.toml`, `HALL_*` variables and flags, merged. Depends on no `server`,
//!   `store` or `cli` code (only the leaves below).
//!
//! Leaves, used by the modules above and depending on none of them:
//! - [`origin`]: `Origin` and `Host` values parsed strictly (config and server use it).
//! - [`clock`]: the wall clock in one place (`now_ms`, RFC 3339 text) and the one duration
//!   syntax (`15m`).
//! - [`text`]: the character policy for free text that is recorded or shown.
//! - [`suggest`]: "did you mean" for mistyped names (loader, config and CLI).
//! - [`memory`]: the binary's allocator tuning and handing freed heap back to the OS.
//!
//! Dependencies point down: `cli` -> `server` -> `store`, `load` -> `engine`; `config` is
//! read by `cli` and `server`.

pub mod cli;
pub mod clock;
pub mod config;
pub mod engine;
pub mod load;
pub mod memory;
pub mod origin;
pub mod server;
pub mod store;
pub mod suggest;
pub mod text;
