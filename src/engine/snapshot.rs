//! The compiled, immutable policy set a decision is made against.

use std::collections::HashMap;
use std::fmt;

use serde::Serialize;

/// Environments and data labels in force (`[settings]`), labels in ascending sensitivity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Settings {
    pub environments: Vec<String>,
    pub data_labels: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            environments: ["dev", "staging", "prod"].map(String::from).to_vec(),
            data_labels: ["PUBLIC", "INTERNAL", "CONFIDENTIAL", "SECRET"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// Where something was defined, for messages a person can jump to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.file)
        } else {
            write!(f, "{}:{}:{}", self.file, self.line, self.col)
        }
    }
}

/// A capability the registry knows.
#[derive(Debug, Clone, Serialize)]
pub struct Capability {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contact: Option<String>,
}

/// A worker: who can do a capability, where, on what data, how safely.
#[derive(Debug, Clone, Serialize)]
pub struct Worker {
    pub id: String,
    pub capabilities: Vec<String>,
    pub environments: Vec<String>,
    pub max_data_label: String,
    pub controls: Vec<String>,
    pub blast_radius: u8,
    pub secrets: Vec<String>,
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contact: Option<String>,
    #[serde(skip)]
    pub(crate) compiled: CompiledWorker,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct CompiledWorker {
    /// Capability indices offered, sorted.
    pub caps: Vec<u32>,
    pub env_mask: u64,
    pub max_label: u8,
    /// Control indices implemented, sorted.
    pub controls: Vec<u32>,
}

/// A rule's effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    Deny,
    RequireApproval,
}

/// How the approvals a `require_approval` rule opens behave (rule keys `approval_ttl`,
/// `approvers_required`, `auto_approve_after`, `approval_use`). Durations in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct ApprovalSettings {
    /// How long an approval may stay pending (default 15 minutes).
    pub ttl_secs: u64,
    /// Distinct approvers needed (default 1).
    pub approvers_required: u32,
    /// The veto window: approved when nobody denies within it.
    pub auto_approve_after_secs: Option<u64>,
    /// `None`: single use (`"once"`); `Some(s)`: the approved digest may be routed again for
    /// `s` seconds after approval.
    pub use_window_secs: Option<u64>,
}

impl Default for ApprovalSettings {
    fn default() -> Self {
        ApprovalSettings {
            ttl_secs: 15 * 60,
            approvers_required: 1,
            auto_approve_after_secs: None,
            use_window_secs: None,
        }
    }
}

/// An id pattern: exact, a prefix glob ending in `.*`, or `*` (any).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    Any,
    Exact(String),
    /// The prefix including its trailing dot: `cap.doc.*` is stored as `cap.doc.`.
    Prefix(String),
}

impl Pattern {
    /// Parse a pattern; `None` if it is not an id, `*`, or `<id>.*`.
    pub fn parse(s: &str) -> Option<Pattern> {
        if s == "*" {
            return Some(Pattern::Any);
        }
        if let Some(stem) = s.strip_suffix(".*") {
            return crate::engine::valid_id(stem).then(|| Pattern::Prefix(format!("{stem}.")));
        }
        crate::engine::valid_id(s).then(|| Pattern::Exact(s.to_string()))
    }

