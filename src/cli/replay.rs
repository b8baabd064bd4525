//! `hall replay`: impact analysis of a policy edit over the recorded audit log.
//!
//! Every recorded route decision (allowed, denied, dry run) is decided again, with the
//! engine's own [`decide`], under the candidate registry and policy files; the old and new
//! outcomes are counted by transition and a few examples of each change are kept. Records of
//! other kinds (reloads, tokens, secrets) are not requests and are passed over.
//!
//! The log is read straight from the state dir through the public [`AuditLog`] query API
//! (never by parsing stored bytes) when the daemon is stopped: sled locks its directory while
//! the daemon runs. Then (`--source auto`, the default) replay pages the same records out of
//! the running daemon's `GET /api/audit` on loopback, with a token that has the `audit` scope.
//! Nothing is appended to the log and no other call is made.
//!
//! Reading and deciding run on two threads: one pages records out of sled (decoding them),
//! the other decides and counts, so on a two-core machine the read is not the bottleneck.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::Serialize;

use super::{CliResult, FilesArgs};
use crate::config::{Config, Flags};
use crate::engine::{decide, Request, Snapshot};
use crate::load::load_dirs;
use crate::store::audit::{
    AuditConfig, AuditLog, AuditQuery, AuditRecord, RecordKind, MAX_QUERY_LIMIT,
};

/// `hall replay` arguments.
#[derive(Debug, Args)]
#[command(after_help = "\
Where the records come from (--source):
  state-dir  read the audit log directly from the state dir; the daemon must be stopped
             (sled locks the directory while it runs). Fastest.
  api        ask the running daemon: GET /api/audit at --url or HALL_URL
             (default http://<listen> from hall.toml), with HALL_TOKEN or the admin token file;
             the token needs the `audit` scope (a tenant-bound one sees its tenant only).
  auto       (default) the state dir, or the API when a running daemon holds it.
Nothing is written to the audit log.

Typical use, before saving an edit to the live policy dir:
  hall check --policies ./candidate
  hall replay --policies ./candidate --since 24h
  hall replay --policies ./candidate --fail-on-change   # in CI")]
pub struct ReplayArgs {
    #[command(flatten)]
    pub files: FilesArgs,
    /// State directory holding the audit log (default as for `hall serve`).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Only decisions at or after this time: a duration back from now (`90s`, `30m`, `24h`,
    /// `7d`) or an RFC 3339 time. Default: the whole log.
    #[arg(long, value_name = "DURATION|TIME")]
    pub since: Option<String>,
    /// Only decisions at or before this time (same forms as --since).
    #[arg(long, value_name = "DURATION|TIME")]
    pub until: Option<String>,
    /// Only decisions for this tenant.
    #[arg(long, value_name = "ID")]
    pub tenant: Option<String>,
    /// Only decisions for this capability.
    #[arg(long, value_name = "ID")]
    pub capability: Option<String>,
    /// Examples shown per change (with their decision ids).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub limit: usize,
    /// Exit 1 when any decision would change (for CI on a policy repository).
    #[arg(long)]
    pub fail_on_change: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Where to read the recorded decisions (see below).
    #[arg(long, value_enum, default_value_t = Source::Auto)]
    pub source: Source,
    /// Daemon URL for --source api/auto (also HALL_URL; default: http://<listen> from hall.toml, else http://127.0.0.1:8765).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
}

/// Where `hall replay` reads the recorded decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Source {
    Auto,
    StateDir,
    Api,
}

/// Output format of `hall replay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// One side of a transition: what a decision came to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// Allowed, to this worker.
    Allowed { worker_id: String },
    /// Denied, for this reason.
    Denied { deny_reason: String },
    /// The candidate files cannot decide the request at all (e.g. its env or label is no
    /// longer in `[settings]`): the daemon would answer 400.
    Invalid { field: String },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Allowed { worker_id } => write!(f, "allowed {worker_id}"),
            Outcome::Denied { deny_reason } => write!(f, "denied {deny_reason}"),
            Outcome::Invalid { field } => write!(f, "invalid request ({field})"),
        }
    }
}

/// One replayed decision shown as an example of a change.
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    pub decision_id: Option<String>,
    pub seq: u64,
    pub time: Option<String>,
    pub tenant_id: String,
    pub capability_id: String,
    pub env: String,
    pub data_label: String,
    pub dry_run: bool,
    pub old_rule_id: Option<String>,
    pub new_rule_id: Option<String>,
}

