//! Configuration: `hall.toml`, then `HALL_*` environment variables, then flags.
//!
//! One resolution serves the daemon and every client command, so `hall status` talks to the
//! address in `listen` with the token file in `state_dir` of the same file `hall serve` read.
//! The file is the first of: `--config`, `HALL_CONFIG`, then the per-user and system
//! locations `install.sh` writes (see [`default_config_files`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// When an audit append may return, relative to the disk (`audit.durability`): `durable`
/// (after the flush, the default) or `batched` (before it; a crash may lose the last
/// batch). The daemon maps it onto the audit log's own setting when it opens the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    #[default]
    Durable,
    Batched,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "durable" => Ok(Durability::Durable),
            "batched" => Ok(Durability::Batched),
            other => Err(format!(
                "audit durability must be \"durable\" or \"batched\", not {other:?}"
            )),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "pretty" => Ok(LogFormat::Pretty),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "log format must be \"json\" or \"pretty\", got {other:?}"
            )),
        }
    }
}

/// The merged configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub registry_dir: PathBuf,
    pub policies_dir: PathBuf,
    pub state_dir: PathBuf,
    pub allowed_origins: Vec<String>,
    pub audit_durability: Durability,
    pub audit_retention_days: Option<u32>,
    pub release_ttl_secs: u64,
    /// Most approvals one tenant may have pending (`[approvals] max_pending_per_tenant`).
    pub approvals_max_pending: usize,
    /// How far (in audit records written since it connected) an event stream may fall
    /// behind before it is dropped (`[events] max_lag`).
    pub events_max_lag: u64,
    pub log_format: LogFormat,
    /// The config file that was read, if any.
    pub config_file: Option<PathBuf>,
    /// How that file was chosen (or why none was).
    pub config_origin: ConfigOrigin,
    /// The default locations looked at when neither `--config` nor `HALL_CONFIG` named a
    /// file (empty when one did): for messages that say where Hall looked.
    pub config_tried: Vec<PathBuf>,
    /// `hall serve --allow-non-loopback`: listen beyond loopback (never from a file or variable).
    pub allow_non_loopback: bool,
    /// `hall serve --accept-audit-truncation`: start on an audit log shorter than its
    /// checkpoint (never from a file or variable).
    pub accept_audit_truncation: bool,
}

/// Where the config file came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigOrigin {
    /// `--config FILE`.
    Flag,
    /// `HALL_CONFIG`.
    Env,
    /// Found at a default location (per-user, then system).
    Default,
    /// No file: built-in defaults, `HALL_*` and flags only.
    None,
}

impl ConfigOrigin {
    /// How to say it in a message.
    pub fn describe(self) -> &'static str {
        match self {
            ConfigOrigin::Flag => "--config",
            ConfigOrigin::Env => "HALL_CONFIG",
            ConfigOrigin::Default => "default location",
            ConfigOrigin::None => "no config file",
        }
    }
}

/// The per-user and system places `install.sh` writes `hall.toml`, in the order they are
/// tried: Linux `$XDG_CONFIG_HOME/hall` (else `~/.config/hall`), macOS
/// `~/Library/Application Support/hall`, then `/etc/hall`.
pub fn default_config_files(env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if cfg!(target_os = "macos") {
        if let Some(h) = env("HOME") {
            v.push(PathBuf::from(h).join("Library/Application Support/hall/hall.toml"));
        }
    } else if let Some(d) = env("XDG_CONFIG_HOME") {
        v.push(PathBuf::from(d).join("hall/hall.toml"));
    } else if let Some(h) = env("HOME") {
        v.push(PathBuf::from(h).join(".config/hall/hall.toml"));
    }
    v.push(PathBuf::from("/etc/hall/hall.toml"));
    v
}

/// Parse a listen address: `IP:PORT`, or `localhost:PORT` (taken as `127.0.0.1:PORT`, so
/// no name lookup decides where the daemon listens or where the CLI sends its token).
pub fn parse_listen(s: &str) -> Result<SocketAddr, ConfigError> {
    let t = s.trim();
    let parsed = t.parse::<SocketAddr>().ok().or_else(|| {
        let (host, port) = t.rsplit_once(':')?;
        if host.eq_ignore_ascii_case("localhost") {
            format!("127.0.0.1:{port}").parse().ok()
        } else {
            None
        }
    });
    parsed.ok_or_else(|| ConfigError::Listen(s.to_string()))
}

