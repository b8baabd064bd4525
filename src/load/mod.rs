//! Files on disk -> a validated, compiled [`Snapshot`].
//!
//! Three stages, each with its own errors: parse (TOML syntax and shape, with
//! `file:line:col`), validate (references, ids, settings: SPEC 2.3), compile
//! ([`Snapshot::compile`]) and lint ([`crate::engine::lint`]).

pub mod watch;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use toml::Spanned;

use crate::engine::{
    lint, valid_id, ApprovalSettings, Capability, Diagnostic, Effect, Location, Pattern, Rule,
    Settings, Severity, Snapshot, Worker, DENIED_BY_POLICY,
};

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

fn read_dir_sources(dir: &Path, diags: &mut Vec<Diagnostic>) -> Vec<Source> {
    let io_err = |file: String, msg: String| Diagnostic {
        severity: Severity::Error,
        location: Location {
            file,
            line: 0,
            col: 0,
        },
        key: String::new(),
        message: msg,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            diags.push(io_err(
                dir.display().to_string(),
                format!("cannot read directory: {e}"),
            ));
            return Vec::new();
        }
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".toml") && !n.starts_with('.'))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        let path = dir.join(&n);
        let shown = path.display().to_string();
        match read_policy_file(&path) {
            Ok(Some(text)) => out.push(Source { name: shown, text }),
            // A file removed between listing and reading is an edit in progress: skip it.
            Ok(None) => {}
            Err(msg) => diags.push(io_err(shown, msg)),
        }
    }
    out
}

/// The largest registry or policy file read (a 10,000-rule set is ~2 MB in all).
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Read one `*.toml` file: only a regular file (after resolving symlinks), at most
/// [`MAX_FILE_BYTES`], UTF-8, and never blocking. `Ok(None)`: the name is gone (removed
/// between listing and reading). Every other problem is an error that keeps the last good
/// set: a dangling symlink (its rules would silently vanish), a FIFO (reading one blocks
/// until a writer appears: it wedged reload), a directory or device, a file too large.
fn read_policy_file(path: &Path) -> Result<Option<String>, String> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return match std::fs::symlink_metadata(path) {
                // The name is there but what it points to is not.
                Ok(_) => {
                    let target = std::fs::read_link(path)
                        .map(|t| t.display().to_string())
                        .unwrap_or_else(|_| "?".into());
                    Err(format!(
                        "dangling symlink (points to {target}, which does not exist): \
                         fix or remove it; its rules are not loaded"
                    ))
                }
                Err(_) => Ok(None),
            };
        }
        Err(e) => return Err(format!("cannot read file: {e}")),
    };
    let kind = |t: std::fs::FileType| {
        if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a named pipe (FIFO)"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_block_device() || t.is_char_device() {
            "a device"
        } else {
            "not a regular file"
        }
    };
    if !meta.is_file() {
        return Err(format!(
            "is {}, not a regular file: only regular files (or symlinks to them) are read",
            kind(meta.file_type())
        ));
    }
    // O_NONBLOCK: if the name became a FIFO since the check above, opening it must not wait
    // for a writer. The type is checked again on the opened file.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let f = match f {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read file: {e}")),
    };
    let meta = f.metadata().map_err(|e| format!("cannot read file: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "is {}, not a regular file: only regular files (or symlinks to them) are read",
            kind(meta.file_type())
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "file is too large ({} bytes; the limit is {MAX_FILE_BYTES})",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read file: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "file is too large (over {MAX_FILE_BYTES} bytes, and still growing)"
        ));
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|e| format!("cannot read file: not UTF-8 text ({e})"))
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

// ---- raw file shapes -------------------------------------------------------------------

type S = Spanned<String>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    capability: Vec<RawCapability>,
    #[serde(default)]
    worker: Vec<RawWorker>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapability {
    id: S,
    description: Option<String>,
    owner: Option<String>,
    contact: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    id: S,
    capabilities: Vec<S>,
    environments: Vec<S>,
    max_data_label: S,
    #[serde(default)]
    controls: Vec<S>,
    blast_radius: Spanned<i64>,
    #[serde(default)]
    secrets: Vec<S>,
    enabled: Option<bool>,
    description: Option<String>,
    owner: Option<String>,
    contact: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    settings: Option<Spanned<RawSettings>>,
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    environments: Option<Vec<S>>,
    data_labels: Option<Vec<S>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: S,
    description: Option<String>,
    capabilities: Option<Vec<S>>,
    envs: Option<Vec<S>>,
    data_labels: Option<Vec<S>>,
    max_data_label: Option<S>,
    tenants: Option<Vec<S>>,
    effect: S,
    workers: Option<Vec<S>>,
    #[serde(default)]
    require_controls: Vec<S>,
    max_blast_radius: Option<Spanned<i64>>,
    reason: Option<S>,
    approval_ttl: Option<S>,
    approvers_required: Option<Spanned<i64>>,
    auto_approve_after: Option<S>,
    approval_use: Option<S>,
}

// ---- validation --------------------------------------------------------------------------

