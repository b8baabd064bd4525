//! The `hall` command line: offline commands run the engine directly; client commands
//! are thin HTTP clients of a running daemon.

mod approvals;
pub mod client;
mod error;
mod events;
pub mod fixtures;
mod human;
pub mod import;
mod mcp;
mod offline;
pub mod replay;
pub mod schema;
pub use crate::suggest;
pub use error::CliError;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Hall: a local policy router for AI agents.
///
/// Apps ask `POST /api/route` whether a capability may be used, and which worker should do
/// it; Hall answers from the registry and policy files, records every decision in an audit
/// log, and keeps the secrets workers need.
#[derive(Debug, Parser)]
#[command(
    name = "hall",
    version,
    propagate_version = true,
    after_help = "Client commands find the daemon and its admin token through hall.toml: --config, \
else HALL_CONFIG, else the per-user file (~/.config/hall/hall.toml, or on macOS \
~/Library/Application Support/hall/hall.toml), else /etc/hall/hall.toml. The URL is \
http://<listen>; the token is --token, else HALL_TOKEN, else <state_dir>/admin.token. \
--url and HALL_URL name another daemon.\n\n\
Exit codes: 0 ok or allowed; 1 denied (route) or a failed check, test, verify or request; \
2 usage error (bad flag, bad value, bad config); 3 the daemon could not be reached or \
refused the call (401, 403, 429, 5xx)."
)]
pub struct Cli {
    /// Print JSON instead of tables (the default when stdout is not a terminal).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Documented exit codes.
pub mod exit {
    /// Success; an allowed `route`.
    pub const OK: u8 = 0;
    /// A denied `route`; a failed check, test, verify; a request the daemon answered "no" to
    /// that is not an authorization failure (404, 409, 422).
    pub const FAILURE: u8 = 1;
    /// A usage error: bad flag or value, bad config file, a request the daemon called invalid (400).
    pub const USAGE: u8 = 2;
    /// The daemon could not be reached, or refused the call (401, 403, 429, 5xx).
    pub const DAEMON: u8 = 3;
}

/// A duration for a flag, in seconds, more than zero: what `--expires-in` has always taken.
/// See [`flag_duration`].
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    flag_duration(s, Spelling::Lenient)
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            format!(
                "{s:?} is not a duration: write seconds (3600) or a number and one unit, s, m, h \
                 or d (30m, 12h, 7d)"
            )
        })
}

/// How much of the previous release's spelling a duration flag takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spelling {
    /// `--expires-in`: also a bare number of seconds (`3600`), blanks around and between
    /// number and unit (`" 30 m "`), a leading `+` (`+5m`).
    Lenient,
    /// `hall replay --since/--until`: `<digits><unit>` only, as the rule keys.
    Strict,
}