/// Values given on the command line; `None` leaves the lower layers in force.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub listen: Option<String>,
    pub registry_dir: Option<PathBuf>,
    pub policies_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub allowed_origins: Vec<String>,
    pub audit_durability: Option<String>,
    pub log_format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    registry_dir: Option<PathBuf>,
    policies_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    allowed_origins: Option<Vec<String>>,
    log_format: Option<String>,
    #[serde(default)]
    audit: FileAudit,
    #[serde(default)]
    secrets: FileSecrets,
    #[serde(default)]
    approvals: FileApprovals,
    #[serde(default)]
    events: FileEvents,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileApprovals {
    max_pending_per_tenant: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEvents {
    max_lag: Option<u64>,
}

/// Default and bounds of `[approvals] max_pending_per_tenant`.
pub const DEFAULT_MAX_PENDING_PER_TENANT: u64 = crate::store::approvals::DEFAULT_MAX_PENDING as u64;
const MAX_MAX_PENDING_PER_TENANT: u64 = 1_000_000;
/// Default and bounds of `[events] max_lag`.
pub const DEFAULT_EVENTS_MAX_LAG: u64 = 10_000;
const MAX_EVENTS_MAX_LAG: u64 = 10_000_000;

/// A whole number in `1..=max` from `var` (when set) or the file, else `default`; a value out
/// of range is an error naming the key, the range and what the value is for.
fn bounded(
    env: &dyn Fn(&str) -> Option<String>,
    var: &str,
    key: &str,
    file: Option<u64>,
    default: u64,
    max: u64,
    what: &str,
) -> Result<u64, ConfigError> {
    let (v, from) = match env(var) {
        Some(s) => (
            s.trim().parse::<u64>().map_err(|_| {
                ConfigError::Bounded(format!(
                    "{var} must be a whole number from 1 to {max} ({what}), got {s:?}"
                ))
            })?,
            var,
        ),
        None => (file.unwrap_or(default), key),
    };
    if !(1..=max).contains(&v) {
        return Err(ConfigError::Bounded(format!(
            "{from} must be from 1 to {max} ({what}; default {default}), got {v}"
        )));
    }
    Ok(v)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAudit {
    durability: Option<String>,
    retention_days: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSecrets {
    release_ttl: Option<u64>,
}

/// A configuration error, phrased for the person at the terminal: what is wrong, where, and
/// what to write instead.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {} (from {}): {source}", path.display(), origin.describe())]
    Read {
        path: PathBuf,
        origin: ConfigOrigin,
        #[source]
        source: std::io::Error,
    },
    #[error("config {}: {}{hint}", path.display(), source.message().trim())]
    Parse {
        path: PathBuf,
        /// `" (did you mean `listen`?)"` for a mistyped key, else empty.
        hint: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("listen {0:?} is not an address:port (for example 127.0.0.1:8765, localhost:8765 or [::1]:8765)")]
    Listen(String),
    #[error("allowed_origins: {0:?} is not an origin; write scheme://host[:port] with no path or trailing slash, e.g. http://localhost:3000 (\"null\" and wildcards are not accepted)")]
    Origin(String),
    /// A value with a fixed set of spellings (`audit.durability`, `log_format`).
    #[error("{0}")]
    Choice(String),
    #[error("HALL_AUDIT_RETENTION_DAYS must be a whole number of days, got {0:?}")]
    RetentionDays(String),
    #[error("audit retention_days must be at least 1 (leave it unset to keep everything)")]
    RetentionZero,
    #[error("HALL_SECRETS_RELEASE_TTL must be a number of seconds, got {0:?}")]
    ReleaseTtl(String),
    /// A whole number outside its range (`approvals.max_pending_per_tenant`, `events.max_lag`).
    #[error("{0}")]
    Bounded(String),
}

impl Config {
    /// Resolve from the process environment.
    pub fn resolve(flags: &Flags) -> Result<Config, ConfigError> {
        Self::resolve_with(flags, &|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Resolve with an injected environment (for tests).
    pub fn resolve_with(
        flags: &Flags,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config_tried = Vec::new();
        let (config_file, config_origin) = if let Some(p) = &flags.config {
            (Some(p.clone()), ConfigOrigin::Flag)
        } else if let Some(p) = env("HALL_CONFIG") {
            (Some(PathBuf::from(p)), ConfigOrigin::Env)
        } else {
            config_tried = default_config_files(env);
            match config_tried.iter().find(|p| p.is_file()) {
                Some(p) => (Some(p.clone()), ConfigOrigin::Default),
                None => (None, ConfigOrigin::None),
            }
        };
        let (file, base) = match &config_file {
            None => (FileConfig::default(), PathBuf::from(".")),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    origin: config_origin,
                    source,
                })?;
                let fc: FileConfig =
                    toml::from_str(&text).map_err(|source| ConfigError::Parse {
                        path: p.clone(),
                        hint: config_key_hint(source.message()),
                        source: Box::new(source),
                    })?;
                let base = p
                    .parent()
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
                (fc, base)
            }
        };
        let rel = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };

        let listen_s = flags
            .listen
            .clone()
            .or_else(|| env("HALL_LISTEN"))
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:8765".into());
        let listen = parse_listen(&listen_s)?;

        // A config found at a default location (an installed one) does not take the policy
        // files away from a checkout: `./registry` and `./policies` in the current directory
        // still win over its dirs, as they win over the built-in defaults.
        let discovered = config_origin == ConfigOrigin::Default;
        let pick_dir = |flag: &Option<PathBuf>, var: &str, filev: Option<PathBuf>, name: &str| {
            flag.clone()
                .or_else(|| env(var).map(PathBuf::from))
                .or_else(|| {
                    let local = PathBuf::from(name);
                    (discovered && local.is_dir()).then_some(local)
                })
                .or(filev.map(rel))
                .unwrap_or_else(|| default_config_subdir(name, env))
        };
        let registry_dir = pick_dir(
            &flags.registry_dir,
            "HALL_REGISTRY_DIR",
            file.registry_dir,
            "registry",
        );
        let policies_dir = pick_dir(
            &flags.policies_dir,
            "HALL_POLICIES_DIR",
            file.policies_dir,
            "policies",
        );
        let state_dir = flags
            .state_dir
            .clone()
            .or_else(|| env("HALL_STATE_DIR").map(PathBuf::from))
            .or(file.state_dir.map(rel))
            .unwrap_or_else(|| default_state_dir(env));

        let allowed_origins = if !flags.allowed_origins.is_empty() {
            flags.allowed_origins.clone()
        } else if let Some(v) = env("HALL_ALLOWED_ORIGINS") {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        } else {
            file.allowed_origins.unwrap_or_default()
        };
        // An entry that is not an origin would silently match nothing: say so at startup.
        if let Some(bad) = allowed_origins
            .iter()
            .find(|o| crate::origin::normalize_origin(o).is_none())
        {
            return Err(ConfigError::Origin(bad.clone()));
        }

        let audit_durability = flags
            .audit_durability
            .clone()
            .or_else(|| env("HALL_AUDIT_DURABILITY"))
            .or(file.audit.durability)
            .map_or(Ok(Durability::default()), |s| s.parse())
            .map_err(ConfigError::Choice)?;
        let audit_retention_days: Option<u32> = match env("HALL_AUDIT_RETENTION_DAYS") {
            Some(v) => Some(v.parse().map_err(|_| ConfigError::RetentionDays(v))?),
            None => file.audit.retention_days,
        };
        if audit_retention_days == Some(0) {
            // 0 would delete every record a minute after it is written, including the
            // decisions a secret release must find.
            return Err(ConfigError::RetentionZero);
        }
        let release_ttl_secs = match env("HALL_SECRETS_RELEASE_TTL") {
            Some(v) => v.parse().map_err(|_| ConfigError::ReleaseTtl(v))?,
            None => file.secrets.release_ttl.unwrap_or(300),
        };
        let approvals_max_pending = bounded(
            env,
            "HALL_APPROVALS_MAX_PENDING_PER_TENANT",
            "approvals.max_pending_per_tenant",
            file.approvals.max_pending_per_tenant,
            DEFAULT_MAX_PENDING_PER_TENANT,
            MAX_MAX_PENDING_PER_TENANT,
            "the most approvals one tenant may have pending",
        )? as usize;
        let events_max_lag = bounded(
            env,
            "HALL_EVENTS_MAX_LAG",
            "events.max_lag",
            file.events.max_lag,
            DEFAULT_EVENTS_MAX_LAG,
            MAX_EVENTS_MAX_LAG,
            "audit records an event stream may fall behind before it is dropped",
        )?;
        let log_format = flags
            .log_format
            .clone()
            .or_else(|| env("HALL_LOG_FORMAT"))
            .or(file.log_format)
            .map_or(Ok(LogFormat::default()), |s| s.parse())
            .map_err(ConfigError::Choice)?;

        Ok(Config {
            listen,
            registry_dir,
            policies_dir,
            state_dir,
            allowed_origins,
            audit_durability,
            audit_retention_days,
            release_ttl_secs,
            approvals_max_pending,
            events_max_lag,
            log_format,
            config_file,
            config_origin,
            config_tried,
            allow_non_loopback: false,
            accept_audit_truncation: false,
        })
    }

    /// The paths a load of the policy files reads, and the config that named them, for
    /// messages that must say where Hall looked.
    pub fn describe_sources(&self) -> String {
        // Absolute, so "registry" is not mistaken for a path relative to somewhere else.
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let mut s = format!(
            "registry {}, policies {}",
            abs(&self.registry_dir).display(),
            abs(&self.policies_dir).display()
        );
        match (&self.config_file, self.config_origin) {
            (Some(f), o) => s.push_str(&format!(" (config {} from {})", f.display(), o.describe())),
            (None, _) => {
                let tried: Vec<String> = self
                    .config_tried
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                s.push_str(&format!(" (no hall.toml at {})", tried.join(" or ")));
            }
        }
        s
    }
}