/// A diagnostic key such as `rule[r1].workers`, formatted only when a diagnostic is reported:
/// building every key up front cost several allocations per rule on every (re)load.
#[derive(Clone, Copy)]
struct Key<'a> {
    kind: &'static str,
    id: &'a str,
    field: &'static str,
}

impl<'a> Key<'a> {
    fn new(kind: &'static str, id: &'a str) -> Self {
        Key {
            kind,
            id,
            field: "",
        }
    }

    fn at(self, field: &'static str) -> Self {
        Key { field, ..self }
    }
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]{}", self.kind, self.id, self.field)
    }
}

/// Collects diagnostics against the file currently being validated.
struct Checker<'a> {
    file: &'a Source,
    line_starts: Vec<usize>,
    diags: &'a mut Vec<Diagnostic>,
}

impl<'a> Checker<'a> {
    fn new(file: &'a Source, diags: &'a mut Vec<Diagnostic>) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(
            file.text
                .bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i + 1),
        );
        Checker {
            file,
            line_starts,
            diags,
        }
    }

    fn loc(&self, offset: usize) -> Location {
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = self.line_starts[line - 1];
        let col = self.file.text[start..offset.min(self.file.text.len())]
            .chars()
            .count()
            + 1;
        Location {
            file: self.file.name.clone(),
            line,
            col,
        }
    }

    fn push(&mut self, sev: Severity, offset: usize, key: String, message: String) {
        let location = self.loc(offset);
        self.diags.push(Diagnostic {
            severity: sev,
            location,
            key,
            message,
        });
    }

    fn error(&mut self, offset: usize, key: String, message: String) {
        self.push(Severity::Error, offset, key, message);
    }

    fn warn(&mut self, offset: usize, key: String, message: String) {
        self.push(Severity::Warning, offset, key, message);
    }

    fn parse<T: for<'de> Deserialize<'de>>(&mut self) -> Option<T> {
        match toml::from_str::<T>(&self.file.text) {
            Ok(v) => Some(v),
            Err(e) => {
                let offset = e.span().map_or(0, |s| s.start);
                // toml puts a hint on a second line; keep one finding on one line so
                // `file:line:col: error: ...` stays greppable and editor-clickable.
                let msg = e
                    .message()
                    .trim()
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join(": ");
                let key = msg
                    .strip_prefix("unknown field `")
                    .and_then(|r| r.split('`').next())
                    .unwrap_or("")
                    .to_string();
                // TOML calls them keys; serde calls them fields.
                let msg = if msg.starts_with("unknown field") {
                    let hint = unknown_key_hint(&key, &msg);
                    msg.replacen("unknown field", "unknown key", 1) + &hint
                } else if msg.starts_with("missing field") {
                    msg.replacen("missing field", "missing key", 1)
                } else {
                    msg
                };
                self.error(offset, key, msg);
                None
            }
        }
    }

    fn id(&mut self, s: &S, key: impl fmt::Display, what: &str) -> bool {
        if valid_id(s.get_ref()) {
            return true;
        }
        self.error(
            s.span().start,
            key.to_string(),
            format!(
                "{what} {:?} is not a valid id: use 1-128 characters from letters, digits and . _ : @ / -, starting with a letter or digit",
                s.get_ref()
            ),
        );
        false
    }

    fn pattern(&mut self, s: &S, key: impl fmt::Display) -> Option<Pattern> {
        let p = Pattern::parse(s.get_ref());
        if p.is_none() {
            self.error(
                s.span().start,
                key.to_string(),
                format!(
                    "{:?} is not a valid pattern: use an exact id, a prefix glob ending in \".*\", or \"*\"",
                    s.get_ref()
                ),
            );
        }
        p
    }

    fn member(&mut self, s: &S, known: &[String], key: impl fmt::Display, what: &str) -> bool {
        if known.iter().any(|k| k == s.get_ref()) {
            return true;
        }
        self.error(
            s.span().start,
            key.to_string(),
            format!(
                "unknown {what} {:?}{}: [settings] defines {}",
                s.get_ref(),
                crate::cli::suggest::hint(s.get_ref(), known.iter().map(String::as_str)),
                known.join(", ")
            ),
        );
        false
    }
}

/// `; did you mean `tenants`?` from serde's "unknown field `tenant`, expected one of `id`, ...".
fn unknown_key_hint(key: &str, msg: &str) -> String {
    let Some(list) = msg
        .split("expected one of ")
        .nth(1)
        .or_else(|| msg.split("expected ").nth(1))
    else {
        return String::new();
    };
    let expected: Vec<&str> = list.split('`').skip(1).step_by(2).collect();
    crate::cli::suggest::did_you_mean(key, expected)
        .map(|k| format!("; did you mean `{k}`?"))
        .unwrap_or_default()
}

/// A file's parse result: the raw form (if it parsed) and its parse diagnostics.
type Parsed<T> = (Option<T>, Vec<Diagnostic>);

