//! Files on disk -> a validated, compiled [`Snapshot`].
//!
//! A load runs in stages, each in its own module with its own error type, whose errors
//! become [`Diagnostic`]s with `file:line:col`:
//! - [`read`]: the `*.toml` files of each directory, in lexical order;
//! - [`parse`]: each file's TOML into its raw shape (files in parallel);
//! - [`settings`] -> [`registry`] -> [`rules`]: validation, in that order (each later stage
//!   looks up what the earlier ones defined);
//! - [`cross_check`] (here): the set goes on only if validation found no error;
//! - [`compile`] (here): [`Snapshot::compile`], then [`crate::engine::lint`].
//!
//! [`reuse`] is the reloader: a reload parses only the files that changed and takes the
//! rest from the last set that loaded.

mod parse;
mod read;
mod registry;
mod reuse;
mod rules;
mod settings;
pub mod watch;

use std::fmt;
use std::path::Path;
use std::time::Instant;

use crate::engine::{lint, Diagnostic, Location, Rule, Settings, Severity, Snapshot};
use parse::{parse_files, PolicyFile, RegistryFile};
use read::read_dir_sources;
pub use read::MAX_FILE_BYTES;
use registry::Registry;
use reuse::{NeedsFullParse, PolicyInput, RegistryInput, Shares};
pub use reuse::{Reloaded, Reloader};

/// One file's name (as shown in messages) and contents.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub text: String,
}

/// A snapshot that loaded, with the warnings found on the way.
#[derive(Debug)]
pub struct Loaded {
    pub snapshot: Snapshot,
    pub warnings: Vec<Diagnostic>,
}

/// A load that failed: every error found (not just the first), plus any warnings.
#[derive(Debug, Clone)]
pub struct LoadError {
    pub diagnostics: Vec<Diagnostic>,
}