/// A duration given on the command line, in seconds: the spelling is rewritten in front of
/// [`crate::clock::parse_duration`], the one duration syntax, which policy files keep strict
/// (`<1 to 9 digits><s|m|h|d>`). The CLI took more before that syntax was shared, and still
/// does: any number of digits (leading zeros dropped; a number longer than 9 digits counts
/// units of what `parse_duration` says one unit is, overflow refused), and for
/// [`Spelling::Lenient`] what is listed there. The units and their meaning are
/// `parse_duration`'s alone.
pub fn flag_duration(s: &str, spelling: Spelling) -> Option<u64> {
    let lenient = spelling == Spelling::Lenient;
    let s = if lenient { s.trim() } else { s };
    let (number, unit) = match s.char_indices().next_back()? {
        // A bare number: seconds.
        (_, c) if lenient && c.is_ascii_digit() => (s, "s"),
        (i, _) => (&s[..i], &s[i..]),
    };
    let digits = if lenient {
        let n = number.trim();
        n.strip_prefix('+').unwrap_or(n)
    } else {
        number
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = match digits.trim_start_matches('0') {
        "" => "0",
        d => d,
    };
    if digits.len() <= 9 {
        return crate::clock::parse_duration(&format!("{digits}{unit}"));
    }
    let per_unit = crate::clock::parse_duration(&format!("1{unit}"))?;
    digits.parse::<u64>().ok()?.checked_mul(per_unit)
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (default 127.0.0.1:8765).
    Serve(ServeArgs),
    /// Validate and lint the registry and policy files; exit 1 on errors.
    Check(CheckArgs),
    /// Run decision fixtures offline; prints "N passed, N failed"; exit 1 on a failure.
    Test(TestArgs),
    /// Ask for a decision (from the daemon, or offline); exit 1 when denied.
    Route(RouteArgs),
    /// Show the daemon's status: policy version, last reload, audit head, counters.
    Status(ClientArgs),
    /// Make the daemon reload its files now.
    Reload(ClientArgs),
    /// Manage API tokens (admin).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Manage secrets; values are never printed.
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Read, verify and export the audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Follow the event stream (decisions, approvals, reloads) as JSON lines.
    Events(events::EventsArgs),
    /// The approval queue: list, show (--wait), approve, deny, cancel.
    #[command(subcommand)]
    Approvals(approvals::ApprovalsCmd),
    /// Serve the Model Context Protocol on stdin/stdout, forwarding to the daemon's /mcp
    /// (for assistants configured with a command: `command = "hall"`, `args = ["mcp"]`).
    Mcp(ClientArgs),
    /// Re-decide the recorded requests under candidate files and show what would change
    /// (from the state dir when the daemon is stopped, else through its API).
    Replay(replay::ReplayArgs),
    /// Translate another router's files into Hall TOML (`hall import pyhall ...`).
    #[command(subcommand)]
    Import(import::ImportCmd),
    /// Print the version.
    Version,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Install, for example:\n  \
hall completions bash > ~/.local/share/bash-completion/completions/hall\n  \
hall completions zsh > ~/.zfunc/_hall   (with fpath+=~/.zfunc before compinit)\n  \
hall completions fish > ~/.config/fish/completions/hall.fish")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) for hall(1): `hall man | man -l -`.
    Man,
    /// Print the JSON Schema of registry, policy or fixture files (for editors that validate TOML).
    #[command(
        after_help = "For Taplo / Even Better TOML, save it and point a file at it:\n  \
hall schema policy > policy.schema.json\n  \
then put  #:schema ./policy.schema.json  on the first line of a policy file."
    )]
    Schema {
        /// Which file.
        kind: schema::SchemaKind,
    },
}