/// All decisions that went from `old` to `new`.
#[derive(Debug, Clone, Serialize)]
pub struct Transition {
    pub old: Outcome,
    pub new: Outcome,
    pub changed: bool,
    pub count: u64,
    pub examples: Vec<Example>,
}

/// What `hall replay` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub policy_version: String,
    /// Route decisions replayed.
    pub replayed: u64,
    /// Of those, how many would come out differently.
    pub changed: u64,
    /// Decision records that do not name a complete request (not replayed).
    pub skipped: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Changed transitions first (largest first), then unchanged ones.
    pub transitions: Vec<Transition>,
}

/// Which records to replay.
#[derive(Debug, Clone, Default)]
pub struct Window {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub tenant_id: Option<String>,
    pub capability_id: Option<String>,
}

pub(super) fn run(a: &ReplayArgs) -> CliResult {
    let cfg = Config::resolve(&Flags {
        config: a.files.config.clone(),
        registry_dir: a.files.registry.clone(),
        policies_dir: a.files.policies.clone(),
        state_dir: a.state_dir.clone(),
        ..Default::default()
    })?;
    let now = crate::store::audit::now_ms();
    let time = |flag: &'static str, v: &Option<String>| {
        v.as_deref()
            .map(|s| parse_time(s, now).map_err(|message| ReplayError::Time { flag, message }))
            .transpose()
    };
    let window = Window {
        since_ms: time("since", &a.since)?,
        until_ms: time("until", &a.until)?,
        tenant_id: a.tenant.clone(),
        capability_id: a.capability.clone(),
    };
    let loaded = load_dirs(&cfg.registry_dir, &cfg.policies_dir).map_err(ReplayError::Load)?;
    let started = Instant::now();
    let report = match a.source {
        Source::StateDir => replay_state_dir(&cfg.state_dir, &loaded.snapshot, &window, a.limit)?,
        Source::Api => {
            let pages = api_pages(a, &window)?;
            replay_pages(pages, &loaded.snapshot, a.limit)?
        }
        Source::Auto => {
            match open_log(&cfg.state_dir) {
                Ok(log) => {
                    let r = replay(&log, &loaded.snapshot, &window, a.limit);
                    log.shutdown();
                    r?
                }
                Err(OpenError::Locked(_)) => {
                    eprintln!("hall: the daemon holds the state dir; reading the audit log through its API");
                    let pages = api_pages(a, &window)?;
                    replay_pages(pages, &loaded.snapshot, a.limit)?
                }
                Err(e) => return Err(ReplayError::Open(e).into()),
            }
        }
    };
    let elapsed = started.elapsed();
    match a.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(ReplayError::Report)?
        ),
        Format::Text => print_text(&report, elapsed),
    }
    Ok(if a.fail_on_change && report.changed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Why `hall replay` could not replay (each exits 1, see docs/replay.md; a bad `hall.toml`
/// is a usage error before any of these).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// `--since`/`--until` is neither a duration nor a time.
    #[error("--{flag}: {message}")]
    Time { flag: &'static str, message: String },
    /// The candidate files do not load.
    #[error("the candidate policy set does not load (run `hall check`)")]
    Load(#[source] crate::load::LoadError),
    /// The audit log in the state dir cannot be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The daemon or its token cannot be found for `--source api`.
    #[error(transparent)]
    Client(Box<super::CliError>),
    /// No token to send to the API.
    #[error("no token for the API: set HALL_TOKEN to a token with the audit scope")]
    NoToken,
    /// The API refused (a token without the audit scope, a tenant-bound token, ...).
    #[error(
        "{url}/api/audit answered {status}: {message} (replay needs a token with the audit scope)"
    )]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    /// The API could not be reached.
    #[error(
        "cannot reach the daemon at {url}: {}",
        super::error::transport_reason(source)
    )]
    Unreachable {
        url: String,
        #[source]
        source: Box<ureq::Transport>,
    },
    /// The API answered something that is not a page of records.
    #[error("unexpected answer from {url}/api/audit")]
    Answer {
        url: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading the audit log in the state dir failed.
    #[error("cannot read the audit log")]
    Read(#[source] crate::store::audit::AuditError),
    /// The reader thread could not start.
    #[error("cannot start the audit reader thread")]
    Thread(#[source] std::io::Error),
    /// The reader thread panicked.
    #[error("the audit reader thread panicked")]
    Panicked,
    /// The JSON report could not be encoded.
    #[error("cannot encode the report as JSON")]
    Report(#[source] serde_json::Error),
}

impl ReplayError {
    /// What to do next, when the error can say (see [`super::CliError::help`]).
    pub fn help(&self) -> Option<String> {
        match self {
            ReplayError::Client(e) => e.help(),
            ReplayError::Unreachable { .. } => Some(
                "  fix: is `hall serve` running there? Name it with --url or HALL_URL, or stop \
                 it and replay from the state dir (--source state-dir)"
                    .to_string(),
            ),
            _ => None,
        }
    }
}

/// Why the audit log in a state dir cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no audit log in {0} (expected {0}/db): give the daemon's --state-dir")]
    Missing(String),
    #[error("the audit log in {0} is locked: a running daemon holds it. Stop the daemon (e.g. `systemctl --user stop hall`) and replay again, or use --source api")]
    Locked(String),
    #[error("cannot open the database in {dir}")]
    Database {
        dir: String,
        #[source]
        source: sled::Error,
    },
    #[error("cannot open the audit log in {dir}")]
    Log {
        dir: String,
        #[source]
        source: crate::store::audit::AuditError,
    },
}

/// Open the audit log in `state_dir` for reading, without creating anything and without
/// waiting for a lock the daemon holds.
pub fn open_log(state_dir: &Path) -> Result<AuditLog, OpenError> {
    let shown = state_dir.display().to_string();
    let db_path = state_dir.join("db");
    if !db_path.is_dir() {
        return Err(OpenError::Missing(shown));
    }
    let db = crate::store::open_db_waiting(&db_path, Duration::ZERO).map_err(|e| {
        let text = e.to_string();
        if text.contains("could not acquire lock") || text.contains("WouldBlock") {
            OpenError::Locked(shown.clone())
        } else {
            OpenError::Database {
                dir: shown.clone(),
                source: e,
            }
        }
    })?;
    AuditLog::open(&db, AuditConfig::default())
        .map_err(|source| OpenError::Log { dir: shown, source })
}

fn replay_state_dir(
    state_dir: &Path,
    snap: &Snapshot,
    window: &Window,
    examples: usize,
) -> Result<Report, ReplayError> {
    let log = open_log(state_dir)?;
    let r = replay(&log, snap, window, examples);
    log.shutdown();
    r
}

type Pages = Box<dyn Iterator<Item = Result<Vec<AuditRecord>, ReplayError>> + Send>;

/// Pages of decision records from the running daemon's `GET /api/audit`. The daemon and
/// its token are found as by every client command ([`Client`](super::client::Client)):
/// `--url`, `HALL_URL`, else `listen` in hall.toml; `HALL_TOKEN`, else the admin token file in
/// the state dir.
fn api_pages(a: &ReplayArgs, window: &Window) -> Result<Pages, ReplayError> {
    let args = super::ClientArgs {
        url: a.url.clone(),
        token: None,
        config: a.files.config.clone(),
    };
    let client = super::client::Client::from_args_in(&args, a.state_dir.clone())
        .map_err(|e| ReplayError::Client(Box::new(e)))?;
    let base = client.base_url().to_owned();
    let token = client
        .token()
        .map(str::to_owned)
        .ok_or(ReplayError::NoToken)?;
    let mut query = format!("kind=decision&limit={MAX_QUERY_LIMIT}");
    for (k, v) in [
        ("tenant_id", window.tenant_id.as_ref().map(|s| s.to_owned())),
        (
            "capability_id",
            window.capability_id.as_ref().map(|s| s.to_owned()),
        ),
        ("since", window.since_ms.map(|t| t.to_string())),
        ("until", window.until_ms.map(|t| t.to_string())),
    ] {
        if let Some(v) = v {
            query.push_str(&format!("&{k}={}", super::client::enc(&v)));
        }
    }
    let mut after: Option<u64> = None;
    let mut done = false;
    Ok(Box::new(std::iter::from_fn(move || {
        if done {
            return None;
        }
        let mut url = format!("{base}/api/audit?{query}");
        if let Some(a) = after {
            url.push_str(&format!("&after_seq={a}"));
        }
        let resp = ureq::get(&url)
            .set("Authorization", &format!("Bearer {token}"))
            .timeout(Duration::from_secs(60))
            .call();
        let page = match resp {
            Ok(r) => r
                .into_json::<ApiPage>()
                .map_err(|source| ReplayError::Answer {
                    url: base.clone(),
                    source,
                }),
            Err(ureq::Error::Status(status, r)) => {
                let body: serde_json::Value = r.into_json().unwrap_or_default();
                Err(ReplayError::Refused {
                    url: base.clone(),
                    status,
                    message: body["error"].as_str().unwrap_or("no details").to_owned(),
                })
            }
            Err(ureq::Error::Transport(t)) => Err(ReplayError::Unreachable {
                url: base.clone(),
                source: Box::new(t),
            }),
        };
        match page {
            Ok(p) if p.records.is_empty() => None,
            Ok(p) => {
                after = p.records.last().map(|r| r.seq);
                Some(Ok(p.records))
            }
            Err(e) => {
                done = true;
                Some(Err(e))
            }
        }
    })))
}

#[derive(serde::Deserialize)]
struct ApiPage {
    records: Vec<AuditRecord>,
}

/// Replay every recorded route decision in `window` under `snap`, keeping at most
/// `examples` examples per change.
pub fn replay(
    log: &AuditLog,
    snap: &Snapshot,
    window: &Window,
    examples: usize,
) -> Result<Report, ReplayError> {
    let reader_log = log.clone();
    let mut q = AuditQuery {
        tenant_id: window.tenant_id.clone(),
        capability_id: window.capability_id.clone(),
        kind: Some(RecordKind::Decision),
        since_ms: window.since_ms,
        until_ms: window.until_ms,
        limit: MAX_QUERY_LIMIT,
        ..Default::default()
    };
    let mut failed = false;
    let pages = std::iter::from_fn(move || {
        if failed {
            return None;
        }
        match reader_log.query(&q) {
            Ok(page) if page.is_empty() => None,
            Ok(page) => {
                q.after_seq = page.last().map(|r| r.seq);
                Some(Ok(page))
            }
            Err(e) => {
                failed = true;
                Some(Err(ReplayError::Read(e)))
            }
        }
    });
    replay_pages(Box::new(pages), snap, examples)
}

/// Replay pages of records (decision records; others are passed over) under `snap`.
/// The pages are produced on their own thread, a few pages ahead of the decider.
fn replay_pages(pages: Pages, snap: &Snapshot, examples: usize) -> Result<Report, ReplayError> {
    let (tx, rx) = mpsc::sync_channel::<Vec<AuditRecord>>(4);
    let reader = std::thread::Builder::new()
        .name("hall-replay-reader".into())
        .spawn(move || -> Result<(), ReplayError> {
            for page in pages {
                if tx.send(page?).is_err() {
                    break;
                }
            }
            Ok(())
        })
        .map_err(ReplayError::Thread)?;

    let mut groups: HashMap<(Outcome, Outcome), Transition> = HashMap::new();
    let (mut replayed, mut changed, mut skipped) = (0u64, 0u64, 0u64);
    let (mut first_seq, mut last_seq) = (None, None);
    for page in rx {
        for r in page {
            let e = &r.entry;
            if e.kind != RecordKind::Decision {
                continue;
            }
            let (Some(cap), Some(env), Some(label), Some(tenant), Some(allowed)) = (
                e.capability_id.as_deref(),
                e.env.as_deref(),
                e.data_label.as_deref(),
                e.tenant_id.as_deref(),
                e.allowed,
            ) else {
                skipped += 1;
                continue;
            };
            let old = if allowed {
                Outcome::Allowed {
                    worker_id: e.worker_id.clone().unwrap_or_default(),
                }
            } else {
                Outcome::Denied {
                    deny_reason: e.deny_reason.clone().unwrap_or_default(),
                }
            };
            let req = Request {
                capability_id: cap,
                env,
                data_label: label,
                tenant_id: tenant,
            };
            let (new, new_rule) = match decide(snap, &req, false) {
                Ok(d) if d.allowed => (
                    Outcome::Allowed {
                        worker_id: d.worker_id.unwrap_or_default().to_owned(),
                    },
                    d.rule_id,
                ),
                Ok(d) => (
                    Outcome::Denied {
                        deny_reason: d.deny_reason.unwrap_or_default().to_owned(),
                    },
                    d.rule_id,
                ),
                Err(err) => (
                    Outcome::Invalid {
                        field: err.field.to_owned(),
                    },
                    None,
                ),
            };
            replayed += 1;
            first_seq.get_or_insert(r.seq);
            last_seq = Some(r.seq);
            let is_change = old != new;
            if is_change {
                changed += 1;
            }
            let t = groups
                .entry((old, new))
                .or_insert_with_key(|(old, new)| Transition {
                    old: old.clone(),
                    new: new.clone(),
                    changed: is_change,
                    count: 0,
                    examples: Vec::new(),
                });
            t.count += 1;
            if is_change && t.examples.len() < examples {
                t.examples.push(Example {
                    decision_id: e.decision_id.clone(),
                    seq: r.seq,
                    time: r.time(),
                    tenant_id: tenant.to_owned(),
                    capability_id: cap.to_owned(),
                    env: env.to_owned(),
                    data_label: label.to_owned(),
                    dry_run: e.dry_run,
                    old_rule_id: e.rule_id.clone(),
                    new_rule_id: new_rule.map(str::to_owned),
                });
            }
        }
    }
    reader.join().map_err(|_| ReplayError::Panicked)??;

    let mut transitions: Vec<Transition> = groups.into_values().collect();
    transitions.sort_by(|a, b| {
        b.changed
            .cmp(&a.changed)
            .then(b.count.cmp(&a.count))
            .then_with(|| a.old.to_string().cmp(&b.old.to_string()))
            .then_with(|| a.new.to_string().cmp(&b.new.to_string()))
    });
    Ok(Report {
        policy_version: snap.version.clone(),
        replayed,
        changed,
        skipped,
        first_seq,
        last_seq,
        transitions,
    })
}

fn print_text(r: &Report, elapsed: Duration) {
    let rate = if elapsed.as_secs_f64() > 0.0 {
        r.replayed as f64 / elapsed.as_secs_f64()
    } else {
        0.0
    };
    println!(
        "replayed {} decision{} under policy version {} in {:.2} s ({:.0} decisions/s)",
        r.replayed,
        if r.replayed == 1 { "" } else { "s" },
        r.policy_version,
        elapsed.as_secs_f64(),
        rate
    );
    if let (Some(a), Some(b)) = (r.first_seq, r.last_seq) {
        println!("audit records seq {a}..={b}");
    }
    if r.skipped > 0 {
        println!(
            "skipped {} decision record(s) that do not name a complete request",
            r.skipped
        );
    }
    println!(
        "{} would change, {} would not",
        r.changed,
        r.replayed - r.changed
    );
    if r.transitions.is_empty() {
        return;
    }
    let w_old = r
        .transitions
        .iter()
        .map(|t| t.old.to_string().len())
        .max()
        .unwrap_or(0)
        .max(3);
    println!();
    println!("{:>10}  {:<w_old$}  new", "count", "old");
    for t in &r.transitions {
        let new = if t.changed {
            t.new.to_string()
        } else {
            "(unchanged)".to_owned()
        };
        println!("{:>10}  {:<w_old$}  {}", t.count, t.old.to_string(), new);
    }
    for t in r.transitions.iter().filter(|t| t.changed) {
        println!();
        println!("{} -> {}: {}", t.old, t.new, t.count);
        for x in &t.examples {
            println!(
                "  {}  {}  tenant={} capability={} env={} label={}{}  rule {} -> {}",
                x.decision_id.as_deref().unwrap_or("-"),
                x.time.as_deref().unwrap_or("-"),
                x.tenant_id,
                x.capability_id,
                x.env,
                x.data_label,
                if x.dry_run { " (dry run)" } else { "" },
                x.old_rule_id.as_deref().unwrap_or("-"),
                x.new_rule_id.as_deref().unwrap_or("-"),
            );
        }
        if t.count > t.examples.len() as u64 {
            println!("  ... and {} more", t.count - t.examples.len() as u64);
        }
    }
}

/// `--since`/`--until`: a duration back from `now_ms` (`90s`, `30m`, `24h`, `7d`) or an
/// RFC 3339 time. The duration is [`crate::clock::parse_duration`], the syntax of the rule
/// keys, with any number of digits as before that syntax was shared
/// ([`super::flag_duration`], [`super::Spelling::Strict`]).
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let bad = || {
        format!(
            "{s:?} is neither a duration (e.g. 90s, 30m, 24h, 7d) nor an RFC 3339 time \
             (e.g. 2026-11-23T09:30:00Z)"
        )
    };
    let secs = super::flag_duration(s, super::Spelling::Strict).ok_or_else(bad)?;
    let back = i64::try_from(secs)
        .ok()
        .and_then(|n| n.checked_mul(1_000))
        .ok_or_else(bad)?;
    Ok(now_ms.saturating_sub(back))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::audit::AuditEntry;

    /// Through the store API: incomplete records are skipped, a request the candidate files
    /// cannot decide is `invalid`, other kinds are passed over, and the window applies.
    #[test]
    fn replays_through_the_store_api() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let loaded = load_dirs(&root.join("registry"), &root.join("policies")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::test_db_at(&dir.path().join("db"));
        let log = AuditLog::open(&db, AuditConfig::default()).unwrap();
        let decision =
            |ts: i64, env: Option<&str>, allowed: bool, reason: Option<&str>| AuditEntry {
                tenant_id: Some("org.acme".into()),
                capability_id: Some("cap.doc.summarize".into()),
                env: env.map(Into::into),
                data_label: Some("PUBLIC".into()),
                allowed: Some(allowed),
                worker_id: allowed.then(|| "worker.doc.summarize".into()),
                deny_reason: reason.map(Into::into),
                ..AuditEntry::new(RecordKind::Decision, ts)
            };
        log.append_blocking(decision(1_000, Some("dev"), true, None))
            .unwrap();
        log.append_blocking(AuditEntry::new(RecordKind::Reload, 2_000))
            .unwrap();
        log.append_blocking(decision(3_000, None, false, Some("x")))
            .unwrap();
        log.append_blocking(decision(
            4_000,
            Some("moon"),
            false,
            Some("no_matching_rule"),
        ))
        .unwrap();
        log.append_blocking(decision(
            5_000,
            Some("dev"),
            false,
            Some("no_matching_rule"),
        ))
        .unwrap();

        let r = replay(&log, &loaded.snapshot, &Window::default(), 1).unwrap();
        assert_eq!((r.replayed, r.changed, r.skipped), (3, 2, 1));
        let find = |new: &Outcome| r.transitions.iter().find(|t| &t.new == new).unwrap();
        let invalid = find(&Outcome::Invalid {
            field: "env".into(),
        });
        assert_eq!(invalid.count, 1);
        assert_eq!(invalid.examples[0].seq, 4);
        let allowed = Outcome::Allowed {
            worker_id: "worker.doc.summarize".into(),
        };
        let flipped = r
            .transitions
            .iter()
            .find(|t| t.changed && t.new == allowed)
            .unwrap();
        assert_eq!(flipped.examples[0].seq, 5);
        assert!(flipped.examples[0].decision_id.is_some());

        let window = Window {
            since_ms: Some(4_500),
            ..Default::default()
        };
        let r = replay(&log, &loaded.snapshot, &window, 1).unwrap();
        assert_eq!((r.replayed, r.first_seq), (1, Some(5)));
        log.shutdown();
    }

    #[test]
    fn times_and_durations() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_time("90s", now), Ok(now - 90_000));
        assert_eq!(parse_time("30m", now), Ok(now - 1_800_000));
        assert_eq!(parse_time("24h", now), Ok(now - 86_400_000));
        assert_eq!(parse_time("7d", now), Ok(now - 7 * 86_400_000));
        assert_eq!(
            parse_time("2026-11-23T09:30:00.123Z", now),
            Ok(1_795_426_200_123)
        );
        for bad in [
            "",
            "h",
            "24",
            "24x",
            "-1h",
            "1.5h",
            "yesterday",
            "99999999999999999999d",
        ] {
            assert!(parse_time(bad, now).is_err(), "{bad:?} should be refused");
        }
        // More than 9 digits, as before the duration syntax was shared with the rule keys.
        assert_eq!(parse_time("1234567890s", now), Ok(now - 1_234_567_890_000));
        assert_eq!(parse_time("0000000001d", now), Ok(now - 86_400_000));
        // Still not the spellings only --expires-in takes.
        for bad in ["30 m", "+5m", "3600"] {
            let e = parse_time(bad, now).expect_err(bad);
            assert!(e.contains("is neither a duration"), "{e}");
        }
    }

    /// `--since`'s duration parser as the release before the shared syntax had it
    /// (`git show 759a2f0:src/cli/replay.rs`): the oracle of what must still parse, to the
    /// same time.
    fn previous_since(s: &str, now_ms: i64) -> Option<i64> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit())?;
        let (n, unit) = s.split_at(split);
        let n: i64 = n.parse().ok()?;
        let unit_ms: i64 = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        Some(now_ms.saturating_sub(n.checked_mul(unit_ms)?))
    }

    proptest::proptest! {
        #[test]
        fn since_agrees_with_the_previous_release(
            s in "[ +\\-0-9smhdw.]{0,24}|\\s{0,2}[0-9]{1,21}[smhdw]{1,2}\\s{0,2}"
        ) {
            let now = 1_800_000_000_000;
            proptest::prop_assert_eq!(parse_time(&s, now).ok(), previous_since(&s, now), "{:?}", s);
        }
    }
}
