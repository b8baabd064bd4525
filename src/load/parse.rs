//! Stage 0 of a load: each file's TOML parsed into its raw shape (with spans), and the
//! [`Checker`] every later stage reports through, with `file:line:col`.

use std::fmt;

use serde::Deserialize;
use toml::Spanned;

use super::Source;
use crate::engine::{valid_id, Diagnostic, Location, Pattern, Severity};

// ---- raw file shapes -------------------------------------------------------------------

pub(super) type S = Spanned<String>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RegistryFile {
    #[serde(default)]
    pub(super) capability: Vec<RawCapability>,
    #[serde(default)]
    pub(super) worker: Vec<RawWorker>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCapability {
    pub(super) id: S,
    pub(super) description: Option<String>,
    pub(super) owner: Option<String>,
    pub(super) contact: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorker {
    pub(super) id: S,
    pub(super) capabilities: Vec<S>,
    pub(super) environments: Vec<S>,
    pub(super) max_data_label: S,
    #[serde(default)]
    pub(super) controls: Vec<S>,
    pub(super) blast_radius: Spanned<i64>,
    #[serde(default)]
    pub(super) secrets: Vec<S>,
    pub(super) enabled: Option<bool>,
    pub(super) description: Option<String>,
    pub(super) owner: Option<String>,
    pub(super) contact: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyFile {
    pub(super) settings: Option<Spanned<RawSettings>>,
    #[serde(default)]
    pub(super) rule: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSettings {
    pub(super) environments: Option<Vec<S>>,
    pub(super) data_labels: Option<Vec<S>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) id: S,
    pub(super) description: Option<String>,
    pub(super) capabilities: Option<Vec<S>>,
    pub(super) envs: Option<Vec<S>>,
    pub(super) data_labels: Option<Vec<S>>,
    pub(super) max_data_label: Option<S>,
    pub(super) tenants: Option<Vec<S>>,
    pub(super) effect: S,
    pub(super) workers: Option<Vec<S>>,
    #[serde(default)]
    pub(super) require_controls: Vec<S>,
    pub(super) max_blast_radius: Option<Spanned<i64>>,
    pub(super) reason: Option<S>,
    pub(super) approval_ttl: Option<S>,
    pub(super) approvers_required: Option<Spanned<i64>>,
    pub(super) auto_approve_after: Option<S>,
    pub(super) approval_use: Option<S>,
}

// ---- validation --------------------------------------------------------------------------

/// A diagnostic key such as `rule[r1].workers`, formatted only when a diagnostic is reported:
/// building every key up front cost several allocations per rule on every (re)load.
#[derive(Clone, Copy)]
pub(super) struct Key<'a> {
    kind: &'static str,
    id: &'a str,
    field: &'static str,
}

impl<'a> Key<'a> {
    pub(super) fn new(kind: &'static str, id: &'a str) -> Self {
        Key {
            kind,
            id,
            field: "",
        }
    }

    pub(super) fn at(self, field: &'static str) -> Self {
        Key { field, ..self }
    }
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]{}", self.kind, self.id, self.field)
    }
}

/// Collects diagnostics against the file currently being validated.
pub(super) struct Checker<'a> {
    file: &'a Source,
    line_starts: Vec<usize>,
    diags: &'a mut Vec<Diagnostic>,
}

