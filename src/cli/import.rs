//! `hall import pyhall`: PyHall (WCP reference router, `pyhall-wcp` 0.2.2) rules and
//! registry records -> Hall registry and policy TOML, with a report of what did not carry.
//!
//! The translation follows PyHall's own source (`rules.py`, `router.py`, `registry.py`):
//!
//! - Rules are tried top to bottom, first match wins, no match denies: Hall's order is the
//!   same, so rule order is kept.
//! - A match condition is an exact string, `{"in": [...]}`, or `{"any": true}`; an absent or
//!   `null` key is a wildcard. Any other shape (a number, a list, `{"any": false}`, `{}`) can
//!   never equal a request field, so it never matches: such a rule is left out (noted).
//! - PyHall's check order after the match: correlation id, required controls (against the
//!   controls *any* enrolled worker implements), blast-radius gate, policy gate, the first
//!   *enrolled* candidate species, attestation, privilege envelope. A rule whose required
//!   controls no record implements always denies there: it becomes a Hall `deny` rule.
//! - Candidate workers are worker *species*: one Hall worker per species, merging the records
//!   of that species the way PyHall's registry accumulates them.
//!
//! Where a construct has no Hall equivalent, the output is the safe thing (it can only deny
//! more than PyHall did, never allow more) and the construct is listed in the report as
//! *lossy*; the command then exits 1 and writes nothing unless `--allow-lossy` is given.
//! Constructs that carry over with the same decisions but deserve a mention are *notes*.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::Value;

use super::CliResult;
use crate::engine::valid_id;

/// PyHall's environments (`models.Env`), in Hall's `[settings]`.
pub const PYHALL_ENVS: [&str; 4] = ["dev", "stage", "prod", "edge"];
/// PyHall's data labels (`models.DataLabel`), ascending sensitivity.
pub const PYHALL_LABELS: [&str; 3] = ["PUBLIC", "INTERNAL", "RESTRICTED"];

/// Deny reason of a rule whose required controls no enrolled worker implements
/// (PyHall: `DENY_MISSING_REQUIRED_CONTROLS`).
pub const REASON_MISSING_CONTROLS: &str = "missing_required_controls";
/// Deny reason of a rule with `escalation.policy_gate` (PyHall without a gate function:
/// `DENY_POLICY_GATE_UNCONFIGURED`).
pub const REASON_POLICY_GATE: &str = "policy_gate_unconfigured";
/// Deny reason of a rule requiring `ctrl.privilege_envelopes_required`.
pub const REASON_PRIVILEGE: &str = "privilege_envelope_unsupported";
/// Deny reason of a rule that matched on `tenant_risk` or `qos_class`.
pub const REASON_UNSUPPORTED_MATCH: &str = "pyhall_unsupported_match";
/// Deny reason of the guard rule for a rule set with shadowed rules
/// (PyHall: `DENY_SHADOW_RULES_DETECTED` in prod and edge).
pub const REASON_SHADOW: &str = "shadow_rules_detected";
/// The id of that guard rule.
pub const SHADOW_GUARD_ID: &str = "pyhall-shadow-guard";

#[derive(Debug, Subcommand)]
pub enum ImportCmd {
    /// Translate PyHall (WCP) rules.json and registry records into Hall TOML.
    #[command(after_help = "\
Writes OUT/registry/pyhall.toml and OUT/policies/pyhall.toml (never overwriting a file). \
Every PyHall construct that Hall cannot express is translated to something that can only \
deny more, never allow more, and is listed in the report; the command then exits 1 and \
writes nothing unless --allow-lossy is given. Check the result with \
`hall check --registry OUT/registry --policies OUT/policies`.")]
    Pyhall(PyhallArgs),
}

#[derive(Debug, Args)]
pub struct PyhallArgs {
    /// PyHall rules file (a JSON object with a "rules" array).
    #[arg(value_name = "RULES.json")]
    pub rules: PathBuf,
    /// PyHall registry records: files holding one record or an array of records, or
    /// directories of *.json records (read in name order, as PyHall's Registry does).
    #[arg(value_name = "REGISTRY.json")]
    pub registry: Vec<PathBuf>,
    /// Output directory (gets registry/ and policies/).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Write the files even when some constructs could not be carried over exactly.
    #[arg(long)]
    pub allow_lossy: bool,
    /// Report format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    pub format: ReportFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
}

/// One construct that did not carry over exactly (or deserves a mention).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    /// The PyHall rule id (`None`: a registry record or the whole set).
    pub rule_id: Option<String>,
    /// The Hall rule it became, if any.
    pub hall_rule_id: Option<String>,
    /// The worker species concerned, if any.
    pub worker: Option<String>,
    /// What it was, in PyHall's terms.
    pub construct: String,
    /// What the importer did.
    pub action: String,
}

