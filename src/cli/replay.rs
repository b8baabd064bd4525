//! `hall replay`: impact analysis of a policy edit over the recorded audit log.
//!
//! Every recorded route decision (allowed, denied, dry run) is decided again, with the
//! engine's own [`decide`], under the candidate registry and policy files; the old and new
//! outcomes are counted by transition and a few examples of each change are kept. Records of
//! other kinds (reloads, tokens, secrets) are not requests and are passed over.
//!
//! The log is read offline, straight from the state dir, through the public [`AuditLog`]
//! query API (never by parsing stored bytes). sled locks its directory, so the daemon must be
//! stopped; a locked state dir is reported as such. Nothing is appended to the log and no
//! network call is made.
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
use crate::store::audit::{AuditConfig, AuditLog, AuditQuery, AuditRecord, RecordKind, MAX_QUERY_LIMIT};

/// `hall replay` arguments.
#[derive(Debug, Args)]
#[command(after_help = "\
Reads the audit log directly from the state dir. The daemon must be stopped first: sled \
locks the state dir while the daemon runs, and replay says so instead of waiting. \
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
    let window = Window {
        since_ms: a.since.as_deref().map(|s| parse_time(s, now)).transpose()?,
        until_ms: a.until.as_deref().map(|s| parse_time(s, now)).transpose()?,
        tenant_id: a.tenant.clone(),
        capability_id: a.capability.clone(),
    };
    let loaded = load_dirs(&cfg.registry_dir, &cfg.policies_dir).map_err(|e| {
        format!("the candidate policy set does not load (run `hall check`):\n{e}")
    })?;
    let log = open_log(&cfg.state_dir)?;
    let started = Instant::now();
    let report = replay(&log, &loaded.snapshot, &window, a.limit);
    log.shutdown();
    let report = report?;
    let elapsed = started.elapsed();
    match a.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => print_text(&report, elapsed),
    }
    Ok(if a.fail_on_change && report.changed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Open the audit log in `state_dir` for reading, without creating anything and without
/// waiting for a lock the daemon holds.
pub fn open_log(state_dir: &Path) -> Result<AuditLog, Box<dyn std::error::Error>> {
    let db_path = state_dir.join("db");
    if !db_path.is_dir() {
        return Err(format!(
            "no audit log in {} (expected {}): give the daemon's --state-dir",
            state_dir.display(),
            db_path.display()
        )
        .into());
    }
    let db = crate::store::open_db_waiting(&db_path, Duration::ZERO).map_err(|e| {
        if e.to_string().contains("could not acquire lock")
            || e.to_string().contains("WouldBlock")
        {
            format!(
                "the audit log in {} is locked: a running daemon holds it. Stop the daemon \
                 (e.g. `systemctl --user stop hall`), replay, then start it again",
                state_dir.display()
            )
        } else {
            format!("cannot open the audit log in {}: {e}", state_dir.display())
        }
    })?;
    Ok(AuditLog::open(&db, AuditConfig::default())?)
}

/// Replay every recorded route decision in `window` under `snap`, keeping at most
/// `examples` examples per change.
pub fn replay(
    log: &AuditLog,
    snap: &Snapshot,
    window: &Window,
    examples: usize,
) -> Result<Report, Box<dyn std::error::Error>> {
    // Reader thread: pages of decoded records, a few pages ahead of the decider.
    let (tx, rx) = mpsc::sync_channel::<Vec<AuditRecord>>(4);
    let reader_log = log.clone();
    let q = AuditQuery {
        tenant_id: window.tenant_id.clone(),
        capability_id: window.capability_id.clone(),
        kind: Some(RecordKind::Decision),
        since_ms: window.since_ms,
        until_ms: window.until_ms,
        limit: MAX_QUERY_LIMIT,
        ..Default::default()
    };
    let reader = std::thread::Builder::new()
        .name("hall-replay-reader".into())
        .spawn(move || -> Result<(), String> {
            let mut q = q;
            loop {
                let page = reader_log.query(&q).map_err(|e| e.to_string())?;
                let Some(last) = page.last() else {
                    return Ok(());
                };
                q.after_seq = Some(last.seq);
                if tx.send(page).is_err() {
                    return Ok(());
                }
            }
        })?;

    let mut groups: HashMap<(Outcome, Outcome), Transition> = HashMap::new();
    let (mut replayed, mut changed, mut skipped) = (0u64, 0u64, 0u64);
    let (mut first_seq, mut last_seq) = (None, None);
    for page in rx {
        for r in page {
            let e = &r.entry;
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
    reader
        .join()
        .map_err(|_| "the audit reader thread panicked")?
        .map_err(|e| format!("cannot read the audit log: {e}"))?;

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
    println!("{} would change, {} would not", r.changed, r.replayed - r.changed);
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
/// RFC 3339 time. Hand-written: four units are all it takes, and it keeps the format the
/// same as the other durations in hall.toml.
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
    {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let bad = || {
        format!(
            "{s:?} is neither a duration (e.g. 90s, 30m, 24h, 7d) nor an RFC 3339 time \
             (e.g. 2026-11-23T09:30:00Z)"
        )
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let unit_ms: i64 = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    let back = n.checked_mul(unit_ms).ok_or_else(bad)?;
    Ok(now_ms.saturating_sub(back))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for bad in ["", "h", "24", "24x", "-1h", "1.5h", "yesterday", "99999999999999999999d"] {
            assert!(parse_time(bad, now).is_err(), "{bad:?} should be refused");
        }
    }
}