/// Where the policy files are (flags override `hall.toml` and `HALL_*`).
#[derive(Debug, Args, Clone, Default)]
pub struct FilesArgs {
    /// Config file (also HALL_CONFIG).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Registry directory (default ./registry, else the config dir).
    #[arg(long, value_name = "DIR")]
    pub registry: Option<PathBuf>,
    /// Policies directory (default ./policies, else the config dir).
    #[arg(long, value_name = "DIR")]
    pub policies: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Each setting comes from hall.toml, then a HALL_* variable, then the flag \
(each overriding the one before):\n\
  HALL_CONFIG                 the config file (else ~/.config/hall/hall.toml, or on macOS\n\
                              ~/Library/Application Support/hall/hall.toml, else /etc/hall/hall.toml)\n\
  HALL_LISTEN                 listen address (default 127.0.0.1:8765)\n\
  HALL_REGISTRY_DIR           registry dir (default ./registry when present)\n\
  HALL_POLICIES_DIR           policies dir (default ./policies when present)\n\
  HALL_STATE_DIR              state dir (default $XDG_DATA_HOME/hall or ~/.local/share/hall)\n\
  HALL_ALLOWED_ORIGINS        comma-separated browser origins allowed to call the API\n\
  HALL_AUDIT_DURABILITY       durable (default) or batched\n\
  HALL_AUDIT_RETENTION_DAYS   delete audit records older than this many days (default: keep)\n\
  HALL_SECRETS_RELEASE_TTL    seconds after a decision its secrets may be released (default 300)\n\
  HALL_LOG_FORMAT             pretty (default) or json; the level comes from RUST_LOG\n\
  HALL_MASTER_KEY_FILE        master key file for secrets, when no OS keyring is reachable\n\
  HALL_KEYRING                off: do not try the OS keyring\n\n\
SIGHUP re-reads the registry and policy files (not hall.toml: restart for config changes); \
SIGTERM and SIGINT stop gracefully."
)]
pub struct ServeArgs {
    #[command(flatten)]
    pub files: FilesArgs,
    /// Address to listen on (default 127.0.0.1:8765).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// State directory: audit log, tokens, secrets (created 0700).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// An Origin browsers may call from (repeatable). Default: none.
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,
    /// Audit durability: durable (default) or batched.
    #[arg(long, value_name = "MODE")]
    pub audit_durability: Option<String>,
    /// Log format: pretty (default) or json. Level from RUST_LOG.
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Allow listening on a non-loopback address (exposes the API to the network).
    #[arg(long)]
    pub allow_non_loopback: bool,
    /// Start even though the audit log holds fewer records than its checkpoint says were
    /// durable (damaged storage); the loss is recorded and reported by status and verify.
    #[arg(long)]
    pub accept_audit_truncation: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub files: FilesArgs,
    /// Treat warnings as errors.
    #[arg(long)]
    pub strict: bool,
    /// Output: text (file:line:col lines, errors with the source line and a caret) or json
    /// (one object with every diagnostic, for editors and CI annotations).
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub format: String,
}

#[derive(Debug, Args)]
pub struct TestArgs {
    #[command(flatten)]
    pub files: FilesArgs,
    /// Fixture files ([[case]] tables).
    #[arg(required = true, value_name = "FILE")]
    pub fixtures: Vec<PathBuf>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Exit code 0 when allowed, 1 when denied, 2 on a bad request, 3 when the \
daemon cannot be reached or refuses the call."
)]
pub struct RouteArgs {
    /// Capability id to ask for, e.g. cap.doc.summarize.
    #[arg(long, value_name = "ID")]
    pub capability: String,
    /// Environment the work runs in, e.g. dev, staging, prod (as listed in [settings]).
    #[arg(long, value_name = "ENV")]
    pub env: String,
    /// Data sensitivity label, e.g. PUBLIC, INTERNAL, CONFIDENTIAL, SECRET.
    #[arg(long, value_name = "LABEL")]
    pub label: String,
    /// Tenant the work is for, e.g. org.acme.
    #[arg(long, value_name = "ID")]
    pub tenant: String,
    /// Include the explain trace: rules tried and why each candidate worker was skipped.
    #[arg(long)]
    pub explain: bool,
    /// Ask without it counting as a real decision (recorded as a dry run).
    #[arg(long)]
    pub dry_run: bool,
    /// Your id for this request, recorded in the audit log.
    #[arg(long, value_name = "ID")]
    pub correlation_id: Option<String>,
    /// A JSON object recorded with the decision (at most 8 KiB).
    #[arg(long, value_name = "JSON")]
    pub context: Option<String>,
    /// Tenant risk class, recorded with the decision.
    #[arg(long, value_name = "VALUE")]
    pub tenant_risk: Option<String>,
    /// Quality-of-service class, recorded with the decision.
    #[arg(long, value_name = "VALUE")]
    pub qos_class: Option<String>,
    /// Redeem an approval (apr_...) from an earlier `approval_required` answer.
    #[arg(long, value_name = "APPROVAL_ID")]
    pub approval_id: Option<String>,
    /// When the answer is an approval to wait for: wait until a person decides, then redeem it.
    #[arg(long)]
    pub wait: bool,
    /// Decide locally from the files instead of asking the daemon.
    #[arg(long)]
    pub offline: bool,
    /// Daemon URL (also HALL_URL; default: http://<listen> from hall.toml, else http://127.0.0.1:8765).
    #[arg(long, value_name = "URL", conflicts_with = "offline")]
    pub url: Option<String>,
    /// API token (also HALL_TOKEN; default: <state_dir>/admin.token). Visible to other local users in `ps`: prefer HALL_TOKEN.
    #[arg(long, value_name = "TOKEN", conflicts_with = "offline")]
    pub token: Option<String>,
    #[command(flatten)]
    pub files: FilesArgs,
}