impl<'a> Checker<'a> {
    pub(super) fn new(file: &'a Source, diags: &'a mut Vec<Diagnostic>) -> Self {
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

    pub(super) fn loc(&self, offset: usize) -> Location {
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

    fn push(&mut self, severity: Severity, offset: usize, key: String, message: String) {
        let location = self.loc(offset);
        self.diags.push(Diagnostic {
            severity,
            location,
            key,
            message,
        });
    }

    /// Report `e` at `offset` as an error of `key`: a stage's error becomes a diagnostic.
    pub(super) fn error(
        &mut self,
        offset: usize,
        key: impl fmt::Display,
        e: impl std::error::Error,
    ) {
        self.push(Severity::Error, offset, key.to_string(), e.to_string());
    }

    /// Report `w` at `offset` as a warning of `key`.
    pub(super) fn warn(
        &mut self,
        offset: usize,
        key: impl fmt::Display,
        w: impl std::error::Error,
    ) {
        self.push(Severity::Warning, offset, key.to_string(), w.to_string());
    }

    fn parse<T: for<'de> Deserialize<'de>>(&mut self) -> Option<T> {
        match toml::from_str::<T>(&self.file.text) {
            Ok(v) => Some(v),
            Err(e) => {
                let offset = e.span().map_or(0, |s| s.start);
                let e = ParseError::from(e);
                let key = e.key.clone();
                self.error(offset, key, e);
                None
            }
        }
    }

    /// Is `s` a valid id? If not, report it.
    pub(super) fn id(&mut self, s: &S, key: impl fmt::Display, what: &'static str) -> bool {
        if valid_id(s.get_ref()) {
            return true;
        }
        let value = s.get_ref().clone();
        self.error(s.span().start, key, FieldError::InvalidId { what, value });
        false
    }

    /// `s` as a pattern; if it is not one, report it.
    pub(super) fn pattern(&mut self, s: &S, key: impl fmt::Display) -> Option<Pattern> {
        let p = Pattern::parse(s.get_ref());
        if p.is_none() {
            let e = FieldError::InvalidPattern(s.get_ref().clone());
            self.error(s.span().start, key, e);
        }
        p
    }

    /// Is `s` one of `known` (the values `[settings]` defines)? If not, report it.
    pub(super) fn member(
        &mut self,
        s: &S,
        known: &[String],
        key: impl fmt::Display,
        what: &'static str,
    ) -> bool {
        if known.iter().any(|k| k == s.get_ref()) {
            return true;
        }
        let e = FieldError::UnknownMember {
            what,
            value: s.get_ref().clone(),
            hint: crate::suggest::hint(s.get_ref(), known.iter().map(String::as_str)),
            known: known.join(", "),
        };
        self.error(s.span().start, key, e);
        false
    }
}

/// A file that is not valid TOML, or not of the expected shape (unknown or missing key,
/// wrong type), in TOML's words (keys, not serde's fields) and on one line, so that
/// `file:line:col: error: ...` stays greppable and editor-clickable.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(super) struct ParseError {
    message: String,
    /// The unknown key, if that is the problem (the diagnostic's key).
    key: String,
    #[source]
    source: toml::de::Error,
}

impl From<toml::de::Error> for ParseError {
    fn from(source: toml::de::Error) -> Self {
        // toml puts a hint on a second line: keep one finding on one line.
        let msg = source
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
        let message = if msg.starts_with("unknown field") {
            let hint = unknown_key_hint(&key, &msg);
            msg.replacen("unknown field", "unknown key", 1) + &hint
        } else if msg.starts_with("missing field") {
            msg.replacen("missing field", "missing key", 1)
        } else {
            msg
        };
        ParseError {
            message,
            key,
            source,
        }
    }
}

/// A value that is wrong whatever the other files say: every stage checks ids, patterns
/// and `[settings]` members through these.
#[derive(Debug, thiserror::Error)]
pub(super) enum FieldError {
    #[error("{what} {value:?} is not a valid id: use 1-128 characters from letters, digits and . _ : @ / -, starting with a letter or digit")]
    InvalidId { what: &'static str, value: String },
    #[error(
        "{0:?} is not a valid pattern: use an exact id, a prefix glob ending in \".*\", or \"*\""
    )]
    InvalidPattern(String),
    #[error("unknown {what} {value:?}{hint}: [settings] defines {known}")]
    UnknownMember {
        what: &'static str,
        value: String,
        hint: String,
        known: String,
    },
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
    crate::suggest::did_you_mean(key, expected)
        .map(|k| format!("; did you mean `{k}`?"))
        .unwrap_or_default()
}

/// A file's parse result: the raw form (if it parsed) and its parse diagnostics.
pub(super) type Parsed<T> = (Option<T>, Vec<Diagnostic>);

/// Parse each file as TOML into `T`, on up to `available_parallelism` threads.
///
/// TOML parsing is about two thirds of loading a large set (10,000 rules: ~100 of ~160 ms on
/// one core), and the files are independent. Results come back in file order, so the
/// outcome is exactly that of a sequential parse.
pub(super) fn parse_files<T: for<'de> Deserialize<'de> + Send>(
    files: &[&Source],
) -> Vec<Parsed<T>> {
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

pub(super) fn strings(v: &[S]) -> Vec<String> {
    v.iter().map(|s| s.get_ref().clone()).collect()
}