impl LoadError {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.errors().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

/// Read every `*.toml` in both directories (lexical order) and load them.
pub fn load_dirs(registry_dir: &Path, policies_dir: &Path) -> Result<Loaded, LoadError> {
    let mut diags = Vec::new();
    let registry = read_dir_sources(registry_dir, &mut diags);
    let policies = read_dir_sources(policies_dir, &mut diags);
    if !diags.is_empty() {
        return Err(LoadError { diagnostics: diags });
    }
    load_sources(&registry, &policies)
}

/// A content hash of both directories as a load would read them: each file's name and
/// bytes, and every read error. The daemon's periodic rescan compares it with that of the
/// last load, so a change no file event reported is still loaded within seconds.
pub fn fingerprint(registry_dir: &Path, policies_dir: &Path) -> blake3::Hash {
    let mut diags = Vec::new();
    let registry = read_dir_sources(registry_dir, &mut diags);
    let policies = read_dir_sources(policies_dir, &mut diags);
    fingerprint_of(&registry, &policies, &diags)
}

fn fingerprint_of(registry: &[Source], policies: &[Source], diags: &[Diagnostic]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for (i, list) in [registry, policies].into_iter().enumerate() {
        h.update(&[i as u8]);
        for s in list {
            h.update(&(s.name.len() as u64).to_le_bytes());
            h.update(s.name.as_bytes());
            h.update(&(s.text.len() as u64).to_le_bytes());
            h.update(s.text.as_bytes());
        }
    }
    for d in diags {
        let t = d.to_string();
        h.update(&(t.len() as u64).to_le_bytes());
        h.update(t.as_bytes());
    }
    h.finalize()
}

/// The policy version: blake3 over each file's name, length and contents, in load order.
pub fn policy_version(registry: &[Source], policies: &[Source]) -> String {
    let mut h = blake3::Hasher::new();
    for s in registry.iter().chain(policies) {
        let base = s.name.rsplit('/').next().unwrap_or(&s.name);
        h.update(base.as_bytes());
        h.update(&[0]);
        h.update(&(s.text.len() as u64).to_le_bytes());
        h.update(s.text.as_bytes());
    }
    format!("blake3:{}", h.finalize().to_hex())
}

/// Load from in-memory sources: registry files then policy files, each in the order given.
pub fn load_sources(registry: &[Source], policies: &[Source]) -> Result<Loaded, LoadError> {
    full_load(registry, policies).0
}

/// Parse every file and assemble the set (no reuse, so no second try is ever needed).
fn full_load(registry: &[Source], policies: &[Source]) -> (Result<Loaded, LoadError>, Shares) {
    let reg = parse_files::<RegistryFile>(&registry.iter().collect::<Vec<_>>());
    let pol = parse_files::<PolicyFile>(&policies.iter().collect::<Vec<_>>());
    let reg: Vec<RegistryInput> = reg.iter().map(RegistryInput::Parsed).collect();
    let pol: Vec<PolicyInput> = pol.iter().map(PolicyInput::Parsed).collect();
    assemble(registry, &reg, policies, &pol).unwrap_or_else(|NeedsFullParse| {
        let d = Diagnostic {
            severity: Severity::Error,
            location: Location::default(),
            key: String::new(),
            message: "internal error: a load with nothing reused asked for a full parse".into(),
        };
        (
            Err(LoadError {
                diagnostics: vec![d],
            }),
            Shares::default(),
        )
    })
}

/// Validate, compile and lint a set (`reg_in[i]` is `registry[i]` and `pol_in[i]` is
/// `policies[i]`, each parsed or reused), in stages: settings, registry, rules,
/// cross-checks, compile. Also returns what each file contributed, for the next load to
/// reuse. `Err(NeedsFullParse)`: a reused file may be wrong with the others; redo from a
/// full parse.
fn assemble(
    registry: &[Source],
    reg_in: &[RegistryInput],
    policies: &[Source],
    pol_in: &[PolicyInput],
) -> Result<(Result<Loaded, LoadError>, Shares), NeedsFullParse> {
    let t = Instant::now();
    // Parsing is done: every file was parsed, so one bad file does not hide another's
    // errors. Its diagnostics come first, in file order.
    let mut diags = parse_diagnostics(reg_in, pol_in);
    let reg_files: Vec<(&Source, Option<&RegistryFile>)> = registry
        .iter()
        .zip(reg_in.iter().map(RegistryInput::parsed))
        .collect();
    let pol_files: Vec<(&Source, Option<&PolicyFile>)> = policies
        .iter()
        .zip(pol_in.iter().map(PolicyInput::parsed))
        .collect();
    let reused_any = pol_in.iter().any(|p| matches!(p, PolicyInput::Reused(..)))
        || reg_in
            .iter()
            .any(|r| matches!(r, RegistryInput::Reused(..)));

    let settings = settings::stage(&pol_files, &mut diags);
    let mut reg = registry::stage(reg_in, &reg_files, &settings, &mut diags)?;
    let rules = rules::stage(pol_in, &pol_files, &settings, &reg, &mut diags)?;
    if let Err(failed) = cross_check(diags.as_slice(), reused_any) {
        return match failed {
            CrossCheck::Reused => Err(NeedsFullParse),
            CrossCheck::Errors => Ok((Err(LoadError { diagnostics: diags }), Shares::default())),
        };
    }
    let validate_us = t.elapsed().as_micros() as u64;
    let registry_shares = reg_files
        .iter()
        .zip(reg_in)
        .zip(std::mem::take(&mut reg.shares))
        .map(|(((_, file), input), share)| {
            // A file that did not parse contributed nothing reusable.
            (file.is_some() || matches!(input, RegistryInput::Reused(..))).then_some(share)
        })
        .collect();
    let loaded = compile(
        registry,
        policies,
        settings,
        reg,
        rules.rules,
        diags,
        validate_us,
    );
    let shares = Shares {
        registry: registry_shares,
        policies: rules.files,
    };
    Ok((Ok(loaded), shares))
}

/// The parse diagnostics of the files parsed for this load, in file order.
fn parse_diagnostics(reg_in: &[RegistryInput], pol_in: &[PolicyInput]) -> Vec<Diagnostic> {
    let mut diags: Vec<Diagnostic> = Vec::new();
    for r in reg_in {
        if let RegistryInput::Parsed((_, d)) = r {
            diags.extend(d.iter().cloned());
        }
    }
    for p in pol_in {
        if let PolicyInput::Parsed((_, d)) = p {
            diags.extend(d.iter().cloned());
        }
    }
    diags
}

/// Why a validated set goes no further.
enum CrossCheck {
    /// Validation found errors: the load fails with them.
    Errors,
    /// Validation found errors in a load that reused files: redo it from a full parse, so
    /// that the diagnostics are exactly those of a fresh load.
    Reused,
}

/// The stage between validation and compiling: the references between files (a worker's
/// capabilities, a rule's workers, every environment and label against `[settings]`,
/// duplicate ids across files) were checked by the stage that reads the key, so that each
/// diagnostic comes in file order; here the set as a whole is let through, or not.
fn cross_check(diags: &[Diagnostic], reused_any: bool) -> Result<(), CrossCheck> {
    if !diags.iter().any(|d| d.severity == Severity::Error) {
        Ok(())
    } else if reused_any {
        Err(CrossCheck::Reused)
    } else {
        Err(CrossCheck::Errors)
    }
}

/// The last stage: compile the validated set into a [`Snapshot`] and lint it.
fn compile(
    registry: &[Source],
    policies: &[Source],
    settings: Settings,
    reg: Registry,
    rules: Vec<Rule>,
    mut diags: Vec<Diagnostic>,
    validate_us: u64,
) -> Loaded {
    let t = Instant::now();
    let files = registry
        .iter()
        .chain(policies)
        .map(|s| s.name.clone())
        .collect();
    let version = policy_version(registry, policies);
    let version_us = t.elapsed().as_micros() as u64;
    let snapshot = Snapshot::compile(
        version,
        settings,
        reg.capabilities,
        reg.workers,
        rules,
        files,
    );
    let compile_us = t.elapsed().as_micros() as u64 - version_us;
    diags.extend(lint(&snapshot, &reg.cap_locations));
    tracing::debug!(
        validate_us,
        version_us,
        compile_us,
        lint_us = t.elapsed().as_micros() as u64 - version_us - compile_us,
        "policy set validated, compiled and linted"
    );
    Loaded {
        snapshot,
        warnings: diags,
    }
}

/// The duration form of rule keys (`"15m"`): see [`crate::clock::parse_duration`].
pub use crate::clock::parse_duration;

#[cfg(test)]
mod tests;