/// Parse each file as TOML into `T`, on up to `available_parallelism` threads.
///
/// TOML parsing is about two thirds of loading a large set (10,000 rules: ~100 of ~160 ms on
/// one core), and the files are independent. Results come back in file order, so the
/// outcome is exactly that of a sequential parse.
fn parse_files<T: for<'de> Deserialize<'de> + Send>(files: &[&Source]) -> Vec<Parsed<T>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let one = |s: &Source| -> Parsed<T> {
        let mut d = Vec::new();
        let v = Checker::new(s, &mut d).parse::<T>();
        (v, d)
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len());
    if threads <= 1 {
        return files.iter().map(|s| one(s)).collect();
    }
    // Each thread takes the next unparsed file, so one large file does not leave the
    // other threads idle behind a fixed split.
    let next = AtomicUsize::new(0);
    let mut indexed: Vec<(usize, Parsed<T>)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                sc.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(s) = files.get(i) else { break };
                        out.push((i, one(s)));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    indexed.sort_unstable_by_key(|(i, _)| *i);
    indexed.into_iter().map(|(_, r)| r).collect()
}

/// Loads that reuse, for each policy file unchanged since the last set that loaded, the
/// rules that set got from it, so a reload parses only the files that changed.
///
/// Parsing is most of a load (TOML: ~2/3 of the CPU time for 10,000 rules) and an edit
/// usually touches one file of many. A file is "unchanged" when its name and a blake3 hash
/// of its bytes match: the name is part of every rule's location, and the hash (not mtime)
/// means any byte change is a miss. A rule depends only on its file's bytes; what depends on
/// the other files (duplicate ids, known environments, labels and workers) is checked again
/// on every load, and if anything is wrong the load is redone from a full parse, so errors
/// and warnings are exactly those of a fresh load. Files holding `[settings]`
/// are always parsed (they are small). Nothing is kept but the last set itself (shared with
/// whoever uses it) and, per file, ranges of its entries: caching the parsed TOML
/// instead held ~20 MB for 10,000 rules.
#[derive(Default)]
pub struct Reloader {
    last: Option<LastGood>,
    parsed: usize,
    /// [`fingerprint`] of the files the last `load_dirs` read (whether they loaded or not).
    fingerprint: Option<blake3::Hash>,
}

/// The last set that loaded, and what each of its reusable files contributed.
struct LastGood {
    snapshot: Arc<Snapshot>,
    registry: HashMap<FileKey, RegistryShare>,
    files: HashMap<FileKey, FileRules>,
}

/// A registry file's share of a set that loaded: ranges of the snapshot's capabilities and
/// workers, and where each was defined (for lint and for duplicate-id messages).
#[derive(Clone, Default)]
struct RegistryShare {
    capabilities: std::ops::Range<usize>,
    cap_locations: Vec<Location>,
    workers: std::ops::Range<usize>,
    worker_locations: Vec<Location>,
}

/// What each file contributed to a set, for the next load to reuse (`None`: not reusable).
#[derive(Default)]
struct Shares {
    registry: Vec<Option<RegistryShare>>,
    policies: Vec<Option<FileRules>>,
}

