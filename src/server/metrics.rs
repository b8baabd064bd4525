//! Counters and a latency histogram, rendered in the Prometheus text format.
//!
//! Everything on the request path is an atomic add; the only lock is a read lock on the
//! map of custom deny reasons (written once per new reason).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::RwLock;
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.5,
];

#[derive(Default)]
pub struct Metrics {
    allowed: AtomicU64,
    denied: RwLock<BTreeMap<String, AtomicU64>>,
    errors: RwLock<BTreeMap<&'static str, AtomicU64>>,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_ns: AtomicU64,
    reload_ok: AtomicU64,
    reload_failed: AtomicU64,
    last_good_reload_unix: AtomicU64,
}

fn bump<K: Ord>(map: &RwLock<BTreeMap<K, AtomicU64>>, key: &K, make: impl FnOnce() -> K) {
    if let Some(c) = map.read().unwrap_or_else(|e| e.into_inner()).get(key) {
        c.fetch_add(1, Relaxed);
        return;
    }
    map.write()
        .unwrap_or_else(|e| e.into_inner())
        .entry(make())
        .or_default()
        .fetch_add(1, Relaxed);
}

impl Metrics {
    pub fn decision(&self, allowed: bool, reason: Option<&str>, took: Duration) {
        if allowed {
            self.allowed.fetch_add(1, Relaxed);
        } else {
            let r = reason.unwrap_or("unknown");
            bump(&self.denied, &r.to_string(), || r.to_string());
        }
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.latency_buckets[i].fetch_add(1, Relaxed);
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_ns
            .fetch_add(took.as_nanos() as u64, Relaxed);
    }

    /// A request refused before a decision (400, 401, 429, 503 ...), by code.
    pub fn refused(&self, code: &'static str) {
        bump(&self.errors, &code, || code);
    }

    pub fn reload(&self, ok: bool, now_unix: u64) {
        if ok {
            self.reload_ok.fetch_add(1, Relaxed);
            self.last_good_reload_unix.store(now_unix, Relaxed);
        } else {
            self.reload_failed.fetch_add(1, Relaxed);
        }
    }

    pub fn allowed_total(&self) -> u64 {
        self.allowed.load(Relaxed)
    }

    pub fn denied_total(&self) -> u64 {
        self.denied
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|c| c.load(Relaxed))
            .sum()
    }

    /// The Prometheus text exposition. `policy_loaded` and `reload_errors` describe the
    /// current state so an alert can fire on a broken edit.
    pub fn render(&self, policy_loaded: bool, last_reload_failed: bool) -> String {
        let mut s = String::with_capacity(2048);
        s.push_str("# HELP hall_decisions_total Route decisions by outcome and deny reason.\n");
        s.push_str("# TYPE hall_decisions_total counter\n");
        let _ = writeln!(
            s,
            "hall_decisions_total{{outcome=\"allowed\",reason=\"\"}} {}",
            self.allowed.load(Relaxed)
        );
        for (r, c) in self.denied.read().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                s,
                "hall_decisions_total{{outcome=\"denied\",reason=\"{}\"}} {}",
                esc(r),
                c.load(Relaxed)
            );
        }
        s.push_str("# HELP hall_route_errors_total Requests refused before a decision, by error code (route errors, and gate refusals on any endpoint).\n");
        s.push_str("# TYPE hall_route_errors_total counter\n");
        for (r, c) in self.errors.read().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                s,
                "hall_route_errors_total{{code=\"{r}\"}} {}",
                c.load(Relaxed)
            );
        }
        s.push_str(
            "# HELP hall_decision_duration_seconds Time to decide (and record) a route request.\n",
        );
        s.push_str("# TYPE hall_decision_duration_seconds histogram\n");
        let mut cum = 0;
        for (b, c) in BUCKETS.iter().zip(&self.latency_buckets) {
            cum += c.load(Relaxed);
            let _ = writeln!(
                s,
                "hall_decision_duration_seconds_bucket{{le=\"{b}\"}} {cum}"
            );
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(
            s,
            "hall_decision_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            s,
            "hall_decision_duration_seconds_sum {}",
            self.latency_sum_ns.load(Relaxed) as f64 / 1e9
        );
        let _ = writeln!(s, "hall_decision_duration_seconds_count {count}");
        s.push_str("# HELP hall_reloads_total Policy reloads by result.\n# TYPE hall_reloads_total counter\n");
        let _ = writeln!(
            s,
            "hall_reloads_total{{result=\"ok\"}} {}",
            self.reload_ok.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "hall_reloads_total{{result=\"error\"}} {}",
            self.reload_failed.load(Relaxed)
        );
        s.push_str("# HELP hall_last_good_reload_timestamp_seconds Unix time of the last successful load.\n");
        s.push_str("# TYPE hall_last_good_reload_timestamp_seconds gauge\n");
        let _ = writeln!(
            s,
            "hall_last_good_reload_timestamp_seconds {}",
            self.last_good_reload_unix.load(Relaxed)
        );
        s.push_str("# HELP hall_policy_loaded Whether a policy set is loaded (1) or not (0).\n# TYPE hall_policy_loaded gauge\n");
        let _ = writeln!(s, "hall_policy_loaded {}", u8::from(policy_loaded));
        s.push_str("# HELP hall_last_reload_failed Whether the last reload attempt failed (the previous set is still serving).\n# TYPE hall_last_reload_failed gauge\n");
        let _ = writeln!(
            s,
            "hall_last_reload_failed {}",
            u8::from(last_reload_failed)
        );
        s
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