/// The translation: file contents plus the report.
#[derive(Debug, Clone, Serialize)]
pub struct Translation {
    #[serde(skip)]
    pub registry_toml: String,
    #[serde(skip)]
    pub policies_toml: String,
    pub rules_in: usize,
    pub rules_out: usize,
    pub workers_out: usize,
    pub capabilities_out: usize,
    /// Constructs translated to something stricter than PyHall: decisions may differ.
    pub lossy: Vec<Item>,
    /// Constructs that keep PyHall's decisions but are worth knowing.
    pub notes: Vec<Item>,
}

pub(super) fn run(cmd: ImportCmd) -> CliResult {
    let ImportCmd::Pyhall(a) = cmd;
    let rules_doc = read_json(&a.rules)?;
    let mut records = Vec::new();
    for p in &a.registry {
        read_records(p, &mut records)?;
    }
    let t = translate(&rules_doc, &records)?;
    let reg_path = a.out.join("registry").join("pyhall.toml");
    let pol_path = a.out.join("policies").join("pyhall.toml");
    let write = t.lossy.is_empty() || a.allow_lossy;
    if write {
        for p in [&reg_path, &pol_path] {
            if p.exists() {
                return Err(ImportError::Exists { path: p.clone() }.into());
            }
        }
        for (p, text) in [(&reg_path, &t.registry_toml), (&pol_path, &t.policies_toml)] {
            let dir = p.parent().expect("a parent dir");
            std::fs::create_dir_all(dir).map_err(|source| ImportError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
            std::fs::write(p, text).map_err(|source| ImportError::Write {
                path: p.clone(),
                source,
            })?;
        }
    }
    match a.format {
        ReportFormat::Json => {
            let encode = |e| super::CliError::json("encoding the import report", e);
            let mut v = serde_json::to_value(&t).map_err(encode)?;
            v["written"] = Value::Bool(write);
            v["registry_file"] = Value::String(reg_path.display().to_string());
            v["policies_file"] = Value::String(pol_path.display().to_string());
            println!("{}", serde_json::to_string_pretty(&v).map_err(encode)?);
        }
        ReportFormat::Text => {
            println!(
                "{} PyHall rules -> {} Hall rules; {} workers, {} capabilities",
                t.rules_in, t.rules_out, t.workers_out, t.capabilities_out
            );
            for (title, items) in [("lossy", &t.lossy), ("note", &t.notes)] {
                for i in items {
                    let mut at = Vec::new();
                    if let Some(r) = &i.rule_id {
                        at.push(format!("rule {r}"));
                    }
                    if let Some(h) = &i.hall_rule_id {
                        if i.rule_id.as_ref() != Some(h) {
                            at.push(format!("(Hall rule {h})"));
                        }
                    }
                    if let Some(w) = &i.worker {
                        at.push(format!("worker {w}"));
                    }
                    let at = if at.is_empty() {
                        "rule set".to_owned()
                    } else {
                        at.join(" ")
                    };
                    println!("{title}: {at}: {}: {}", i.construct, i.action);
                }
            }
            if write {
                println!("wrote {} and {}", reg_path.display(), pol_path.display());
            } else {
                println!(
                    "{} construct(s) cannot be carried over exactly; nothing written \
                     (re-run with --allow-lossy to write the stricter translation)",
                    t.lossy.len()
                );
            }
        }
    }
    Ok(if write {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Why `hall import` cannot read its input or write its output.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not valid JSON", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}[{index}]: a registry record must be an object", path.display())]
    RecordNotObject { path: PathBuf, index: usize },
    #[error("{}: expected a registry record (object) or an array of them", path.display())]
    NotARecord { path: PathBuf },
    #[error("the rules file has no \"rules\" array")]
    NoRules,
    #[error("rule #{0}: no rule_id (PyHall refuses to load it too)")]
    NoRuleId(usize),
    #[error("cannot encode the translated {what} as TOML")]
    Toml {
        what: &'static str,
        #[source]
        source: toml::ser::Error,
    },
    #[error("{} exists; not overwriting it", path.display())]
    Exists { path: PathBuf },
    #[error("cannot create {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ImportError {
    /// What to do next, when the error can say (see [`super::CliError::help`]).
    pub fn help(&self) -> Option<String> {
        match self {
            ImportError::Exists { .. } => Some(
                "  fix: give another --out directory, or move the earlier import away first"
                    .to_string(),
            ),
            _ => None,
        }
    }
}

fn read_json(p: &Path) -> Result<Value, ImportError> {
    let text = std::fs::read_to_string(p).map_err(|source| ImportError::Read {
        path: p.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ImportError::Json {
        path: p.to_path_buf(),
        source,
    })
}

fn read_records(p: &Path, out: &mut Vec<Value>) -> Result<(), ImportError> {
    if p.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|source| ImportError::Read {
                path: p.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        for f in files {
            read_records(&f, out)?;
        }
        return Ok(());
    }
    match read_json(p)? {
        Value::Array(items) => {
            for (index, v) in items.into_iter().enumerate() {
                if !v.is_object() {
                    return Err(ImportError::RecordNotObject {
                        path: p.to_path_buf(),
                        index,
                    });
                }
                out.push(v);
            }
        }
        v @ Value::Object(_) => out.push(v),
        _ => {
            return Err(ImportError::NotARecord {
                path: p.to_path_buf(),
            })
        }
    }
    Ok(())
}

/// A parsed match condition on one request field.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cond {
    /// Absent, `null` or `{"any": true}`.
    Any,
    /// Exact value or `{"in": [...]}`: the string values (others can never be equal).
    Values(Vec<String>),
    /// Can never match (`{"any": false}`, `{}`, a number, a list, `{"in": []}` ...).
    Never(&'static str),
    /// `{"in": "text"}`: Python tests substring membership; not expressible.
    Substring,
}

/// PyHall's `_match_membership` read as a set of values.
fn parse_cond(v: Option<&Value>) -> Cond {
    match v {
        None | Some(Value::Null) => Cond::Any,
        Some(Value::Object(m)) => {
            if m.get("any") == Some(&Value::Bool(true)) {
                return Cond::Any;
            }
            match m.get("in") {
                Some(Value::Array(items)) => {
                    let vals: Vec<String> = items
                        .iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect();
                    if vals.is_empty() {
                        Cond::Never("an empty or non-string \"in\" list")
                    } else {
                        Cond::Values(vals)
                    }
                }
                Some(Value::String(_)) => Cond::Substring,
                Some(_) => Cond::Never("an \"in\" that is not a list"),
                None => Cond::Never("an object without \"in\" or \"any\": true"),
            }
        }
        Some(Value::String(s)) => Cond::Values(vec![s.clone()]),
        Some(_) => Cond::Never("a value that is not a string"),
    }
}

/// PyHall's control id syntax (`registry._VALID_CTRL_RE`): `^ctrl\.[a-z0-9][a-z0-9._\-]*$`.
fn valid_pyhall_control(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("ctrl.") else {
        return false;
    };
    let b = rest.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

fn str_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

#[derive(Default)]
struct Species {
    capabilities: BTreeSet<String>,
    environments: Option<BTreeSet<String>>,
    controls: BTreeSet<String>,
    blast_radius: i64,
    attested: bool,
    owner: Option<String>,
    contact: Option<String>,
    records: Vec<String>,
}

#[derive(Serialize)]
struct RegistryOut {
    capability: Vec<CapOut>,
    worker: Vec<WorkerOut>,
}

#[derive(Serialize)]
struct CapOut {
    id: String,
    description: String,
}

#[derive(Serialize)]
struct WorkerOut {
    id: String,
    description: String,
    capabilities: Vec<String>,
    environments: Vec<String>,
    max_data_label: String,
    controls: Vec<String>,
    blast_radius: i64,
    enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    contact: Option<String>,
}

#[derive(Serialize)]
struct PolicyOut {
    settings: SettingsOut,
    rule: Vec<RuleOut>,
}

#[derive(Serialize)]
struct SettingsOut {
    environments: Vec<String>,
    data_labels: Vec<String>,
}

#[derive(Serialize, Clone)]
struct RuleOut {
    id: String,
    description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    capabilities: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    envs: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_labels: Option<Vec<String>>,
    effect: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    workers: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    require_controls: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// Translate a parsed rules document and registry records.
pub fn translate(rules_doc: &Value, records: &[Value]) -> Result<Translation, ImportError> {
    let rules = match rules_doc.get("rules") {
        Some(Value::Array(r)) => r,
        _ => return Err(ImportError::NoRules),
    };
    let mut lossy = Vec::new();
    let mut notes = Vec::new();
    let item =
        |rule: Option<&str>, hall: Option<&str>, worker: Option<&str>, c: &str, a: &str| Item {
            rule_id: rule.map(str::to_owned),
            hall_rule_id: hall.map(str::to_owned),
            worker: worker.map(str::to_owned),
            construct: c.to_owned(),
            action: a.to_owned(),
        };

    // ---- registry: PyHall's Registry.enroll, record by record --------------------------
    let mut species: BTreeMap<String, Species> = BTreeMap::new();
    let mut controls_present: BTreeSet<String> = BTreeSet::new();
    let mut capabilities: BTreeSet<String> = BTreeSet::new();
    for (i, rec) in records.iter().enumerate() {
        let worker_id = rec
            .get("worker_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("record #{}", i + 1));
        let implements = str_list(rec.get("currently_implements"));
        for c in &implements {
            if valid_pyhall_control(c) {
                controls_present.insert(c.clone());
            }
        }
        let Some(sp) = rec
            .get("worker_species_id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        else {
            notes.push(item(
                None,
                None,
                Some(&worker_id),
                "a registry record without worker_species_id",
                "no worker: PyHall never selects it either (its controls still count as present)",
            ));
            continue;
        };
        if !valid_id(sp) {
            lossy.push(item(
                None,
                None,
                Some(sp),
                "a worker species id Hall cannot use as an id",
                "left out: rules naming it cannot select it",
            ));
            continue;
        }
        let s = species.entry(sp.to_owned()).or_default();
        s.records.push(worker_id.clone());
        for c in str_list(rec.get("capabilities")) {
            if valid_id(&c) {
                capabilities.insert(c.clone());
                s.capabilities.insert(c);
            } else {
                lossy.push(item(
                    None,
                    None,
                    Some(sp),
                    &format!("capability {c:?} is not a valid Hall id"),
                    "left out: a Hall request cannot name it",
                ));
            }
        }
        if let Some(v) = rec.get("allowed_environments") {
            let envs = s.environments.get_or_insert_with(BTreeSet::new);
            for e in str_list(Some(v)) {
                if PYHALL_ENVS.contains(&e.as_str()) {
                    envs.insert(e);
                }
            }
        }
        for c in implements {
            if valid_pyhall_control(&c) && valid_id(&c) {
                s.controls.insert(c);
            }
        }
        if let Some(Value::Object(dims)) = rec.get("blast_radius") {
            let m = dims.values().filter_map(Value::as_i64).max().unwrap_or(0);
            s.blast_radius = s.blast_radius.max(m.clamp(0, 10));
        }
        if rec.get("attestation").is_some_and(|a| !a.is_null()) {
            s.attested = true;
        }
        if let Some(o) = rec.get("owner").and_then(Value::as_str) {
            s.owner.get_or_insert_with(|| o.to_owned());
        }
        if let Some(c) = rec.get("contact").and_then(Value::as_str) {
            s.contact.get_or_insert_with(|| c.to_owned());
        }
        let envelope = rec.get("privilege_envelope");
        if let Some(secrets) = envelope.and_then(|e| e.get("secrets_access")) {
            if !str_list(Some(secrets)).is_empty() {
                notes.push(item(None, None, Some(sp), "privilege_envelope.secrets_access",
                    "not carried: the Hall worker lists no secrets; add them under `secrets` if it should receive any"));
            }
        }
    }
    for (id, s) in &species {
        if s.attested {
            lossy.push(item(None, None, Some(id), "attestation (worker code hash)",
                "Hall does not verify worker code: the worker is imported disabled (enabled = false)"));
        }
    }

    // ---- rules ------------------------------------------------------------------------
    let shadows = detect_shadow_rules(rules);
    let mut out_rules: Vec<RuleOut> = Vec::new();
    if !shadows.is_empty() {
        let pairs: Vec<String> = shadows
            .iter()
            .map(|(a, b)| format!("{a} shadows {b}"))
            .collect();
        notes.push(item(None, Some(SHADOW_GUARD_ID), None,
            &format!("shadowed rules ({}): PyHall denies every prod and edge request of such a set", pairs.join("; ")),
            &format!("a first rule {SHADOW_GUARD_ID} denies prod and edge with reason {REASON_SHADOW}; fix the order and re-import to lift it")));
        out_rules.push(RuleOut {
            id: SHADOW_GUARD_ID.into(),
            description: "PyHall denies prod and edge while the rule set has shadowed rules".into(),
            capabilities: None,
            envs: Some(vec!["prod".into(), "edge".into()]),
            data_labels: None,
            effect: "deny".into(),
            workers: None,
            require_controls: Vec::new(),
            reason: Some(REASON_SHADOW.into()),
        });
    }
    let mut used_ids: HashMap<String, usize> = HashMap::new();
    used_ids.insert(SHADOW_GUARD_ID.into(), 1);
    let mut explicit_corr = false;
    for (i, r) in rules.iter().enumerate() {
        let pid = match r.get("rule_id") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => return Err(ImportError::NoRuleId(i + 1)),
        };
        let p = Some(pid.as_str());
        let m = match r.get("match") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => {
                notes.push(item(
                    p,
                    None,
                    None,
                    "a match that is not an object",
                    "left out: PyHall cannot evaluate it (it raises), so it never allows",
                ));
                continue;
            }
        };
        for k in m.keys() {
            if ![
                "capability_id",
                "env",
                "data_label",
                "tenant_risk",
                "qos_class",
            ]
            .contains(&k.as_str())
            {
                notes.push(item(p, None, None, &format!("match key {k:?}"),
                    "ignored, as PyHall ignores it (it only reads capability_id, env, data_label, tenant_risk, qos_class)"));
            }
        }
        let cap = parse_cond(m.get("capability_id"));
        let env = parse_cond(m.get("env"));
        let label = parse_cond(m.get("data_label"));
        let risk = parse_cond(m.get("tenant_risk"));
        let qos = parse_cond(m.get("qos_class"));
        let mut never = None;
        let mut substring = Vec::new();
        for (name, c) in [
            ("capability_id", &cap),
            ("env", &env),
            ("data_label", &label),
            ("tenant_risk", &risk),
            ("qos_class", &qos),
        ] {
            match c {
                Cond::Never(why) => never = Some(format!("{name} is {why}")),
                Cond::Substring => substring.push(name),
                _ => {}
            }
        }
        if let Some(why) = never {
            notes.push(item(
                p,
                None,
                None,
                &format!("a condition that never matches ({why})"),
                "left out: it can never match in PyHall either",
            ));
            continue;
        }
        // Hall id: valid and unique.
        let mut hid = if valid_id(&pid) {
            pid.clone()
        } else {
            sanitize_id(&pid)
        };
        if hid != pid {
            lossy.push(item(
                p,
                Some(&hid),
                None,
                "a rule id Hall cannot use",
                "renamed: decisions name the new id",
            ));
        }
        if let Some(n) = used_ids.get_mut(&hid) {
            *n += 1;
            let new = format!("{hid}.dup{n}");
            lossy.push(item(p, Some(&new), None, "a duplicate rule id",
                "renamed (Hall ids are unique); it still only decides what the earlier rules left, as in PyHall"));
            hid = new;
        }
        used_ids.insert(hid.clone(), 1);
        let h = Some(hid.as_str());

        // Fields Hall matches on.
        let mut unsupported = Vec::new();
        let capabilities = match &cap {
            Cond::Values(vs) => {
                let ok: Vec<String> = vs.iter().filter(|c| valid_id(c)).cloned().collect();
                if ok.len() < vs.len() {
                    notes.push(item(
                        p,
                        h,
                        None,
                        "capability_id values that are not valid Hall ids",
                        "dropped: a Hall request cannot name them",
                    ));
                }
                if ok.is_empty() {
                    notes.push(item(
                        p,
                        h,
                        None,
                        "no capability a Hall request can name",
                        "left out",
                    ));
                    continue;
                }
                for c in &ok {
                    capabilities.insert(c.clone());
                }
                Some(ok)
            }
            Cond::Substring => {
                unsupported.push("capability_id {\"in\": \"text\"} (substring test)");
                None
            }
            _ => None,
        };
        let envs = match &env {
            Cond::Values(vs) => {
                let ok: Vec<String> = vs
                    .iter()
                    .filter(|e| PYHALL_ENVS.contains(&e.as_str()))
                    .cloned()
                    .collect();
                if ok.is_empty() {
                    notes.push(item(
                        p,
                        h,
                        None,
                        "no env PyHall knows",
                        "left out: it never matches",
                    ));
                    continue;
                }
                Some(ok)
            }
            Cond::Substring => {
                unsupported.push("env {\"in\": \"text\"} (substring test)");
                None
            }
            _ => None,
        };
        let data_labels = match &label {
            Cond::Values(vs) => {
                let ok: Vec<String> = vs
                    .iter()
                    .filter(|l| PYHALL_LABELS.contains(&l.as_str()))
                    .cloned()
                    .collect();
                if ok.is_empty() {
                    notes.push(item(
                        p,
                        h,
                        None,
                        "no data label PyHall knows",
                        "left out: it never matches",
                    ));
                    continue;
                }
                Some(ok)
            }
            Cond::Substring => {
                unsupported.push("data_label {\"in\": \"text\"} (substring test)");
                None
            }
            _ => None,
        };
        if risk != Cond::Any {
            unsupported.push("matching on tenant_risk");
        }
        if qos != Cond::Any {
            unsupported.push("matching on qos_class");
        }

        let d = r.get("decision").cloned().unwrap_or(Value::Null);
        let required: Vec<String> = str_list(d.get("required_controls_suggested"));
        let escalation = d.get("escalation");
        let pre = d.get("preconditions");
        if pre.and_then(|x| x.get("must_have_correlation_id")) == Some(&Value::Bool(true)) {
            explicit_corr = true;
        }
        let candidates: Vec<String> = match d.get("candidate_workers_ranked") {
            Some(Value::Array(cs)) => cs
                .iter()
                .filter_map(|c| c.get("worker_species_id").and_then(Value::as_str))
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        };
        let available: Vec<String> = candidates
            .iter()
            .filter(|c| species.contains_key(*c))
            .cloned()
            .collect();
        for c in &candidates {
            if !species.contains_key(c)
                && !lossy.iter().any(|x: &Item| x.worker.as_deref() == Some(c))
            {
                notes.push(item(
                    p,
                    h,
                    Some(c),
                    "a candidate species no record enrolls",
                    "left out of the rule's workers: PyHall skips it as unavailable",
                ));
            }
        }

        let mut rule = RuleOut {
            id: hid.clone(),
            description: format!("Imported from PyHall rule {pid}"),
            capabilities,
            envs,
            data_labels,
            effect: "allow".into(),
            workers: Some(available.clone()),
            require_controls: Vec::new(),
            reason: None,
        };
        let deny = |rule: &mut RuleOut, reason: &str| {
            rule.effect = "deny".into();
            rule.workers = None;
            rule.require_controls.clear();
            rule.reason = Some(reason.into());
        };
        // PyHall's order: controls, blast gate, policy gate, worker, attestation, privilege.
        let missing: Vec<&String> = required
            .iter()
            .filter(|c| !controls_present.contains(*c))
            .collect();
        if !unsupported.is_empty() {
            deny(&mut rule, REASON_UNSUPPORTED_MATCH);
            lossy.push(item(
                p,
                h,
                None,
                &unsupported.join(", "),
                "Hall cannot match on it: the rule denies every request its other conditions match",
            ));
        } else if !missing.is_empty() {
            deny(&mut rule, REASON_MISSING_CONTROLS);
            notes.push(item(
                p,
                h,
                None,
                &format!(
                    "required controls no enrolled worker implements ({})",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                &format!("the rule denies with reason {REASON_MISSING_CONTROLS}, as PyHall does"),
            ));
        } else if escalation
            .and_then(|e| e.get("policy_gate"))
            .is_some_and(|g| g.as_bool() != Some(false) && !g.is_null())
        {
            deny(&mut rule, REASON_POLICY_GATE);
            lossy.push(item(p, h, None, "escalation.policy_gate (a Python gate function)",
                &format!("Hall cannot run it: the rule denies with reason {REASON_POLICY_GATE} (PyHall's answer without a gate); use effect = \"require_approval\" for a human gate")));
        } else if required
            .iter()
            .any(|c| c == "ctrl.privilege_envelopes_required")
        {
            deny(&mut rule, REASON_PRIVILEGE);
            lossy.push(item(p, h, None, "privilege envelope enforcement (ctrl.privilege_envelopes_required)",
                &format!("Hall has no privilege envelopes: the rule denies with reason {REASON_PRIVILEGE}")));
        } else {
            rule.require_controls = required.iter().filter(|c| valid_id(c)).cloned().collect();
            if escalation.and_then(|e| e.get("human_required_default")) == Some(&Value::Bool(true))
            {
                rule.effect = "require_approval".into();
                lossy.push(item(
                    p,
                    h,
                    None,
                    "escalation.human_required_default",
                    "the rule requires a human approval in Hall (PyHall only reported the flag)",
                ));
            }
            if required.iter().any(|c| c == "ctrl.blast_radius_scoring") {
                notes.push(item(p, h, None, "ctrl.blast_radius_scoring",
                    "PyHall's blast gate needs request flags or a caller blast_score that Hall requests do not carry; without them it never denies"));
            }
            // Hall checks each candidate; PyHall only checked that the species is enrolled.
            for w in &available {
                let s = &species[w];
                if s.attested {
                    continue;
                }
                match &rule.capabilities {
                    None => lossy.push(item(p, h, Some(w), "a rule for any capability",
                        "Hall selects a worker only for capabilities it lists, and denies capabilities no imported file declares (unknown_capability)")),
                    Some(cs) => {
                        for c in cs.iter().filter(|c| !s.capabilities.contains(*c)) {
                            lossy.push(item(p, h, Some(w), &format!("a candidate whose record does not list capability {c}"),
                                "Hall skips it for that capability (PyHall selected any enrolled species)"));
                        }
                    }
                }
                if let Some(wenvs) = &s.environments {
                    let renvs: Vec<String> = rule
                        .envs
                        .clone()
                        .unwrap_or_else(|| PYHALL_ENVS.iter().map(|e| e.to_string()).collect());
                    for e in renvs.iter().filter(|e| !wenvs.contains(*e)) {
                        lossy.push(item(p, h, Some(w), &format!("a candidate whose allowed_environments omit {e}"),
                            "Hall skips it there (PyHall's router did not check allowed_environments)"));
                    }
                }
                for c in rule
                    .require_controls
                    .iter()
                    .filter(|c| !s.controls.contains(*c))
                {
                    lossy.push(item(p, h, Some(w), &format!("a candidate that does not implement {c} itself"),
                        "Hall checks required controls per worker and skips it (PyHall checked the registry as a whole)"));
                }
            }
            if available.is_empty() {
                notes.push(item(p, h, None, "no enrolled candidate worker",
                    "the rule lists no workers: Hall denies no_eligible_worker, as PyHall denies DENY_NO_AVAILABLE_WORKER"));
            }
        }
        out_rules.push(rule);
    }
    if explicit_corr {
        lossy.push(item(
            None,
            None,
            None,
            "preconditions.must_have_correlation_id",
            "Hall does not require a correlation_id: send one from your apps",
        ));
    }
    notes.push(item(None, None, None, "PyHall's router-wide defaults (correlation_id required; blast gate in prod/edge)",
        "Hall does not require a correlation_id; the blast gate never denies a request without request flags or a caller blast_score, which Hall requests do not carry"));

    // ---- output -------------------------------------------------------------------------
    let registry = RegistryOut {
        capability: capabilities
            .iter()
            .map(|c| CapOut {
                id: c.clone(),
                description: "Imported from PyHall".into(),
            })
            .collect(),
        worker: species
            .iter()
            .map(|(id, s)| WorkerOut {
                id: id.clone(),
                description: format!("Imported from PyHall record(s) {}", s.records.join(", ")),
                capabilities: s.capabilities.iter().cloned().collect(),
                environments: match &s.environments {
                    Some(e) => PYHALL_ENVS
                        .iter()
                        .filter(|x| e.contains(**x))
                        .map(|x| x.to_string())
                        .collect(),
                    None => PYHALL_ENVS.iter().map(|x| x.to_string()).collect(),
                },
                max_data_label: "RESTRICTED".into(),
                controls: s.controls.iter().cloned().collect(),
                blast_radius: s.blast_radius,
                enabled: !s.attested,
                owner: s.owner.clone(),
                contact: s.contact.clone(),
            })
            .collect(),
    };
    let policy = PolicyOut {
        settings: SettingsOut {
            environments: PYHALL_ENVS.iter().map(|s| s.to_string()).collect(),
            data_labels: PYHALL_LABELS.iter().map(|s| s.to_string()).collect(),
        },
        rule: out_rules,
    };
    let header =
        "# Generated by `hall import pyhall` from PyHall (WCP) files. Review the import report.\n";
    let registry_toml = format!(
        "{header}\n{}",
        toml::to_string(&registry).map_err(|source| ImportError::Toml {
            what: "registry",
            source,
        })?
    );
    let policies_toml = format!(
        "{header}# PyHall's environments and data labels (ascending sensitivity).\n\n{}",
        toml::to_string(&policy).map_err(|source| ImportError::Toml {
            what: "policies",
            source,
        })?
    );
    Ok(Translation {
        registry_toml,
        policies_toml,
        rules_in: rules.len(),
        rules_out: policy.rule.len(),
        workers_out: registry.worker.len(),
        capabilities_out: registry.capability.len(),
        lossy,
        notes,
    })
}

/// Make a Hall id out of a PyHall one: invalid characters become `-`, and an id that does
/// not start with a letter or digit gets an `r` in front.
fn sanitize_id(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._:@/-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !out
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        out.insert(0, 'r');
    }
    out.truncate(120);
    out
}

// ---- PyHall's detect_shadow_rules (router.py), over the raw JSON ---------------------------

fn field<'a>(m: &'a serde_json::Map<String, Value>, k: &str) -> Option<&'a Value> {
    m.get(k).filter(|v| !v.is_null())
}

fn is_any(v: &Value) -> bool {
    v.get("any") == Some(&Value::Bool(true))
}

fn condition_covers(early: Option<&Value>, late: &Value) -> bool {
    let Some(early) = early else { return true };
    if is_any(early) {
        return true;
    }
    if early == late {
        return true;
    }
    if let Some(set) = early.get("in") {
        let set: Vec<&Value> = match set {
            Value::Array(a) => a.iter().collect(),
            _ => return false,
        };
        if late.is_string() && set.contains(&late) {
            return true;
        }
        if let Some(Value::Array(l)) = late.get("in") {
            if l.iter().all(|x| set.contains(&x)) {
                return true;
            }
        }
        return false;
    }
    false
}

fn semantically_shadows(
    early: &serde_json::Map<String, Value>,
    late: &serde_json::Map<String, Value>,
) -> bool {
    if early == late {
        return false;
    }
    let keys: BTreeSet<&String> = early.keys().chain(late.keys()).collect();
    for k in keys {
        let e = field(early, k);
        match field(late, k) {
            None => {
                if e.is_some_and(|e| !is_any(e)) {
                    return false;
                }
            }
            Some(l) => {
                if !condition_covers(e, l) {
                    return false;
                }
            }
        }
    }
    true
}

/// Pairs (shadower, shadowed) as PyHall's `detect_shadow_rules` finds them.
fn detect_shadow_rules(rules: &[Value]) -> Vec<(String, String)> {
    let empty = serde_json::Map::new();
    let id = |r: &Value| match r.get("rule_id") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    };
    let matches: Vec<&serde_json::Map<String, Value>> = rules
        .iter()
        .map(|r| r.get("match").and_then(Value::as_object).unwrap_or(&empty))
        .collect();
    let mut out = Vec::new();
    for i in 0..rules.len() {
        for j in i + 1..rules.len() {
            let (em, lm) = (matches[i], matches[j]);
            let (ei, li) = (id(&rules[i]), id(&rules[j]));
            if em == lm {
                if ei != li {
                    out.push((ei, li));
                }
                continue;
            }
            if semantically_shadows(em, lm) {
                out.push((ei, li));
                continue;
            }
            if !em.is_empty()
                && em
                    .iter()
                    .all(|(k, v)| lm.get(k).unwrap_or(&Value::Null) == v)
            {
                out.push((ei, li));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conditions_read_like_pyhall() {
        assert_eq!(parse_cond(None), Cond::Any);
        assert_eq!(parse_cond(Some(&json!(null))), Cond::Any);
        assert_eq!(parse_cond(Some(&json!({"any": true}))), Cond::Any);
        assert_eq!(parse_cond(Some(&json!({"any": true, "in": []}))), Cond::Any);
        assert_eq!(
            parse_cond(Some(&json!("dev"))),
            Cond::Values(vec!["dev".into()])
        );
        assert_eq!(
            parse_cond(Some(&json!({"in": ["dev", 3, "prod"]}))),
            Cond::Values(vec!["dev".into(), "prod".into()])
        );
        assert_eq!(
            parse_cond(Some(&json!({"in": "dev,prod"}))),
            Cond::Substring
        );
        for never in [
            json!({"any": false}),
            json!({}),
            json!(5),
            json!(["dev"]),
            json!({"in": []}),
            json!(true),
        ] {
            assert!(
                matches!(parse_cond(Some(&never)), Cond::Never(_)),
                "{never}"
            );
        }
    }

    #[test]
    fn control_ids_follow_pyhall_syntax() {
        assert!(valid_pyhall_control("ctrl.obs.audit-log-append-only"));
        assert!(valid_pyhall_control("ctrl.blast_radius_scoring"));
        for bad in ["ctrl.", "ctrl.Upper", "audit", "ctrl._x", "ctrl.a b"] {
            assert!(!valid_pyhall_control(bad), "{bad}");
        }
    }

    #[test]
    fn shadow_detection_matches_pyhall() {
        let rules = json!([
            {"rule_id": "a", "match": {"capability_id": {"any": true}, "env": {"in": ["dev", "stage"]}}},
            {"rule_id": "b", "match": {"capability_id": "cap.x", "env": "dev"}},
            {"rule_id": "c", "match": {"capability_id": "cap.y", "env": "prod"}}
        ]);
        let s = detect_shadow_rules(rules.as_array().unwrap());
        assert_eq!(s, vec![("a".to_string(), "b".to_string())]);
    }

    #[test]
    fn sanitized_ids_are_valid() {
        for s in ["rule one", "_x", "ü", "a*b"] {
            assert!(valid_id(&sanitize_id(s)), "{s} -> {}", sanitize_id(s));
        }
    }
}