/// A registry file as validation sees it.
enum RegistryInput<'a> {
    /// Parsed for this load.
    Parsed(&'a Parsed<RegistryFile>),
    /// Unchanged since the last set that loaded: what it gave then.
    Reused(&'a [Capability], &'a [Worker], &'a RegistryShare),
}

/// A policy file's share of a set that loaded: its rules (a range of the snapshot's rules)
/// and the warnings its validation gave (lint warnings are recomputed on every load).
#[derive(Clone)]
struct FileRules {
    rules: std::ops::Range<usize>,
    warnings: Vec<Diagnostic>,
}

/// A reuse key: file name and a blake3 hash of its contents.
type FileKey = (String, blake3::Hash);

/// A set loaded by a [`Reloader`], shared with it (it reuses the set's rules next time).
#[derive(Debug)]
pub struct Reloaded {
    pub snapshot: Arc<Snapshot>,
    pub warnings: Vec<Diagnostic>,
}

impl Reloader {
    /// How many files the last load parsed (the others were reused).
    pub fn files_parsed(&self) -> usize {
        self.parsed
    }

    /// The [`fingerprint`] of what the last [`load_dirs`](Self::load_dirs) read.
    pub fn fingerprint(&self) -> Option<blake3::Hash> {
        self.fingerprint
    }

    /// How many files the next load can reuse if they are unchanged.
    pub fn reusable_files(&self) -> usize {
        self.last
            .as_ref()
            .map_or(0, |l| l.registry.len() + l.files.len())
    }

    /// Read every `*.toml` in both directories (lexical order) and load them.
    pub fn load_dirs(
        &mut self,
        registry_dir: &Path,
        policies_dir: &Path,
    ) -> Result<Reloaded, LoadError> {
        let t = Instant::now();
        let mut diags = Vec::new();
        let registry = read_dir_sources(registry_dir, &mut diags);
        let policies = read_dir_sources(policies_dir, &mut diags);
        self.fingerprint = Some(fingerprint_of(&registry, &policies, &diags));
        if !diags.is_empty() {
            return Err(LoadError { diagnostics: diags });
        }
        tracing::debug!(
            read_us = t.elapsed().as_micros() as u64,
            "policy files read"
        );
        self.load_sources(&registry, &policies)
    }

    /// Load from in-memory sources: registry files then policy files, each in the order given.
    pub fn load_sources(
        &mut self,
        registry: &[Source],
        policies: &[Source],
    ) -> Result<Reloaded, LoadError> {
        let t = Instant::now();
        let key = |s: &Source| (s.name.clone(), blake3::hash(s.text.as_bytes()));
        let reg_keys: Vec<FileKey> = registry.iter().map(key).collect();
        let keys: Vec<FileKey> = policies.iter().map(key).collect();
        let reg_reuse: Vec<Option<RegistryInput>> = reg_keys
            .iter()
            .map(|k| {
                let last = self.last.as_ref()?;
                let f = last.registry.get(k)?;
                let caps = last.snapshot.capabilities.get(f.capabilities.clone())?;
                let workers = last.snapshot.workers.get(f.workers.clone())?;
                Some(RegistryInput::Reused(caps, workers, f))
            })
            .collect();
        let reg_stale = not_reused(registry, &reg_reuse);
        let reuse: Vec<Option<(&[Rule], &FileRules)>> = keys
            .iter()
            .map(|k| {
                let last = self.last.as_ref()?;
                let f = last.files.get(k)?;
                Some((last.snapshot.rules.get(f.rules.clone())?, f))
            })
            .collect();
        let stale = not_reused(policies, &reuse);
        let mut parsed = reg_stale.len() + stale.len();
        let reg_fresh = parse_files::<RegistryFile>(&reg_stale);
        let mut reg_fresh_iter = reg_fresh.iter();
        let reg_inputs: Vec<RegistryInput> = reg_reuse
            .into_iter()
            .map(|r| match r {
                Some(r) => r,
                None => reg_fresh_iter.next().map_or(
                    RegistryInput::Reused(&[], &[], &EMPTY_SHARE),
                    RegistryInput::Parsed,
                ),
            })
            .collect();
        let fresh = parse_files::<PolicyFile>(&stale);
        let mut fresh_iter = fresh.iter();
        let inputs: Vec<PolicyInput> = reuse
            .iter()
            .map(|r| match r {
                Some((rules, f)) => PolicyInput::Reused(rules, &f.warnings),
                None => fresh_iter
                    .next()
                    .map_or(PolicyInput::Reused(&[], &[]), PolicyInput::Parsed),
            })
            .collect();
        let parse_us = t.elapsed().as_micros() as u64;
        let (result, shares) = match assemble(registry, &reg_inputs, policies, &inputs) {
            Ok(done) => done,
            Err(NeedsFullParse) => {
                parsed = registry.len() + policies.len();
                full_load(registry, policies)
            }
        };
        drop((inputs, reg_inputs));
        self.parsed = parsed;
        tracing::debug!(
            files = registry.len() + policies.len(),
            parsed,
            parse_us,
            total_us = t.elapsed().as_micros() as u64,
            "policy set assembled"
        );
        let loaded = result?;
        let snapshot = Arc::new(loaded.snapshot);
        self.last = Some(LastGood {
            snapshot: snapshot.clone(),
            registry: reg_keys
                .into_iter()
                .zip(shares.registry)
                .filter_map(|(k, f)| Some((k, f?)))
                .collect(),
            files: keys
                .into_iter()
                .zip(shares.policies)
                .filter_map(|(k, f)| Some((k, f?)))
                .collect(),
        });
        Ok(Reloaded {
            snapshot,
            warnings: loaded.warnings,
        })
    }
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

/// Stands in for a missing parse result (never expected: one result per file parsed).
static EMPTY_SHARE: RegistryShare = RegistryShare {
    capabilities: 0..0,
    cap_locations: Vec::new(),
    workers: 0..0,
    worker_locations: Vec::new(),
};

/// A policy file as validation sees it.
enum PolicyInput<'a> {
    /// Parsed for this load.
    Parsed(&'a Parsed<PolicyFile>),
    /// Unchanged since the last set that loaded: the rules and warnings it gave then.
    Reused(&'a [Rule], &'a [Diagnostic]),
}

/// A load with reused files found an error: redo it from a full parse, so that the
/// diagnostics are exactly those of a fresh load.
struct NeedsFullParse;

/// Validate, compile and lint a set (`pol_in[i]` is `policies[i]`, parsed or reused). Also
/// returns what each policy file contributed, for the next load to reuse (`None`: not
/// reusable, e.g. it holds `[settings]`).
fn assemble(
    registry: &[Source],
    reg_in: &[RegistryInput],
    policies: &[Source],
    pol_in: &[PolicyInput],
) -> Result<(Result<Loaded, LoadError>, Shares), NeedsFullParse> {
    let t = Instant::now();
    // Stage 1 (parse) is done: every file was parsed, so one bad file does not hide
    // another's errors. Its diagnostics come first, in file order.
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
    let reg_files: Vec<(&Source, Option<&RegistryFile>)> = registry
        .iter()
        .zip(reg_in.iter().map(|r| match r {
            RegistryInput::Parsed((f, _)) => f.as_ref(),
            RegistryInput::Reused(..) => None,
        }))
        .collect();
    let pol_files: Vec<(&Source, Option<&PolicyFile>)> = policies
        .iter()
        .zip(pol_in.iter().map(|p| match p {
            PolicyInput::Parsed((f, _)) => f.as_ref(),
            PolicyInput::Reused(..) => None,
        }))
        .collect();
    let reused_any = pol_in.iter().any(|p| matches!(p, PolicyInput::Reused(..)))
        || reg_in
            .iter()
            .any(|r| matches!(r, RegistryInput::Reused(..)));

    // Stage 2a: settings, at most one file.
    let mut settings = Settings::default();
    let mut settings_at: Option<Location> = None;
    for (src, file) in &pol_files {
        let Some(raw) = file.and_then(|f| f.settings.as_ref()) else {
            continue;
        };
        let mut ck = Checker::new(src, &mut diags);
        if let Some(first) = &settings_at {
            ck.error(
                raw.span().start,
                "settings".into(),
                format!("[settings] is already defined at {first}; at most one file may hold it"),
            );
            continue;
        }
        let settings_start = raw.span().start;
        settings_at = Some(ck.loc(settings_start));
        let raw = raw.get_ref();
        for (list, key, target) in [
            (
                &raw.environments,
                "settings.environments",
                &mut settings.environments,
            ),
            (
                &raw.data_labels,
                "settings.data_labels",
                &mut settings.data_labels,
            ),
        ] {
            let Some(list) = list else { continue };
            let mut vals: Vec<String> = Vec::new();
            for v in list {
                if ck.id(v, key, "value") {
                    if vals.contains(v.get_ref()) {
                        ck.error(
                            v.span().start,
                            key.into(),
                            format!("{:?} is listed twice", v.get_ref()),
                        );
                    }
                    vals.push(v.get_ref().clone());
                }
            }
            if vals.is_empty() || vals.len() > 64 {
                ck.error(
                    list.first().map_or(settings_start, |s| s.span().start),
                    key.into(),
                    "must list between 1 and 64 values".into(),
                );
            }
            *target = vals;
        }
    }

    // Stage 2b: registry.
    let mut capabilities: Vec<Capability> = Vec::new();
    let mut cap_locations: Vec<Location> = Vec::new();
    let mut cap_seen: HashMap<String, Location> = HashMap::new();
    let mut reg_shares: Vec<RegistryShare> = vec![RegistryShare::default(); registry.len()];
    for ((input, (src, file)), share) in reg_in.iter().zip(&reg_files).zip(&mut reg_shares) {
        let first = capabilities.len();
        if let RegistryInput::Reused(caps, _, was) = input {
            // Ids were checked when these loaded; only a duplicate in another file is new.
            for (c, at) in caps.iter().zip(&was.cap_locations) {
                if cap_seen.contains_key(&c.id) {
                    return Err(NeedsFullParse);
                }
                cap_seen.insert(c.id.clone(), at.clone());
                cap_locations.push(at.clone());
                capabilities.push(c.clone());
            }
            share.capabilities = first..capabilities.len();
            share.cap_locations = was.cap_locations.clone();
            continue;
        }
        let Some(file) = file else { continue };
        let mut ck = Checker::new(src, &mut diags);
        for c in &file.capability {
            let key = Key::new("capability", c.id.get_ref());
            if !ck.id(&c.id, key.at(".id"), "capability id") {
                continue;
            }
            let here = ck.loc(c.id.span().start);
            if let Some(first) = cap_seen.get(c.id.get_ref()) {
                ck.error(
                    c.id.span().start,
                    format!("{key}.id"),
                    format!("duplicate capability id (first defined at {first})"),
                );
                continue;
            }
            cap_seen.insert(c.id.get_ref().clone(), here.clone());
            cap_locations.push(here);
            capabilities.push(Capability {
                id: c.id.get_ref().clone(),
                description: c.description.clone(),
                owner: c.owner.clone(),
                contact: c.contact.clone(),
            });
        }
        share.capabilities = first..capabilities.len();
        share.cap_locations = cap_locations[first..].to_vec();
    }
    let mut workers: Vec<Worker> = Vec::new();
    let mut worker_seen: HashMap<String, Location> = HashMap::new();
    for ((input, (src, file)), share) in reg_in.iter().zip(&reg_files).zip(&mut reg_shares) {
        let first = workers.len();
        if let RegistryInput::Reused(_, ws, was) = input {
            // As for reused rules: check what depends on the other files, as below.
            for (w, at) in ws.iter().zip(&was.worker_locations) {
                if worker_seen.contains_key(&w.id)
                    || !w.capabilities.iter().all(|c| cap_seen.contains_key(c))
                    || !w
                        .environments
                        .iter()
                        .all(|e| settings.environments.contains(e))
                    || !settings.data_labels.contains(&w.max_data_label)
                {
                    return Err(NeedsFullParse);
                }
                worker_seen.insert(w.id.clone(), at.clone());
                workers.push(w.clone());
            }
            share.workers = first..workers.len();
            share.worker_locations = was.worker_locations.clone();
            continue;
        }
        let Some(file) = file else { continue };
        let mut ck = Checker::new(src, &mut diags);
        for w in &file.worker {
            let key = Key::new("worker", w.id.get_ref());
            if !ck.id(&w.id, key.at(".id"), "worker id") {
                continue;
            }
            if let Some(first) = worker_seen.get(w.id.get_ref()) {
                ck.error(
                    w.id.span().start,
                    format!("{key}.id"),
                    format!("duplicate worker id (first defined at {first})"),
                );
                continue;
            }
            worker_seen.insert(w.id.get_ref().clone(), ck.loc(w.id.span().start));
            for c in &w.capabilities {
                if !cap_seen.contains_key(c.get_ref()) {
                    ck.error(
                        c.span().start,
                        format!("{key}.capabilities"),
                        format!(
                            "unknown capability {:?}: no [[capability]] has this id{}",
                            c.get_ref(),
                            crate::cli::suggest::hint(
                                c.get_ref(),
                                cap_seen.keys().map(String::as_str)
                            )
                        ),
                    );
                }
            }
            for e in &w.environments {
                ck.member(
                    e,
                    &settings.environments,
                    key.at(".environments"),
                    "environment",
                );
            }
            ck.member(
                &w.max_data_label,
                &settings.data_labels,
                key.at(".max_data_label"),
                "data label",
            );
            for c in &w.controls {
                ck.id(c, key.at(".controls"), "control");
            }
            for s in &w.secrets {
                ck.id(s, key.at(".secrets"), "secret name");
            }
            let br = *w.blast_radius.get_ref();
            if !(0..=10).contains(&br) {
                ck.error(
                    w.blast_radius.span().start,
                    format!("{key}.blast_radius"),
                    format!("blast_radius must be between 0 and 10, got {br}"),
                );
            }
            workers.push(Worker {
                id: w.id.get_ref().clone(),
                capabilities: strings(&w.capabilities),
                environments: strings(&w.environments),
                max_data_label: w.max_data_label.get_ref().clone(),
                controls: strings(&w.controls),
                blast_radius: br.clamp(0, 10) as u8,
                secrets: strings(&w.secrets),
                enabled: w.enabled.unwrap_or(true),
                description: w.description.clone(),
                owner: w.owner.clone(),
                contact: w.contact.clone(),
                compiled: Default::default(),
            });
            share.worker_locations.push(ck.loc(w.id.span().start));
        }
        share.workers = first..workers.len();
    }

    // Stage 2c: rules, in file order.
    let mut rules: Vec<Rule> = Vec::new();
    // Rule id -> index in `rules` of its first definition (borrowing the id: no copies).
    let mut rule_seen: HashMap<&str, usize> = HashMap::new();
    let mut file_rules: Vec<Option<FileRules>> = Vec::with_capacity(pol_in.len());
    for (input, (src, file)) in pol_in.iter().zip(&pol_files) {
        let (first_rule, first_diag) = (rules.len(), diags.len());
        if let PolicyInput::Reused(reused, warnings) = input {
            // Everything about these rules that depends only on their file was checked when
            // they loaded; check what depends on the other files, as the code below does.
            let known = |list: &Option<Vec<String>>, set: &[String]| {
                list.iter().flatten().all(|v| set.contains(v))
            };
            for r in reused.iter() {
                if rule_seen.contains_key(r.id.as_str())
                    || !known(&r.envs, &settings.environments)
                    || !known(&r.data_labels, &settings.data_labels)
                    || !r
                        .max_data_label
                        .iter()
                        .all(|m| settings.data_labels.contains(m))
                    || !r
                        .workers
                        .iter()
                        .flatten()
                        .all(|w| worker_seen.contains_key(w))
                {
                    return Err(NeedsFullParse);
                }
                rule_seen.insert(&r.id, rules.len());
                rules.push(r.clone());
            }
            diags.extend(warnings.iter().cloned());
            file_rules.push(Some(FileRules {
                rules: first_rule..rules.len(),
                warnings: warnings.to_vec(),
            }));
            continue;
        }
        let Some(file) = file else {
            file_rules.push(None);
            continue;
        };
        let mut ck = Checker::new(src, &mut diags);
        for r in &file.rule {
            let key = Key::new("rule", r.id.get_ref());
            if !ck.id(&r.id, key.at(".id"), "rule id") {
                continue;
            }
            let location = ck.loc(r.id.span().start);
            if let Some(&first) = rule_seen.get(r.id.get_ref().as_str()) {
                ck.error(
                    r.id.span().start,
                    format!("{key}.id"),
                    format!(
                        "duplicate rule id (first defined at {})",
                        rules[first].location
                    ),
                );
                continue;
            }
            // Every path from here pushes this rule, at index `rules.len()`.
            rule_seen.insert(r.id.get_ref(), rules.len());

            let capabilities = match &r.capabilities {
                None => vec![Pattern::Any],
                Some(list) => list
                    .iter()
                    .filter_map(|p| ck.pattern(p, key.at(".capabilities")))
                    .collect(),
            };
            let tenants = r.tenants.as_ref().map(|list| {
                list.iter()
                    .filter_map(|p| ck.pattern(p, key.at(".tenants")))
                    .collect::<Vec<_>>()
            });
            if let Some(list) = &r.envs {
                for e in list {
                    ck.member(e, &settings.environments, key.at(".envs"), "environment");
                }
            }
            if let Some(list) = &r.data_labels {
                for l in list {
                    ck.member(
                        l,
                        &settings.data_labels,
                        key.at(".data_labels"),
                        "data label",
                    );
                }
            }
            if let Some(m) = &r.max_data_label {
                ck.member(
                    m,
                    &settings.data_labels,
                    key.at(".max_data_label"),
                    "data label",
                );
                if r.data_labels.is_some() {
                    ck.error(
                        m.span().start,
                        format!("{key}.max_data_label"),
                        "a rule may have data_labels or max_data_label, not both".into(),
                    );
                }
            }
            let effect = match r.effect.get_ref().as_str() {
                "allow" => Some(Effect::Allow),
                "deny" => Some(Effect::Deny),
                "require_approval" => Some(Effect::RequireApproval),
                other => {
                    ck.error(
                        r.effect.span().start,
                        format!("{key}.effect"),
                        format!("effect must be \"allow\", \"deny\" or \"require_approval\", got {other:?}"),
                    );
                    None
                }
            };
            if let Some(ws) = &r.workers {
                for w in ws {
                    if !worker_seen.contains_key(w.get_ref()) {
                        ck.error(
                            w.span().start,
                            format!("{key}.workers"),
                            format!(
                                "unknown worker {:?}: no [[worker]] has this id{}",
                                w.get_ref(),
                                crate::cli::suggest::hint(
                                    w.get_ref(),
                                    worker_seen.keys().map(String::as_str)
                                )
                            ),
                        );
                    }
                }
            }
            for c in &r.require_controls {
                ck.id(c, key.at(".require_controls"), "control");
            }
            let mut max_blast_radius = None;
            if let Some(m) = &r.max_blast_radius {
                let v = *m.get_ref();
                if (0..=10).contains(&v) {
                    max_blast_radius = Some(v as u8);
                } else {
                    ck.error(
                        m.span().start,
                        format!("{key}.max_blast_radius"),
                        format!("max_blast_radius must be between 0 and 10, got {v}"),
                    );
                }
            }
            let reason = match &r.reason {
                None => DENIED_BY_POLICY.to_string(),
                Some(reason) => {
                    if !valid_reason(reason.get_ref()) {
                        ck.error(
                            reason.span().start,
                            format!("{key}.reason"),
                            format!(
                                "reason {:?} is not a machine code: use 1-64 characters from a-z, 0-9 and _, starting with a letter",
                                reason.get_ref()
                            ),
                        );
                    }
                    if effect != Some(Effect::Deny) {
                        ck.warn(
                            reason.span().start,
                            format!("{key}.reason"),
                            "reason is only used when effect = \"deny\"".into(),
                        );
                    }
                    reason.get_ref().clone()
                }
            };
            let approval = approval_settings(&mut ck, r, key, effect);
            rules.push(Rule {
                id: r.id.get_ref().clone(),
                description: r.description.clone(),
                capabilities,
                envs: r.envs.as_ref().map(|v| strings(v)),
                data_labels: r.data_labels.as_ref().map(|v| strings(v)),
                max_data_label: r.max_data_label.as_ref().map(|m| m.get_ref().clone()),
                tenants,
                effect: effect.unwrap_or(Effect::Deny),
                workers: r.workers.as_ref().map(|v| strings(v)),
                require_controls: strings(&r.require_controls),
                max_blast_radius,
                reason,
                approval,
                location,
                compiled: Default::default(),
            });
        }
        file_rules.push(file.settings.is_none().then(|| FileRules {
            rules: first_rule..rules.len(),
            warnings: diags[first_diag..].to_vec(),
        }));
    }

    if diags.iter().any(|d| d.severity == Severity::Error) {
        if reused_any {
            return Err(NeedsFullParse);
        }
        return Ok((Err(LoadError { diagnostics: diags }), Shares::default()));
    }

    // Stage 3: compile and lint.
    let validate_us = t.elapsed().as_micros() as u64;
    let files = registry
        .iter()
        .chain(policies)
        .map(|s| s.name.clone())
        .collect();
    let version = policy_version(registry, policies);
    let version_us = t.elapsed().as_micros() as u64 - validate_us;
    let snapshot = Snapshot::compile(version, settings, capabilities, workers, rules, files);
    let compile_us = t.elapsed().as_micros() as u64 - validate_us - version_us;
    diags.extend(lint(&snapshot, &cap_locations));
    tracing::debug!(
        validate_us,
        version_us,
        compile_us,
        lint_us = t.elapsed().as_micros() as u64 - validate_us - version_us - compile_us,
        "policy set validated, compiled and linted"
    );
    let shares = Shares {
        registry: reg_files
            .iter()
            .zip(reg_in)
            .zip(reg_shares)
            .map(|(((_, file), input), share)| {
                // A file that did not parse contributed nothing reusable.
                (file.is_some() || matches!(input, RegistryInput::Reused(..))).then_some(share)
            })
            .collect(),
        policies: file_rules,
    };
    Ok((
        Ok(Loaded {
            snapshot,
            warnings: diags,
        }),
        shares,
    ))
}

/// The sources with nothing to reuse (`None` at their index): the ones to parse.
fn not_reused<'a, T>(sources: &'a [Source], reuse: &[Option<T>]) -> Vec<&'a Source> {
    sources
        .iter()
        .zip(reuse)
        .filter(|(_, r)| r.is_none())
        .map(|(s, _)| s)
        .collect()
}