impl RouteArgs {
    /// The client settings of this command (`--config` is shared with the files).
    pub fn client_args(&self) -> ClientArgs {
        ClientArgs {
            url: self.url.clone(),
            token: self.token.clone(),
            config: self.files.config.clone(),
        }
    }
}

/// How a client command finds the daemon: see [`client::Client::from_args`].
#[derive(Debug, Args, Clone, Default)]
pub struct ClientArgs {
    /// Daemon URL (also HALL_URL; default: http://<listen> from hall.toml, else http://127.0.0.1:8765).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// API token (also HALL_TOKEN; default: <state_dir>/admin.token). Visible to other local users in `ps`: prefer HALL_TOKEN.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Config file naming listen and state_dir (also HALL_CONFIG; default: the per-user, then the system hall.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Issue a token; it is printed once and never again.
    Create {
        /// A name to recognise it by in `hall token list`.
        #[arg(long)]
        name: String,
        /// Scopes, repeatable or comma-separated: route, audit, metrics, secrets:write, secrets:release, approve, admin.
        #[arg(long = "scope", required = true, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Bind the token to one tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Expire after this long: seconds (3600) or 30m, 12h, 7d.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
        expires_in: Option<u64>,
        /// Requests per minute allowed.
        #[arg(long, value_name = "PER_MIN")]
        rate_limit: Option<u32>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List tokens (never the tokens themselves).
    List(ClientArgs),
    /// Revoke a token by id; effective at once.
    Revoke {
        /// The token's id (tok_..., from `hall token list`).
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Store a secret; the value is read from stdin (or a prompt), never from the command line.
    Set {
        /// The secret's name, as workers list it in `secrets`.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List secret names and times (never values).
    List(ClientArgs),
    /// Delete a secret.
    Rm {
        /// The secret's name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Re-encrypt every secret under a new master key.
    RotateKey(ClientArgs),
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Show the newest records.
    Tail {
        /// How many records.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u32,
        /// Keep following: print new records as they are written (Ctrl-C to stop).
        #[arg(short = 'f', long)]
        follow: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show the record of one decision.
    Show {
        /// The decision id from a route answer.
        decision_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Walk the hash chain; exit 1 and name the first bad record if it is broken.
    Verify {
        /// Verify offline: open the log in this state dir directly (a stopped daemon's, or a
        /// copy) instead of asking the daemon. Nothing is appended to it.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Write records as JSON lines (for Vector, Fluent Bit, ...).
    Export {
        /// Export offline from this state dir (a stopped daemon's, or a copy).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Start after this sequence number.
        #[arg(long, value_name = "SEQ")]
        after_seq: Option<u64>,
        /// Only records at or after this time (RFC 3339).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Write to this file instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Parse the command line and run; the exit code is one of [`exit`].
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json || !std::io::stdout().is_terminal();
    if !matches!(cli.command, Command::Serve(_)) {
        // A command whose output is piped into `head` should stop quietly when the reader
        // goes away, like any Unix tool, not panic on EPIPE. (Rust ignores SIGPIPE by
        // default, which the daemon keeps: a client hanging up must not kill it.)
        // SAFETY: setting a signal's disposition to the default, before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Serve(a) => serve(a),
        Command::Check(a) => offline::check(&a, cli.json),
        Command::Test(a) => offline::test(&a),
        Command::Route(a) if a.offline => offline::route(&a, json),
        Command::Route(a) => client::route(&a, json),
        Command::Status(c) => client::status(&c, json),
        Command::Reload(c) => client::reload(&c, json),
        Command::Token(t) => client::token(t, json),
        Command::Secret(s) => client::secret(s, json),
        Command::Audit(a) => client::audit(a, json),
        Command::Mcp(c) => mcp::run(&c),
        Command::Replay(a) => replay::run(&a),
        Command::Import(c) => import::run(c),
        Command::Approvals(a) => approvals::run(a, cli.json),
        Command::Events(a) => events::run(&a),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "hall", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => man(),
        Command::Schema { kind } => {
            let text = serde_json::to_string_pretty(&schema::schema(kind)).unwrap_or_default();
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("hall {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hall: {}", e.report());
            ExitCode::from(e.exit_code())
        }
    }
}

/// `hall serve`: build the daemon's [`Config`](crate::config::Config) from the flags, the
/// environment and `hall.toml`, and run it.
fn serve(a: ServeArgs) -> CliResult {
    let mut config = crate::config::Config::resolve(&crate::config::Flags {
        config: a.files.config,
        listen: a.listen,
        registry_dir: a.files.registry,
        policies_dir: a.files.policies,
        state_dir: a.state_dir,
        allowed_origins: a.allowed_origins,
        audit_durability: a.audit_durability,
        log_format: a.log_format,
    })?;
    config.allow_non_loopback = a.allow_non_loopback;
    config.accept_audit_truncation = a.accept_audit_truncation;
    crate::server::run(config)?;
    Ok(ExitCode::SUCCESS)
}

/// hall(1): one page for the whole tool, each command (and each command of a group such
/// as `token create`) in its own section with its synopsis, options and notes.
fn man() -> CliResult {
    let cmd = <Cli as clap::CommandFactory>::command();
    let render = || -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let page = clap_mangen::Man::new(cmd.clone());
        page.render_title(&mut out)?;
        page.render_name_section(&mut out)?;
        page.render_synopsis_section(&mut out)?;
        page.render_description_section(&mut out)?;
        page.render_options_section(&mut out)?;
        page.render_extra_section(&mut out)?;
        man_commands(&cmd, "hall", &mut out)?;
        page.render_version_section(&mut out)?;
        Ok(out)
    };
    let out = render().map_err(|e| CliError::io("rendering the man page", e))?;
    use std::io::Write;
    std::io::stdout()
        .write_all(&out)
        .map_err(|e| CliError::io("writing the man page to stdout", e))?;
    Ok(ExitCode::SUCCESS)
}

fn man_commands(cmd: &clap::Command, prefix: &str, out: &mut Vec<u8>) -> std::io::Result<()> {
    for sub in cmd.get_subcommands() {
        let name = format!("{prefix} {}", sub.get_name());
        if sub.get_name() == "help" {
            continue;
        }
        let mut roff = clap_mangen::roff::Roff::new();
        roff.control("SH", [name.to_uppercase().as_str()]);
        out.extend_from_slice(roff.to_roff().as_bytes());
        let m = clap_mangen::Man::new(sub.clone().bin_name(name.clone()));
        if sub.get_subcommands().next().is_none() {
            m.render_synopsis_section(out)?;
        }
        m.render_description_section(out)?;
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            m.render_options_section(out)?;
        }
        if sub.get_after_help().is_some() || sub.get_after_long_help().is_some() {
            m.render_extra_section(out)?;
        }
        man_commands(sub, &name, out)?;
    }
    Ok(())
}

/// What a command returns: the exit code it chose, or the error (whose code
/// [`CliError::exit_code`] chooses).
pub type CliResult = Result<ExitCode, CliError>;

#[cfg(test)]
mod tests {
    use super::{flag_duration, parse_duration_secs as p, Spelling};

    #[test]
    fn durations_take_units() {
        assert_eq!(p("3600"), Ok(3600));
        assert_eq!(p("30m"), Ok(1800));
        assert_eq!(p("1h"), Ok(3600));
        assert_eq!(p("7d"), Ok(604_800));
        assert!(p("0").is_err());
        assert!(p("1w").is_err());
        assert!(p("h").is_err());
        // The syntax of the rule keys, plus bare seconds: one parser underneath.
        assert_eq!(p(" 15m "), Ok(900));
        // More than 9 digits, as the previous release took them (the rule keys do not).
        assert_eq!(p("9999999999s"), Ok(9_999_999_999));
        assert_eq!(crate::clock::parse_duration("9999999999s"), None);
    }

    /// What `--expires-in` took before its parser was replaced by the shared syntax, and
    /// takes again.
    #[test]
    fn expires_in_takes_the_previous_releases_spellings() {
        assert_eq!(p("30 m"), Ok(1800));
        assert_eq!(p("30\tm"), Ok(1800));
        assert_eq!(p("  12 h  "), Ok(43_200));
        assert_eq!(p("+5m"), Ok(300));
        assert_eq!(p("+5 m"), Ok(300));
        assert_eq!(p("+3600"), Ok(3600));
        assert_eq!(p("0005m"), Ok(300));
        assert_eq!(p("00000000005m"), Ok(300));
        assert_eq!(p("12345678901"), Ok(12_345_678_901));
        assert_eq!(p("1234567890m"), Ok(74_074_073_400));
        assert_eq!(p("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(p("18446744073709551615s"), Ok(u64::MAX));
    }

    #[test]
    fn expires_in_still_refuses_what_it_always_refused() {
        for bad in [
            "",
            " ",
            "m",
            "+",
            "+m",
            "-5m",
            "5 mm",
            "5mm",
            "1w",
            "1.5h",
            "5 5m",
            "+ 5m",
            "++5m",
            "0",
            "0m",
            "00000000000h",
            "5µ",
            // Overflow: u64 seconds, and more than u64 digits.
            "18446744073709551616",
            "307445734561825861m",
            "99999999999999999999999d",
        ] {
            let e = p(bad).expect_err(bad);
            assert_eq!(
                e,
                format!(
                    "{bad:?} is not a duration: write seconds (3600) or a number and one unit, \
                     s, m, h or d (30m, 12h, 7d)"
                )
            );
        }
    }

    #[test]
    fn strict_flags_take_any_number_of_digits_and_nothing_else_new() {
        let s = |t| flag_duration(t, Spelling::Strict);
        assert_eq!(s("90s"), Some(90));
        assert_eq!(s("0s"), Some(0));
        assert_eq!(s("1234567890s"), Some(1_234_567_890));
        assert_eq!(s("0000000001h"), Some(3600));
        for bad in ["30 m", "+5m", "3600", "m", "5mm", "1w", " 5m"] {
            assert_eq!(s(bad), None, "{bad:?}");
        }
    }

    /// `--expires-in`'s parser as the release before the shared duration syntax had it
    /// (`git show 759a2f0:src/cli/mod.rs`), kept here as the oracle of what must still be
    /// accepted, with the same value, and what must still be refused.
    fn previous_expires_in(s: &str) -> Option<u64> {
        let t = s.trim();
        let (num, mult) = match t.char_indices().last() {
            Some((i, 's')) => (&t[..i], 1),
            Some((i, 'm')) => (&t[..i], 60),
            Some((i, 'h')) => (&t[..i], 3600),
            Some((i, 'd')) => (&t[..i], 86_400),
            _ => (t, 1),
        };
        num.trim()
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .filter(|n| *n > 0)
    }

    proptest::proptest! {
        #[test]
        fn expires_in_agrees_with_the_previous_release(
            s in "[ \t+\\-0-9smhdw.µ]{0,24}|\\s{0,2}\\+?[0-9]{1,22}\\s{0,2}[smhdw]?\\s{0,2}"
        ) {
            proptest::prop_assert_eq!(p(&s).ok(), previous_expires_in(&s), "{:?}", s);
        }
    }
}
