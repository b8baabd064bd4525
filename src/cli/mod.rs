//! The `hall` command line: offline commands run the engine directly; client commands
//! are thin HTTP clients of a running daemon.

mod approvals;
mod client;
pub mod fixtures;
pub mod import;
mod mcp;
mod offline;
pub mod replay;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Hall: a local policy router for AI agents.
///
/// Apps ask `POST /api/route` whether a capability may be used, and which worker should do
/// it; Hall answers from the registry and policy files, records every decision in an audit
/// log, and keeps the secrets workers need.
#[derive(Debug, Parser)]
#[command(name = "hall", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
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
pub struct RouteArgs {
    #[arg(long, value_name = "ID")]
    pub capability: String,
    #[arg(long, value_name = "ENV")]
    pub env: String,
    #[arg(long, value_name = "LABEL")]
    pub label: String,
    #[arg(long, value_name = "ID")]
    pub tenant: String,
    /// Include the explain trace.
    #[arg(long)]
    pub explain: bool,
    /// Ask without it counting as a real decision (recorded as a dry run).
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long, value_name = "ID")]
    pub correlation_id: Option<String>,
    /// Redeem this approval (from an earlier `approval_required` answer).
    #[arg(long, value_name = "APPROVAL_ID")]
    pub approval_id: Option<String>,
    /// When the answer is an approval to wait for: wait until a person decides, then redeem it.
    #[arg(long)]
    pub wait: bool,
    /// Decide locally from the files instead of asking the daemon.
    #[arg(long)]
    pub offline: bool,
    #[command(flatten)]
    pub files: FilesArgs,
}

#[derive(Debug, Args, Clone, Default)]
pub struct ClientArgs {
    /// Daemon URL (also HALL_URL; default http://127.0.0.1:8765).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Issue a token; it is printed once and never again.
    Create {
        #[arg(long)]
        name: String,
        /// route, audit, metrics, secrets:write, secrets:release, approve, admin (repeatable or comma-separated).
        #[arg(long = "scope", required = true, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Bind the token to one tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Expire after this many seconds.
        #[arg(long, value_name = "SECS")]
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
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Store a secret; the value is read from stdin (or a prompt), never from the command line.
    Set {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List secret names and times (never values).
    List(ClientArgs),
    /// Delete a secret.
    Rm {
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
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show the record of one decision.
    Show {
        decision_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Walk the hash chain; exit 1 and name the first bad record if it is broken.
    Verify(ClientArgs),
    /// Write records as JSON lines (for Vector, Fluent Bit, ...).
    Export {
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

/// Parse the command line and run; the process exit code follows SPEC 7
/// (0 ok, 1 failure or a denied route, 2 usage error).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
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
        Command::Serve(a) => crate::server::run(a),
        Command::Check(a) => offline::check(&a),
        Command::Test(a) => offline::test(&a),
        Command::Route(a) if a.offline => offline::route(&a),
        Command::Route(a) => client::route(&a),
        Command::Status(c) => client::status(&c),
        Command::Reload(c) => client::reload(&c),
        Command::Token(t) => client::token(t),
        Command::Secret(s) => client::secret(s),
        Command::Audit(a) => client::audit(a),
        Command::Mcp(c) => mcp::run(&c),
        Command::Replay(a) => replay::run(&a),
        Command::Import(c) => import::run(c),
        Command::Approvals(a) => approvals::run(a),
        Command::Version => {
            println!("hall {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hall: {e}");
            ExitCode::FAILURE
        }
    }
}

/// An error for the person at the terminal.
pub type CliResult = Result<ExitCode, Box<dyn std::error::Error>>;