    #[inline]
    pub fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => e == s,
            Pattern::Prefix(p) => s.len() > p.len() && s.starts_with(p.as_str()),
        }
    }

    /// Whether every id this pattern matches is also matched by `self`.
    pub fn covers(&self, other: &Pattern) -> bool {
        match (self, other) {
            (Pattern::Any, _) => true,
            (_, Pattern::Any) => false,
            (Pattern::Exact(a), Pattern::Exact(b)) => a == b,
            (Pattern::Exact(_), Pattern::Prefix(_)) => false,
            (Pattern::Prefix(p), Pattern::Exact(b)) => self.matches(b) && b.len() > p.len(),
            (Pattern::Prefix(p), Pattern::Prefix(q)) => q.starts_with(p.as_str()),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Exact(e) => f.write_str(e),
            Pattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A policy rule, in the order it was read.
#[derive(Debug, Clone, Serialize)]
pub struct Rule {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub capabilities: Vec<Pattern>,
    pub envs: Option<Vec<String>>,
    pub data_labels: Option<Vec<String>>,
    pub max_data_label: Option<String>,
    pub tenants: Option<Vec<Pattern>>,
    pub effect: Effect,
    pub workers: Option<Vec<String>>,
    pub require_controls: Vec<String>,
    pub max_blast_radius: Option<u8>,
    /// The deny reason used when `effect = "deny"`.
    pub reason: String,
    /// How approvals opened by this rule behave (only used when `effect = "require_approval"`).
    #[serde(skip)]
    pub approval: ApprovalSettings,
    pub location: Location,
    #[serde(skip)]
    pub(crate) compiled: CompiledRule,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct CompiledRule {
    pub env_mask: u64,
    pub label_mask: u64,
    /// Explicit ranked worker indices, when the rule names its workers.
    pub workers: Option<Vec<u32>>,
    /// Required control indices, sorted.
    pub controls: Vec<u32>,
}

impl Rule {
    #[inline]
    pub(crate) fn tenant_matches(&self, tenant: &str) -> bool {
        match &self.tenants {
            None => true,
            Some(ts) => ts.iter().any(|p| p.matches(tenant)),
        }
    }
}

/// An immutable, compiled policy set. Cheap to share behind an `Arc`; never mutated:
/// a reload builds a new one and swaps it in.
#[derive(Debug)]
pub struct Snapshot {
    /// `blake3:<hex>` over the loaded files' names and contents, in load order.
    pub version: String,
    pub settings: Settings,
    pub capabilities: Vec<Capability>,
    pub workers: Vec<Worker>,
    pub rules: Vec<Rule>,
    /// The files that were loaded, in load order.
    pub files: Vec<String>,
    pub(crate) cap_index: HashMap<String, u32>,
    pub(crate) worker_index: HashMap<String, u32>,
    pub(crate) controls: Vec<String>,
    /// Rule indices that can match, per (capability, env), in rule order.
    pub(crate) rules_by_cap_env: Vec<Vec<u32>>,
    /// Rule indices whose capability patterns match, per capability, in rule order (explain).
    pub(crate) rules_by_cap: Vec<Vec<u32>>,
    /// Workers offering each capability, sorted by id: the default candidates.
    pub(crate) workers_by_cap: Vec<Vec<u32>>,
    /// (capability id, index), sorted by id, for prefix-glob lookups.
    pub(crate) caps_sorted: Vec<(String, u32)>,
}

impl Snapshot {
    /// Compile validated parts into a snapshot. The loader has already checked every
    /// reference (workers, envs, labels); anything unresolved here is a loader bug, and
    /// is treated as matching nothing (fail closed).
    pub fn compile(
        version: String,
        settings: Settings,
        capabilities: Vec<Capability>,
        mut workers: Vec<Worker>,
        mut rules: Vec<Rule>,
        files: Vec<String>,
    ) -> Snapshot {
        let cap_index: HashMap<String, u32> = capabilities
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.clone(), i as u32))
            .collect();
        let worker_index: HashMap<String, u32> = workers
            .iter()
            .enumerate()
            .map(|(i, w)| (w.id.clone(), i as u32))
            .collect();
        let env_idx = |e: &str| settings.environments.iter().position(|x| x == e);
        let label_idx = |l: &str| settings.data_labels.iter().position(|x| x == l);
        let mut controls: Vec<String> = Vec::new();
        let mut control_index: HashMap<String, u32> = HashMap::new();
        let mut intern = |c: &str| -> u32 {
            if let Some(&i) = control_index.get(c) {
                return i;
            }
            let i = controls.len() as u32;
            controls.push(c.to_string());
            control_index.insert(c.to_string(), i);
            i
        };

        for w in &mut workers {
            let mut caps: Vec<u32> = w
                .capabilities
                .iter()
                .filter_map(|c| cap_index.get(c).copied())
                .collect();
            caps.sort_unstable();
            caps.dedup();
            let mut ctl: Vec<u32> = w.controls.iter().map(|c| intern(c)).collect();
            ctl.sort_unstable();
            ctl.dedup();
            w.compiled = CompiledWorker {
                caps,
                env_mask: mask(w.environments.iter().filter_map(|e| env_idx(e))),
                max_label: label_idx(&w.max_data_label).map_or(0, |i| i as u8),
                controls: ctl,
            };
            if label_idx(&w.max_data_label).is_none() {
                // Unknown clearance: clear for nothing.
                w.compiled.env_mask = 0;
            }
        }

        let all_envs = mask(0..settings.environments.len());
        let all_labels = mask(0..settings.data_labels.len());
        for r in &mut rules {
            let env_mask = match &r.envs {
                None => all_envs,
                Some(es) => mask(es.iter().filter_map(|e| env_idx(e))),
            };
            let label_mask = match (&r.data_labels, &r.max_data_label) {
                (Some(ls), _) => mask(ls.iter().filter_map(|l| label_idx(l))),
                (None, Some(max)) => label_idx(max).map_or(0, |m| mask(0..=m)),
                (None, None) => all_labels,
            };
            let mut ctl: Vec<u32> = r.require_controls.iter().map(|c| intern(c)).collect();
            ctl.sort_unstable();
            ctl.dedup();
            r.compiled = CompiledRule {
                env_mask,
                label_mask,
                workers: r.workers.as_ref().map(|ws| {
                    ws.iter()
                        .map(|w| worker_index.get(w).copied().unwrap_or(u32::MAX))
                        .collect()
                }),
                controls: ctl,
            };
        }

        // Capability ids in sorted order: a prefix glob is then one binary search and a
        // contiguous range, so compiling costs rules x matches, not rules x capabilities.
        let mut caps_sorted: Vec<(String, u32)> = capabilities
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.clone(), i as u32))
            .collect();
        caps_sorted.sort_unstable();

        let n_env = settings.environments.len();
        let mut rules_by_cap_env = vec![Vec::new(); capabilities.len() * n_env];
        let mut rules_by_cap = vec![Vec::new(); capabilities.len()];
        for (ri, r) in rules.iter().enumerate() {
            let matched = matching_capabilities(&r.capabilities, &cap_index, &caps_sorted);
            for &ci in &matched {
                rules_by_cap[ci as usize].push(ri as u32);
            }
            if r.compiled.env_mask == 0 || r.compiled.label_mask == 0 {
                continue;
            }
            for ci in matched {
                for e in 0..n_env {
                    if r.compiled.env_mask & (1 << e) != 0 {
                        rules_by_cap_env[ci as usize * n_env + e].push(ri as u32);
                    }
                }
            }
        }

        let mut workers_by_cap = vec![Vec::new(); capabilities.len()];
        for (wi, w) in workers.iter().enumerate() {
            for &c in &w.compiled.caps {
                workers_by_cap[c as usize].push(wi as u32);
            }
        }
        for list in &mut workers_by_cap {
            list.sort_by(|a, b| workers[*a as usize].id.cmp(&workers[*b as usize].id));
        }

        Snapshot {
            version,
            settings,
            capabilities,
            workers,
            rules,
            files,
            cap_index,
            worker_index,
            controls,
            rules_by_cap_env,
            rules_by_cap,
            workers_by_cap,
            caps_sorted,
        }
    }

    /// Indices of the registry capabilities a rule's patterns match, sorted, no duplicates.
    pub(crate) fn capabilities_matched_by(&self, patterns: &[Pattern]) -> Vec<u32> {
        matching_capabilities(patterns, &self.cap_index, &self.caps_sorted)
    }

    pub fn env_index(&self, env: &str) -> Option<usize> {
        self.settings.environments.iter().position(|e| e == env)
    }

    pub fn label_index(&self, label: &str) -> Option<usize> {
        self.settings.data_labels.iter().position(|l| l == label)
    }

    pub fn worker(&self, id: &str) -> Option<&Worker> {
        self.worker_index
            .get(id)
            .map(|&i| &self.workers[i as usize])
    }

    /// Ids of the workers that offer a capability, sorted by id.
    pub fn workers_offering(&self, cap: &str) -> Vec<&str> {
        self.cap_index.get(cap).map_or_else(Vec::new, |&c| {
            self.workers_by_cap[c as usize]
                .iter()
                .map(|&w| self.workers[w as usize].id.as_str())
                .collect()
        })
    }
}

/// Capabilities matched by any of `patterns`: exact ids by hash lookup, prefix globs by a
/// binary search into the sorted ids, `*` all.
fn matching_capabilities(
    patterns: &[Pattern],
    cap_index: &HashMap<String, u32>,
    caps_sorted: &[(String, u32)],
) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    for p in patterns {
        match p {
            Pattern::Any => return (0..caps_sorted.len() as u32).collect(),
            Pattern::Exact(id) => out.extend(cap_index.get(id).copied()),
            Pattern::Prefix(prefix) => {
                let start = caps_sorted.partition_point(|(id, _)| id.as_str() < prefix.as_str());
                out.extend(
                    caps_sorted[start..]
                        .iter()
                        .take_while(|(id, _)| id.starts_with(prefix.as_str()))
                        .filter(|(id, _)| p.matches(id))
                        .map(|(_, i)| *i),
                );
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// A bit mask from indices (envs and labels are capped at 64 by the loader).
pub(crate) fn mask(idx: impl IntoIterator<Item = usize>) -> u64 {
    idx.into_iter()
        .filter(|&i| i < 64)
        .fold(0u64, |m, i| m | (1 << i))
}