fn strings(v: &[S]) -> Vec<String> {
    v.iter().map(|s| s.get_ref().clone()).collect()
}

/// The longest an approval may stay pending, or be reused: 30 days.
const MAX_APPROVAL_SECS: u64 = 30 * 24 * 3600;
/// The most distinct approvers a rule may require.
const MAX_APPROVERS: i64 = 10;

/// The approval keys of a rule (SPEC 3.1), validated with `file:line:col` diagnostics.
/// On a rule whose effect is not `require_approval` they are warned about and ignored.
fn approval_settings(
    ck: &mut Checker<'_>,
    r: &RawRule,
    key: Key<'_>,
    effect: Option<Effect>,
) -> ApprovalSettings {
    let mut out = ApprovalSettings::default();
    let duration = |ck: &mut Checker<'_>, v: &S, field: &'static str| -> Option<u64> {
        match parse_duration(v.get_ref()) {
            Some(secs) if (1..=MAX_APPROVAL_SECS).contains(&secs) => Some(secs),
            _ => {
                ck.error(
                    v.span().start,
                    format!("{}", key.at(field)),
                    format!(
                        "{} must be {}a duration from 1s to 30d such as \"90s\", \"15m\", \"2h\" or \"1d\", got {:?}",
                        &field[1..],
                        if field == ".approval_use" { "\"once\" or " } else { "" },
                        v.get_ref()
                    ),
                );
                None
            }
        }
    };
    if let Some(v) = &r.approval_ttl {
        if let Some(s) = duration(ck, v, ".approval_ttl") {
            out.ttl_secs = s;
        }
    }
    if let Some(v) = &r.auto_approve_after {
        if let Some(s) = duration(ck, v, ".auto_approve_after") {
            if s >= out.ttl_secs {
                ck.error(
                    v.span().start,
                    format!("{}", key.at(".auto_approve_after")),
                    format!(
                        "auto_approve_after ({s}s) must be shorter than approval_ttl ({}s), or the approval expires before its veto window ends",
                        out.ttl_secs
                    ),
                );
            }
            out.auto_approve_after_secs = Some(s);
        }
    }
    if let Some(v) = &r.approval_use {
        if v.get_ref() != "once" {
            out.use_window_secs = duration(ck, v, ".approval_use");
        }
    }
    if let Some(n) = &r.approvers_required {
        let v = *n.get_ref();
        if (1..=MAX_APPROVERS).contains(&v) {
            out.approvers_required = v as u32;
        } else {
            ck.error(
                n.span().start,
                format!("{}", key.at(".approvers_required")),
                format!("approvers_required must be between 1 and {MAX_APPROVERS}, got {v}"),
            );
        }
    }
    if effect != Some(Effect::RequireApproval) {
        for (field, span) in [
            (".approval_ttl", r.approval_ttl.as_ref().map(|v| v.span())),
            (
                ".approvers_required",
                r.approvers_required.as_ref().map(|v| v.span()),
            ),
            (
                ".auto_approve_after",
                r.auto_approve_after.as_ref().map(|v| v.span()),
            ),
            (".approval_use", r.approval_use.as_ref().map(|v| v.span())),
        ] {
            if let Some(span) = span {
                ck.warn(
                    span.start,
                    format!("{}", key.at(field)),
                    format!(
                        "{} is only used when effect = \"require_approval\"",
                        &field[1..]
                    ),
                );
            }
        }
    }
    out
}

/// `<n><unit>` with unit `s`, `m`, `h` or `d` (e.g. `"15m"`), in seconds. One unit, no
/// spaces: the four forms a rule needs do not justify a parsing crate.
pub fn parse_duration(s: &str) -> Option<u64> {
    let unit = match s.as_bytes().last()? {
        b's' => 1,
        b'm' => 60,
        b'h' => 3600,
        b'd' => 86_400,
        _ => return None,
    };
    let n = &s[..s.len() - 1];
    if n.is_empty() || n.len() > 9 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse::<u64>().ok()?.checked_mul(unit)
}

/// Deny reasons are machine codes: `[a-z][a-z0-9_]{0,63}`.
fn valid_reason(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

#[cfg(test)]
mod tests;
