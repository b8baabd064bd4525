//! The CLI's one error type: every way a `hall` command can fail, each keeping what caused it
//! (`source()`), saying what to do next where it can ([`CliError::help`]), and standing for
//! one documented exit code ([`CliError::exit_code`], the only place a code is chosen from an
//! error).
//!
//! `hall` prints an error as [`CliError::report`]: the message, then each cause in the
//! chain as `  caused by: …` (a cause whose text is already shown is not repeated: many
//! errors, ours and our dependencies', spell their cause out in their own message), then what
//! to do.

use std::path::PathBuf;

use super::exit;
use super::fixtures::FixtureError;
use super::import::ImportError;
use super::replay::ReplayError;
use crate::config::ConfigError;
use crate::engine::RequestError;
use crate::server::ServeError;
use crate::store::audit::AuditError;

/// Why a `hall` command failed. The exit code of each variant is in [`CliError::exit_code`].
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A flag value or combination refused before anything is done (exit 2).
    #[error("{0}")]
    Usage(String),
    /// `hall.toml` or a `HALL_*` variable cannot be used (exit 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `--context` is not JSON (exit 2).
    #[error("--context is not JSON")]
    ContextJson(#[source] serde_json::Error),
    /// `hall route --offline`: the files cannot decide this request at all, e.g. an env not
    /// in `[settings]` (exit 2, as the daemon's 400).
    #[error("invalid request: {source}{hint}")]
    InvalidRequest {
        #[source]
        source: RequestError,
        /// `" (did you mean \"prod\"?)"`, or empty.
        hint: String,
    },
    /// A flag that takes an RFC 3339 time got something else (exit 2).
    #[error("--{flag} {value:?} is not an RFC 3339 time (for example 2026-11-29T08:00:00Z)")]
    BadTime {
        flag: &'static str,
        value: String,
        #[source]
        source: time::error::Parse,
    },
    /// `--state-dir` names a directory with no audit log in it (exit 2).
    #[error("{} holds no audit log ({} does not exist): give the state dir of a Hall daemon", dir.display(), dir.join("db").display())]
    NoAuditLog { dir: PathBuf },

    /// The daemon could not be reached (exit 3).
    #[error(
        "cannot reach the daemon at {url} (from {origin}; {config_note}): {}",
        transport_reason(source)
    )]
    Unreachable {
        url: String,
        /// How the URL was chosen: `--url`, `HALL_URL`, `listen in FILE`, the default.
        origin: String,
        /// How the config was found (`config FILE (from …)` or `no config file`).
        config_note: String,
        #[source]
        source: Box<ureq::Transport>,
    },
    /// The daemon's answer could not be read to its end (exit 3).
    #[error("cannot read the daemon's answer from {url}")]
    Answer {
        url: String,
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered with an error status; the exit code follows the status (400, 413,
    /// 415: 2; 401, 403, 429, 5xx: 3; any other: 1).
    #[error("{message} (HTTP {status}{}{code})", if code.is_empty() { "" } else { " " })]
    Http {
        status: u16,
        /// The answer's `error`, or its text.
        message: String,
        /// The answer's `code` (`unauthorized`, `approval_conflict`, …), or empty.
        code: String,
        /// For 401 and 403: which token was sent and what to do (`  token: …\n  fix: …`).
        help: Option<String>,
    },

    /// An offline state dir's database is held by a running daemon (exit 1).
    #[error("{} is in use by a running daemon (its database is locked)", dir.display())]
    StateDirInUse {
        dir: PathBuf,
        #[source]
        source: sled::Error,
    },
    /// An offline state dir's database would not open (exit 1).
    #[error("cannot open the database in {}", dir.display())]
    OpenDatabase {
        dir: PathBuf,
        #[source]
        source: sled::Error,
    },
    /// An offline state dir's audit log would not open (exit 1).
    #[error("cannot open the audit log in {}", dir.display())]
    OpenAuditLog {
        dir: PathBuf,
        #[source]
        source: AuditError,
    },
    /// Reading (verifying) or exporting an offline audit log failed (exit 1).
    #[error("{what} the audit log")]
    Audit {
        /// "reading", "exporting".
        what: &'static str,
        #[source]
        source: AuditError,
    },
    /// The registry and policy files do not load (exit 1).
    #[error("the policy set does not load ({} error{}; read {sources})", source.errors().count(), if source.errors().count() == 1 { "" } else { "s" })]
    PolicyLoad {
        /// Which directories (and config) were read.
        sources: String,
        #[source]
        source: crate::load::LoadError,
    },
    /// A fixture file for `hall test` cannot be used (exit 1).
    #[error(transparent)]
    Fixture(#[from] FixtureError),
    /// `hall import` cannot read its input or write its output (exit 1).
    #[error(transparent)]
    Import(#[from] ImportError),
    /// `hall replay` failed after reading its flags (exit 1, as docs/replay.md says).
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// `hall serve` could not start or stopped on an error (exit 1).
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The value read for `hall secret set` cannot be stored; nothing was sent (exit 1).
    #[error("{0}: nothing stored")]
    SecretValue(String),
    /// Reading or writing a file or a standard stream failed (exit 1).
    #[error("{what}")]
    Io {
        /// What was being done: "cannot create out.jsonl", "writing to stdout".
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Encoding JSON for output failed (exit 1).
    #[error("{what}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl CliError {
    /// A usage error (exit 2) with this message.
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError::Usage(message.into())
    }

    /// An I/O failure while doing `what` ("cannot create FILE", "writing to stdout").
    pub fn io(what: impl Into<String>, source: std::io::Error) -> CliError {
        CliError::Io {
            what: what.into(),
            source,
        }
    }

    /// A JSON encoding failure while doing `what`.
    pub fn json(what: &'static str, source: serde_json::Error) -> CliError {
        CliError::Json { what, source }
    }

    /// The documented exit code this error stands for (see [`exit`]): chosen here and
    /// nowhere else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_)
            | CliError::Config(_)
            | CliError::ContextJson(_)
            | CliError::InvalidRequest { .. }
            | CliError::BadTime { .. }
            | CliError::NoAuditLog { .. } => exit::USAGE,
            CliError::Unreachable { .. } | CliError::Answer { .. } => exit::DAEMON,
            CliError::Http { status, .. } => match status {
                400 | 413 | 415 => exit::USAGE,
                401 | 403 | 429 | 500..=599 => exit::DAEMON,
                _ => exit::FAILURE,
            },
            CliError::StateDirInUse { .. }
            | CliError::OpenDatabase { .. }
            | CliError::OpenAuditLog { .. }
            | CliError::Audit { .. }
            | CliError::PolicyLoad { .. }
            | CliError::Fixture(_)
            | CliError::Import(_)
            | CliError::Replay(_)
            | CliError::Serve(_)
            | CliError::SecretValue(_)
            | CliError::Io { .. }
            | CliError::Json { .. } => exit::FAILURE,
        }
    }

    /// What to do next, when this error can say: lines indented by two spaces, printed after
    /// the causes.
    pub fn help(&self) -> Option<String> {
        match self {
            CliError::Unreachable { .. } => Some(
                "  fix: is `hall serve` running there? Start it, or point elsewhere with --url or \
                 HALL_URL, or name the daemon's hall.toml with --config or HALL_CONFIG."
                    .to_string(),
            ),
            CliError::Http { help, .. } => help.clone(),
            CliError::StateDirInUse { dir, .. } => Some(format!(
                "  fix: ask the daemon with `hall audit verify` (no --state-dir), or stop it first, \
                 or work on a copy: cp -a {} /tmp/hall-copy && hall audit verify --state-dir /tmp/hall-copy",
                dir.display()
            )),
            CliError::PolicyLoad { .. } => Some(
                "  fix: `hall check` shows each error with its source line".to_string(),
            ),
            CliError::Import(e) => e.help(),
            CliError::Replay(e) => e.help(),
            _ => None,
        }
    }

    /// The whole text `hall` prints after `hall: `: the message, each cause not already
    /// shown as `  caused by: …` (further lines of a cause indented under it), then
    /// [`help`](Self::help).
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            let text = c.to_string();
            let text = text.trim_end();
            if !text.is_empty() && !out.contains(text) {
                out.push_str("\n  caused by: ");
                out.push_str(&text.replace('\n', "\n    "));
            }
            cause = c.source();
        }
        if let Some(help) = self.help() {
            out.push('\n');
            out.push_str(&help);
        }
        out
    }
}