/// Every key `hall.toml` accepts, for "did you mean".
const CONFIG_KEYS: &[&str] = &[
    "listen",
    "registry_dir",
    "policies_dir",
    "state_dir",
    "allowed_origins",
    "log_format",
    "audit",
    "secrets",
    "durability",
    "retention_days",
    "release_ttl",
    "approvals",
    "max_pending_per_tenant",
    "events",
    "max_lag",
];

/// `, did you mean "listen"?` for serde's ``unknown field `lisen` `` message.
fn config_key_hint(msg: &str) -> String {
    let Some(rest) = msg.split("unknown field `").nth(1) else {
        return String::new();
    };
    let key = rest.split('`').next().unwrap_or("");
    crate::suggest::did_you_mean(key, CONFIG_KEYS.iter().copied())
        .map(|k| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default()
}

/// `./registry` when present, else the service's or user's config dir, else `/etc/hall`.
fn default_config_subdir(name: &str, env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    let local = PathBuf::from(name);
    if local.is_dir() {
        return local;
    }
    let mut candidates = Vec::new();
    if let Some(d) = env("CONFIGURATION_DIRECTORY") {
        candidates.push(PathBuf::from(d).join(name));
    }
    if let Some(d) = env("XDG_CONFIG_HOME") {
        candidates.push(PathBuf::from(d).join("hall").join(name));
    } else if let Some(h) = env("HOME") {
        candidates.push(PathBuf::from(h).join(".config/hall").join(name));
    }
    candidates.push(PathBuf::from("/etc/hall").join(name));
    candidates
        .iter()
        .find(|p| p.is_dir())
        .cloned()
        .unwrap_or(local)
}

/// `$STATE_DIRECTORY` under systemd, else `$XDG_DATA_HOME/hall`, else `~/.local/share/hall`.
fn default_state_dir(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(d) = env("STATE_DIRECTORY") {
        // systemd may pass several, colon-separated; ours is the first.
        return PathBuf::from(d.split(':').next().unwrap_or(&d));
    }
    if let Some(d) = env("XDG_DATA_HOME") {
        return PathBuf::from(d).join("hall");
    }
    if let Some(h) = env("HOME") {
        return PathBuf::from(h).join(".local/share/hall");
    }
    PathBuf::from("/var/lib/hall")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn precedence_file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("hall.toml");
        std::fs::write(
            &cfg,
            "listen = \"127.0.0.1:9000\"\nstate_dir = \"st\"\n[audit]\ndurability = \"batched\"\n[secrets]\nrelease_ttl = 60\n",
        )
        .unwrap();
        let flags = Flags {
            config: Some(cfg.clone()),
            ..Default::default()
        };
        let c = Config::resolve_with(&flags, &env_of(&[])).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(
            c.state_dir,
            dir.path().join("st"),
            "relative to the config file"
        );
        assert_eq!(c.audit_durability, Durability::Batched);
        assert_eq!(c.release_ttl_secs, 60);

        let c = Config::resolve_with(
            &flags,
            &env_of(&[
                ("HALL_LISTEN", "127.0.0.1:9001"),
                ("HALL_AUDIT_DURABILITY", "durable"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9001);
        assert_eq!(c.audit_durability, Durability::Durable);

        let flags = Flags {
            listen: Some("127.0.0.1:9002".into()),
            ..flags
        };
        let c =
            Config::resolve_with(&flags, &env_of(&[("HALL_LISTEN", "127.0.0.1:9001")])).unwrap();
        assert_eq!(c.listen.port(), 9002);
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::resolve_with(
            &Flags {
                listen: Some("nope".into()),
                ..Default::default()
            },
            &env_of(&[]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"nope\""), "{e}");
        let e = Config::resolve_with(
            &Flags::default(),
            &env_of(&[("HALL_AUDIT_DURABILITY", "sometimes")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("durable"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("hall.toml");
        std::fs::write(&cfg, "lisen = \"x\"\n").unwrap();
        let e = Config::resolve_with(
            &Flags {
                config: Some(cfg),
                ..Default::default()
            },
            &env_of(&[]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("lisen"), "{e}");
    }

    #[test]
    fn localhost_listen_and_any_case_log_format_are_accepted() {
        assert_eq!(
            parse_listen("localhost:8767").unwrap(),
            "127.0.0.1:8767".parse::<SocketAddr>().unwrap()
        );
        assert!(parse_listen("example.com:80").is_err(), "no name lookups");
        let c = Config::resolve_with(
            &Flags::default(),
            &env_of(&[("HALL_LOG_FORMAT", "JSON"), ("HOME", "/nonexistent")]),
        )
        .unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn the_config_file_is_found_at_the_per_user_location() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path().to_str().unwrap().to_string();
        let user = if cfg!(target_os = "macos") {
            home.path()
                .join("Library/Application Support/hall/hall.toml")
        } else {
            home.path().join(".config/hall/hall.toml")
        };
        let c = Config::resolve_with(&Flags::default(), &env_of(&[("HOME", &h)])).unwrap();
        assert_eq!(c.config_origin, ConfigOrigin::None);
        assert!(c.config_tried.contains(&user), "{:?}", c.config_tried);
        std::fs::create_dir_all(user.parent().unwrap()).unwrap();
        std::fs::write(&user, "listen = \"127.0.0.1:9911\"\nstate_dir = \"st\"\n").unwrap();
        let c = Config::resolve_with(&Flags::default(), &env_of(&[("HOME", &h)])).unwrap();
        assert_eq!(c.config_origin, ConfigOrigin::Default);
        assert_eq!(c.listen.port(), 9911);
        assert_eq!(c.state_dir, user.parent().unwrap().join("st"));
        // HALL_CONFIG names another file: the default one is not read.
        let other = home.path().join("other.toml");
        std::fs::write(&other, "listen = \"127.0.0.1:9912\"\n").unwrap();
        let c = Config::resolve_with(
            &Flags::default(),
            &env_of(&[("HOME", &h), ("HALL_CONFIG", other.to_str().unwrap())]),
        )
        .unwrap();
        assert_eq!(c.config_origin, ConfigOrigin::Env);
        assert_eq!(c.listen.port(), 9912);
    }

    #[test]
    fn zero_retention_is_refused() {
        let e = Config::resolve_with(
            &Flags::default(),
            &env_of(&[("HALL_AUDIT_RETENTION_DAYS", "0")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("at least 1"), "{e}");
        let c = Config::resolve_with(
            &Flags::default(),
            &env_of(&[("HALL_AUDIT_RETENTION_DAYS", "1")]),
        )
        .unwrap();
        assert_eq!(c.audit_retention_days, Some(1));
    }

    #[test]
    fn approval_cap_and_event_lag_are_bounded() {
        let c = Config::resolve_with(&Flags::default(), &env_of(&[])).unwrap();
        assert_eq!(c.approvals_max_pending, 1000);
        assert_eq!(c.events_max_lag, 10_000);
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("hall.toml");
        let flags = Flags {
            config: Some(cfg.clone()),
            ..Default::default()
        };
        std::fs::write(
            &cfg,
            "[approvals]\nmax_pending_per_tenant = 2\n[events]\nmax_lag = 50\n",
        )
        .unwrap();
        let c = Config::resolve_with(&flags, &env_of(&[])).unwrap();
        assert_eq!((c.approvals_max_pending, c.events_max_lag), (2, 50));
        let c = Config::resolve_with(
            &flags,
            &env_of(&[
                ("HALL_APPROVALS_MAX_PENDING_PER_TENANT", "7"),
                ("HALL_EVENTS_MAX_LAG", "9"),
            ]),
        )
        .unwrap();
        assert_eq!((c.approvals_max_pending, c.events_max_lag), (7, 9));
        for (text, key) in [
            (
                "[approvals]\nmax_pending_per_tenant = 0\n",
                "approvals.max_pending_per_tenant",
            ),
            (
                "[approvals]\nmax_pending_per_tenant = 5000000\n",
                "approvals.max_pending_per_tenant",
            ),
            ("[events]\nmax_lag = 0\n", "events.max_lag"),
        ] {
            std::fs::write(&cfg, text).unwrap();
            let e = Config::resolve_with(&flags, &env_of(&[])).unwrap_err();
            assert!(
                e.to_string().contains(key) && e.to_string().contains("from 1 to"),
                "{e}"
            );
        }
        let e = Config::resolve_with(
            &Flags::default(),
            &env_of(&[("HALL_APPROVALS_MAX_PENDING_PER_TENANT", "many")]),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("HALL_APPROVALS_MAX_PENDING_PER_TENANT"),
            "{e}"
        );
        std::fs::write(&cfg, "[approvals]\nmax_pending = 3\n").unwrap();
        let e = Config::resolve_with(&flags, &env_of(&[])).unwrap_err();
        assert!(
            e.to_string().contains("max_pending_per_tenant"),
            "did you mean: {e}"
        );
    }

    #[test]
    fn state_dir_defaults() {
        let c = Config::resolve_with(&Flags::default(), &env_of(&[("HOME", "/home/u")])).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/home/u/.local/share/hall"));
        let c =
            Config::resolve_with(&Flags::default(), &env_of(&[("XDG_DATA_HOME", "/x")])).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/x/hall"));
        let c = Config::resolve_with(
            &Flags::default(),
            &env_of(&[("STATE_DIRECTORY", "/var/lib/hall"), ("HOME", "/h")]),
        )
        .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/hall"));
    }

    #[test]
    fn allowed_origins_must_be_origins() {
        for bad in ["http://localhost:3000/", "*", "null", "localhost:3000"] {
            let flags = Flags {
                allowed_origins: vec!["http://ok.example".into(), bad.into()],
                ..Default::default()
            };
            let e = Config::resolve_with(&flags, &env_of(&[])).unwrap_err();
            assert!(
                e.to_string().contains("allowed_origins") && e.to_string().contains(bad),
                "{}",
                e.to_string()
            );
        }
        let e = Config::resolve_with(
            &Flags::default(),
            &env_of(&[(
                "HALL_ALLOWED_ORIGINS",
                "http://a.example, https://b.example/x",
            )]),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("https://b.example/x"),
            "{}",
            e.to_string()
        );
        let flags = Flags {
            allowed_origins: vec!["HTTP://App.Example:8080".into()],
            ..Default::default()
        };
        let c = Config::resolve_with(&flags, &env_of(&[])).unwrap();
        assert_eq!(c.allowed_origins, ["HTTP://App.Example:8080"]);
    }
}
