//! JSON Schemas for the registry, policy and fixture files (`hall schema KIND`), so editors
//! with TOML schema support (Taplo / Even Better TOML) validate while typing.
//!
//! Fixtures are described by their own Rust types. Registry and policy files are read by the
//! loader into span-carrying types (`toml::Spanned`, which has no schema), so they are
//! described here by plain mirrors of those types; a test compares each mirror's keys with
//! the keys the loader accepts, so the two cannot drift apart unnoticed.

use schemars::JsonSchema;
use serde::Deserialize;

/// Which file the schema is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchemaKind {
    /// `registry/*.toml`: `[[capability]]` and `[[worker]]`.
    Registry,
    /// `policies/*.toml`: `[settings]` and `[[rule]]`.
    Policy,
    /// Decision fixtures for `hall test`: `[[case]]`.
    Fixture,
}

/// The JSON Schema (draft 2020-12) of one kind of file.
pub fn schema(kind: SchemaKind) -> serde_json::Value {
    let s = match kind {
        SchemaKind::Registry => schemars::schema_for!(RegistryFile),
        SchemaKind::Policy => schemars::schema_for!(PolicyFile),
        SchemaKind::Fixture => schemars::schema_for!(super::fixtures::FixtureFile),
    };
    s.to_value()
}

/// An id: `[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}`.
const ID: &str = "^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$";
/// An exact id, a prefix glob ending in `.*`, or `*`.
const PATTERN: &str = r"^(\*|[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}(\.\*)?)$";

/// A registry file: any number of capabilities and workers. Ids are unique across all files.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Hall registry file")]
pub struct RegistryFile {
    #[serde(default)]
    pub capability: Vec<Capability>,
    #[serde(default)]
    pub worker: Vec<Worker>,
}

/// Something an app may ask for.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Capability {
    #[schemars(regex(pattern = ID))]
    pub id: String,
    pub description: Option<String>,
    pub owner: Option<String>,
    pub contact: Option<String>,
}

/// Who can do a capability, where, on what data.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Worker {
    #[schemars(regex(pattern = ID))]
    pub id: String,
    /// Capability ids it offers.
    pub capabilities: Vec<String>,
    /// Environments it may be used in (from `[settings] environments`).
    pub environments: Vec<String>,
    /// The most sensitive data label it is cleared for.
    pub max_data_label: String,
    /// Controls it implements.
    #[serde(default)]
    pub controls: Vec<String>,
    /// How much damage a misuse could do.
    #[schemars(range(min = 0, max = 10))]
    pub blast_radius: i64,
    /// Secrets it may be given.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Default true.
    pub enabled: Option<bool>,
    pub description: Option<String>,
    pub owner: Option<String>,
    pub contact: Option<String>,
}

/// A policy file: optional `[settings]` (in at most one file) and rules, first match wins.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Hall policy file")]
pub struct PolicyFile {
    pub settings: Option<Settings>,
    #[serde(default)]
    pub rule: Vec<Rule>,
}

/// The environments and data labels every file may name.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub environments: Option<Vec<String>>,
    /// In ascending sensitivity.
    pub data_labels: Option<Vec<String>>,
}

/// Effect of a matching rule.
#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    Deny,
    RequireApproval,
}

/// One rule.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[schemars(regex(pattern = ID))]
    pub id: String,
    pub description: Option<String>,
    /// Exact ids, prefix globs ending in ".*", or "*"; omitted = any.
    #[schemars(inner(regex(pattern = PATTERN)))]
    pub capabilities: Option<Vec<String>>,
    /// Omitted = any.
    pub envs: Option<Vec<String>>,
    /// Omitted = any; not together with max_data_label.
    pub data_labels: Option<Vec<String>>,
    /// An upper bound instead of data_labels.
    pub max_data_label: Option<String>,
    /// Tenant ids or prefix globs; omitted = any.
    #[schemars(inner(regex(pattern = PATTERN)))]
    pub tenants: Option<Vec<String>>,
    pub effect: Effect,
    /// Ranked candidates; omitted = every worker offering the capability, by id.
    pub workers: Option<Vec<String>>,
    #[serde(default)]
    pub require_controls: Vec<String>,
    #[schemars(range(min = 0, max = 10))]
    pub max_blast_radius: Option<i64>,
    /// The deny reason when effect = "deny" (default "denied_by_policy").
    pub reason: Option<String>,
    /// require_approval: how long an approval may stay pending, e.g. "15m" (the default).
    #[schemars(regex(pattern = DURATION))]
    pub approval_ttl: Option<String>,
    /// require_approval: distinct approvers needed (default 1).
    #[schemars(range(min = 1))]
    pub approvers_required: Option<i64>,
    /// require_approval: a veto window; approved unless denied within it, e.g. "10m".
    #[schemars(regex(pattern = DURATION))]
    pub auto_approve_after: Option<String>,
    /// require_approval: "once" (the default) or a duration the approval may be reused for.
    #[schemars(regex(pattern = APPROVAL_USE))]
    pub approval_use: Option<String>,
}

/// A duration: a number and s, m, h or d.
const DURATION: &str = "^[0-9]+[smhd]$";
/// `"once"` or a duration.
const APPROVAL_USE: &str = "^(once|[0-9]+[smhd])$";

#[cfg(test)]
mod tests {
    use super::*;

    fn properties(v: &serde_json::Value, def: Option<&str>) -> Vec<String> {
        let obj = match def {
            None => v,
            Some(d) => &v["$defs"][d],
        };
        let mut keys: Vec<String> = obj["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no properties in {def:?}: {v}"))
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    /// The keys the loader accepts at one place, from its own "unknown key" message.
    fn loader_keys(registry: &str, policy: &str) -> Vec<String> {
        let src = |text: &str| crate::load::Source {
            name: "f.toml".into(),
            text: text.into(),
        };
        let e = crate::load::load_sources(&[src(registry)], &[src(policy)])
            .expect_err("an unknown key must fail");
        let msg = e.to_string();
        let list = msg
            .split("expected one of ")
            .nth(1)
            .or_else(|| msg.split("expected ").nth(1))
            .unwrap_or_else(|| panic!("{msg}"));
        let mut keys: Vec<String> = list
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    }

    #[test]
    fn the_mirrors_accept_exactly_the_keys_the_loader_accepts() {
        let reg = schema(SchemaKind::Registry);
        let pol = schema(SchemaKind::Policy);
        let bogus = "zz_not_a_key = 1\n";
        assert_eq!(properties(&reg, None), loader_keys(bogus, ""));
        assert_eq!(
            properties(&reg, Some("Capability")),
            loader_keys(&format!("[[capability]]\nid = \"c\"\n{bogus}"), "")
        );
        assert_eq!(
            properties(&reg, Some("Worker")),
            loader_keys(&format!("[[worker]]\nid = \"w\"\n{bogus}"), "")
        );
        assert_eq!(properties(&pol, None), loader_keys("", bogus));
        assert_eq!(
            properties(&pol, Some("Settings")),
            loader_keys("", &format!("[settings]\n{bogus}"))
        );
        assert_eq!(
            properties(&pol, Some("Rule")),
            loader_keys(
                "",
                &format!("[[rule]]\nid = \"r\"\neffect = \"allow\"\n{bogus}")
            )
        );
    }
}