/// The part of a transport error a person needs ("Connection refused (os error 111)"): ureq
/// puts the URL and its own labels first, and the message names the URL already.
pub(super) fn transport_reason(e: &ureq::Transport) -> String {
    let s = e.to_string();
    match s.rsplit_once(": ") {
        Some((_, tail)) if !tail.is_empty() => tail.to_string(),
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transport error as ureq makes one for a refused connection: a real one, from a port
    /// nothing listens on.
    fn refused() -> Box<ureq::Transport> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        match ureq::get(&format!("http://127.0.0.1:{port}/api/status")).call() {
            Err(ureq::Error::Transport(t)) => Box::new(t),
            other => panic!("expected a transport error, got {other:?}"),
        }
    }

    #[test]
    fn an_unreachable_daemon_keeps_the_transport_error_and_says_what_to_do() {
        let e = CliError::Unreachable {
            url: "http://127.0.0.1:1".into(),
            origin: "--url".into(),
            config_note: "no config file".into(),
            source: refused(),
        };
        assert_eq!(e.exit_code(), exit::DAEMON);
        let io = std::error::Error::source(&e)
            .and_then(|c| c.source())
            .and_then(|c| c.downcast_ref::<std::io::Error>())
            .expect("the io error is in the chain");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        let r = e.report();
        let first = r.lines().next().unwrap();
        assert!(
            first.starts_with(
                "cannot reach the daemon at http://127.0.0.1:1 (from --url; no config file): "
            ) && first.to_lowercase().contains("connection refused"),
            "{r}"
        );
        assert!(r.contains("\n  caused by: "), "{r}");
        assert!(
            r.ends_with("name the daemon's hall.toml with --config or HALL_CONFIG."),
            "the fix comes last: {r}"
        );
        // The io error's text is in the first line already: not printed again.
        let io_text = io.to_string();
        assert_eq!(r.matches(io_text.as_str()).count(), 2, "{r}");
    }

    #[test]
    fn http_statuses_map_to_the_documented_codes() {
        let http = |status| CliError::Http {
            status,
            message: "m".into(),
            code: "c".into(),
            help: None,
        };
        for (status, code) in [
            (400, exit::USAGE),
            (413, exit::USAGE),
            (415, exit::USAGE),
            (401, exit::DAEMON),
            (403, exit::DAEMON),
            (429, exit::DAEMON),
            (500, exit::DAEMON),
            (503, exit::DAEMON),
            (404, exit::FAILURE),
            (409, exit::FAILURE),
            (422, exit::FAILURE),
        ] {
            assert_eq!(http(status).exit_code(), code, "HTTP {status}");
        }
        assert_eq!(http(409).to_string(), "m (HTTP 409 c)");
        let bare = CliError::Http {
            status: 502,
            message: "bad gateway".into(),
            code: String::new(),
            help: None,
        };
        assert_eq!(bare.to_string(), "bad gateway (HTTP 502)");
    }

    #[test]
    fn io_causes_are_printed_and_not_repeated() {
        let e = CliError::io(
            "cannot create /nonexistent/out.jsonl",
            std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory"),
        );
        assert_eq!(e.exit_code(), exit::FAILURE);
        assert_eq!(
            e.report(),
            "cannot create /nonexistent/out.jsonl\n  caused by: No such file or directory"
        );
        // A config error spells its cause out in its message: the chain does not repeat it.
        let e = CliError::Config(ConfigError::Read {
            path: "/x/hall.toml".into(),
            origin: crate::config::ConfigOrigin::Flag,
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "Permission denied"),
        });
        assert_eq!(e.exit_code(), exit::USAGE);
        assert!(!e.report().contains("caused by"), "{}", e.report());
        assert!(e.report().contains("Permission denied"), "{}", e.report());
    }

    /// "1 error" or "N errors", as the message counts them.
    fn e_count(r: &str) -> &str {
        let start = r.find('(').unwrap() + 1;
        &r[start..r.find(';').unwrap()]
    }

    #[test]
    fn a_multi_line_cause_is_indented_under_its_label() {
        let loaded = crate::load::load_sources(
            &[],
            &[crate::load::Source {
                name: "p.toml".into(),
                text: "[[rule]\n".into(),
            }],
        );
        let Err(source) = loaded else {
            panic!("a broken file loads")
        };
        let e = CliError::PolicyLoad {
            sources: "registry r, policies p".into(),
            source,
        };
        assert_eq!(e.exit_code(), exit::FAILURE);
        let r = e.report();
        let n = e_count(&r);
        assert!(
            r.starts_with(&format!(
                "the policy set does not load ({n}; read registry r, policies p)\n  caused by: p.toml:1:"
            )),
            "{r}"
        );
        assert!(
            r.ends_with("  fix: `hall check` shows each error with its source line"),
            "{r}"
        );
    }
}
