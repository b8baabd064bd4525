//! The daemon (`hall serve`): actix-web on loopback, hot reload, graceful shutdown.

mod api;
mod approvals;
pub mod auth;
mod conn;
mod errors;
mod events;
pub mod guard;
mod mcp;
mod metrics;
mod ops;
mod record;
mod route;
mod state;
mod storage;

use std::sync::Arc;

use actix_web::{web, App, HttpServer};

pub use errors::ApiError;
pub use state::AppState;

use crate::config::{Config, LogFormat};

/// Why the daemon could not start, or stopped abnormally. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("refusing to listen on {0}: not a loopback address. Hall's API is meant for this machine only; pass --allow-non-loopback to expose it to the network anyway (remote clients must then address it by IP, http://<ip>:<port>: host names other than localhost get 403 bad_host)")]
    NotLoopback(std::net::SocketAddr),
    #[error("cannot use state dir {}: {source}", dir.display())]
    StateDir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source} (another daemon on that port? change listen in {config}, or pass --listen)")]
    PortTaken {
        addr: std::net::SocketAddr,
        /// The config file to change (`hall.toml` when none was read).
        config: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the database in {}: {source} (is another hall running on this state dir?)", dir.display())]
    Database {
        dir: std::path::PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A store that would not open (`what`: "the audit log", "the token store", ...).
    #[error("cannot open {what}: {source}")]
    Store {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot create the admin token: {0}")]
    AdminToken(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot record the admin token in the audit log: {0}")]
    AdminTokenAudit(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("master key: {0}")]
    MasterKey(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("server error: {0}")]
    Server(#[source] std::io::Error),
    #[error("could not re-execute to reopen the database: {0}")]
    Reexec(#[source] std::io::Error),
}

/// Run the daemon with `config` (built by the CLI) until SIGTERM/SIGINT; return after
/// in-flight requests finish.
pub fn run(config: Config) -> Result<(), ServeError> {
    init_logging(config.log_format);
    let loopback = guard::is_loopback_listen(&config.listen);
    if !loopback && !config.allow_non_loopback {
        return Err(ServeError::NotLoopback(config.listen));
    }
    if !loopback {
        tracing::warn!(
            listen = %config.listen,
            "listening beyond loopback (--allow-non-loopback): anyone who can reach this address and holds a \
             token can use the API; clients must use an IP literal as the host (http://<ip>:<port>), \
             since other host names are refused (bad_host) to stop DNS rebinding"
        );
    }
    // State files (sled, tokens, keys) are created private whatever the caller's umask.
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
    crate::store::ensure_private_dir(&config.state_dir).map_err(|source| ServeError::StateDir {
        dir: config.state_dir.clone(),
        source,
    })?;
    // A write past RLIMIT_FSIZE must be an error the audit log can refuse on, not a kill.
    // SAFETY: setting a signal disposition to SIG_IGN.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // Take the port before anything is written: a start that fails because the port is in
    // use must leave no audit record (such as a freshly issued admin token) behind. (After a
    // storage re-exec the listening socket is inherited instead, see `storage::listener`.)
    let listener = storage::listener(config.listen).map_err(|source| ServeError::PortTaken {
        addr: config.listen,
        config: config
            .config_file
            .as_ref()
            .map_or_else(|| "hall.toml".to_string(), |p| p.display().to_string()),
        source,
    })?;
    let stores = open_stores(&config)?;
    actix_web::rt::System::new().block_on(serve(config, stores, listener))
}

/// Open sled and every store, before the runtime starts (the OS keyring may block).
fn open_stores(config: &Config) -> Result<state::Stores, ServeError> {
    use crate::store::{audit, keys, secrets, tokens};
    let dir = &config.state_dir;
    let db = crate::store::open_db(dir).map_err(|e| ServeError::Database {
        dir: dir.clone(),
        source: e.into(),
    })?;
    let store = |what: &'static str| {
        move |e: Box<dyn std::error::Error + Send + Sync>| ServeError::Store { what, source: e }
    };
    let audit = audit::AuditLog::open(
        &db,
        audit::AuditConfig {
            durability: match config.audit_durability {
                crate::config::Durability::Durable => audit::Durability::Durable,
                crate::config::Durability::Batched => audit::Durability::Batched,
            },
            retention_days: config.audit_retention_days,
            checkpoint: Some(dir.join(audit::checkpoint::FILE_NAME)),
            accept_truncation: config.accept_audit_truncation,
            ..Default::default()
        },
    )
    .map_err(|e| store("the audit log")(e.into()))?;
    let tokens = tokens::TokenStore::open(&db).map_err(|e| store("the token store")(e.into()))?;
    let boot = tokens
        .ensure_admin_token(dir, state::now_ms())
        .map_err(|e| ServeError::AdminToken(e.into()))?;
    match &boot.created {
        Some(id) => {
            tracing::info!(path = %boot.path.display(), token_id = %id, "created an admin token (mode 0600); the CLI reads it from there");
            // Like any token issue, it is in the audit log, or the daemon does not start.
            let mut records = vec![(
                audit::RecordKind::TokenIssue,
                format!("issued {id} (admin)"),
            )];
            if let Some(old) = &boot.revoked {
                tracing::warn!(token_id = %old, "revoked the earlier admin token: its file was missing or no longer held it");
                records.push((
                    audit::RecordKind::TokenRevoke,
                    format!("revoked {old} (replaced admin token file)"),
                ));
            }
            for (kind, detail) in records {
                let mut e = audit::AuditEntry::new(kind, state::now_ms());
                e.detail = Some(detail);
                audit
                    .append_blocking(e)
                    .map_err(|e| ServeError::AdminTokenAudit(e.into()))?;
            }
        }
        None => tracing::info!(path = %boot.path.display(), "admin token file"),
    }
    let key_sources = keys::KeySources::new(
        keys::KeyEnv::from_process_env(dir).map_err(|e| ServeError::MasterKey(e.into()))?,
    );
    let (secrets, key_source) = secrets::SecretStore::open_from(&db, &key_sources)
        .map_err(|e| store("the secret store")(e.into()))?;
    tracing::info!(source = %key_source, key_id = %secrets.key_id(), "master key loaded");
    let approvals = crate::store::approvals::ApprovalStore::open(&db, config.approvals_max_pending)
        .map_err(|e| store("the approval store")(e.into()))?;
    Ok(state::Stores {
        audit,
        tokens,
        secrets,
        approvals,
        key_sources,
        key_source,
        db,
    })
}

/// Tell systemd (when it started us with `NOTIFY_SOCKET`) that we are ready, once.
fn notify_ready(state: &AppState) {
    if state.snapshot.load().is_some()
        && !state
            .ready_notified
            .swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        tracing::debug!("READY=1 sent to the service manager");
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Pretty => b.try_init(),
    };
}

async fn serve(
    config: Config,
    stores: state::Stores,
    listener: std::net::TcpListener,
) -> Result<(), ServeError> {
    tracing::info!(
        registry = %config.registry_dir.display(),
        policies = %config.policies_dir.display(),
        state_dir = %config.state_dir.display(),
        "starting hall {}",
        env!("CARGO_PKG_VERSION")
    );
    let state = Arc::new(AppState::new(config.clone(), stores));
    match state.reload("startup").await {
        Ok(v) => record::reload(&state, "startup", None, true, &v, &[]).await,
        Err(errs) => {
            record::reload(&state, "startup", None, false, "", &errs).await;
            tracing::warn!(
                "no policy set loaded: /api/route answers 503 until the files are fixed (read {})",
                config.describe_sources()
            );
        }
    }

    let limits = connection_limits();
    tracing::info!(
        max_connections = limits.per_worker * limits.workers,
        nofile = limits.nofile,
        "connection limits"
    );
    let data = web::Data::from(state.clone());
    let conns = Arc::new(conn::Conns::default());
    conns.spawn_reaper();
    let on_connect_conns = conns.clone();
    let server = HttpServer::new(move || {
        // Runs on each worker thread: its durable waiters are woken through one relay task.
        crate::store::audit::start_relay();
        App::new()
            .app_data(data.clone())
            .wrap(actix_web::middleware::from_fn(storage::gate))
            .wrap(actix_web::middleware::from_fn(auth::gate))
            .configure(routes)
            .default_service(web::to(errors::not_found))
    })
    .on_connect(move |io, ext| {
        if let Some(tcp) = io.downcast_ref::<actix_web::rt::net::TcpStream>() {
            if let Some(guard) = on_connect_conns.register(tcp) {
                ext.insert(guard);
            }
        }
    })
    .workers(limits.workers)
    // Every connection must finish its request head within this, or it is closed (408);
    // a body has route::BODY_TIMEOUT more. Idle and stalled connections cannot pile up.
    .client_request_timeout(HEADER_TIMEOUT)
    .client_disconnect_timeout(std::time::Duration::from_secs(1))
    .keep_alive(std::time::Duration::from_secs(5))
    // Past this many open connections new ones wait in the listen backlog until one closes,
    // so the daemon never runs out of file descriptors for sled, the watcher or the log.
    .max_connections(limits.per_worker)
    .shutdown_timeout(30);
    // Our own listener (not `bind`), so a re-exec after a storage failure can hand it over.
    let listen_error = |source| ServeError::Listen {
        addr: config.listen,
        source,
    };
    let kept = listener.try_clone().map_err(listen_error)?;
    let server = server.listen(listener).map_err(listen_error)?;
    let addr = server.addrs().first().copied().unwrap_or(config.listen);
    state
        .port
        .store(addr.port(), std::sync::atomic::Ordering::Relaxed);
    let server = server.run();
    storage::spawn_healer(&state, server.handle());
    tracing::info!("listening on http://{addr}");
    notify_ready(&state);
    spawn_watchdog();
    spawn_memory_trim(&state);
    approvals::spawn_sweep(&state);

    // Hot reload: file events (debounced), a periodic rescan, and SIGHUP.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let watch = Arc::new(crate::load::watch::DirWatch::start(
        &[config.registry_dir.clone(), config.policies_dir.clone()],
        tx.clone(),
    ));
    let health = watch.health();
    if !health.ok {
        tracing::warn!(
            errors = ?health.errors,
            "cannot watch every policy dir; the rescan every {}s still picks up changes",
            health.rescan_secs
        );
    }
    let _ = state.watch.set(watch.clone());
    let st = state.clone();
    let w = watch.clone();
    let dirs = [config.registry_dir.clone(), config.policies_dir.clone()];
    actix_web::rt::spawn(async move {
        while crate::load::watch::next_quiet(&mut rx, crate::load::watch::QUIET).await {
            // A git checkout in progress: load the commit it lands on, not a mix of two.
            if crate::load::watch::wait_for_git(&dirs).await {
                crate::load::watch::settle(&mut rx, crate::load::watch::QUIET).await;
            }
            // Follow a replaced dir before reading it, so no later edit goes unseen.
            let w = w.clone();
            let _ = tokio::task::spawn_blocking(move || w.refresh()).await;
            reload_and_record(&st, "file change").await;
        }
    });
    spawn_rescan(&state, watch, tx.clone());
    let st = state.clone();
    actix_web::rt::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            reload_and_record(&st, "SIGHUP").await;
        }
    });

    server.await.map_err(ServeError::Server)?;
    // A re-exec to reopen the database is a reload to the service manager, not a stop.
    let reexec = state.reexec.load(std::sync::atomic::Ordering::SeqCst);
    let _ = sd_notify::notify(
        false,
        &[match reexec {
            true => sd_notify::NotifyState::Reloading,
            false => sd_notify::NotifyState::Stopping,
        }],
    );
    tracing::info!("stopped accepting; in-flight requests finished");
    record::shutdown(&state).await;
    if reexec {
        tracing::warn!("re-executing to reopen the database (same address, same arguments)");
        let e = storage::reexec(&kept);
        return Err(ServeError::Reexec(e));
    }
    drop(kept);
    tracing::info!("shut down cleanly");
    drop(tx);
    Ok(())
}

/// How long a client may take to send its request head.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// File descriptors kept free of connections: sled, the watcher, logs, the key file.
const RESERVED_FDS: u64 = 128;
/// At most this many connections in all, however high the fd limit.
const MAX_CONNECTIONS: u64 = 8192;

struct ConnectionLimits {
    workers: usize,
    per_worker: usize,
    nofile: u64,
}

/// Raise the soft open-file limit to the hard one (the default soft limit, 1,024, is what
/// a few hundred stalled clients exhausted), then cap connections below it.
fn connection_limits() -> ConnectionLimits {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    let nofile = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            if lim.rlim_cur < lim.rlim_max {
                let want = libc::rlimit {
                    rlim_cur: lim.rlim_max.min(1 << 20),
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                    lim.rlim_cur = want.rlim_cur;
                }
            }
            lim.rlim_cur
        } else {
            1024
        }
    };
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let total = nofile
        .saturating_sub(RESERVED_FDS)
        .clamp(16, MAX_CONNECTIONS);
    ConnectionLimits {
        workers,
        // Each connection holds two fds: actix's and the reaper's duplicate (see `conn`).
        per_worker: (total as usize / 2 / workers).max(8),
        nofile,
    }
}

/// The safety net under the watches: every `RESCAN`, re-establish watches on replaced
/// dirs and compare the files' content hash with the last reload's; either difference
/// triggers a reload (through the same debounce as file events).
fn spawn_rescan(
    state: &Arc<AppState>,
    watch: Arc<crate::load::watch::DirWatch>,
    tx: tokio::sync::mpsc::Sender<()>,
) {
    let st = state.clone();
    actix_web::rt::spawn(async move {
        loop {
            actix_web::rt::time::sleep(crate::load::watch::RESCAN).await;
            let (w, reg, pol) = (
                watch.clone(),
                st.config.registry_dir.clone(),
                st.config.policies_dir.clone(),
            );
            let Ok((moved, now)) = tokio::task::spawn_blocking(move || {
                (w.refresh(), crate::load::fingerprint(&reg, &pol))
            })
            .await
            else {
                continue;
            };
            let seen = *st
                .files_fingerprint
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if moved || seen != Some(now) {
                tracing::info!(moved, "rescan found changed policy files; reloading");
                let _ = tx.try_send(());
            }
        }
    });
}

/// Ping the systemd watchdog at half its interval, when one is configured.
fn spawn_watchdog() {
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let every = std::time::Duration::from_micros(usec / 2);
        actix_web::rt::spawn(async move {
            loop {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                actix_web::rt::time::sleep(every).await;
            }
        });
    }
}

/// While records are being written, hand freed heap back to the OS every few seconds.
///
/// sled allocates and frees node copies on every insert, from the writer and its I/O threads
/// (several malloc arenas); glibc keeps freed pages, so RSS crept up with the number of
/// audited decisions (docs/performance.md: 110 MB after a million, 97 MB with this).
fn spawn_memory_trim(state: &Arc<AppState>) {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(5);
    let st = state.clone();
    actix_web::rt::spawn(async move {
        let mut seen = st.stores.audit.stats().appended;
        loop {
            actix_web::rt::time::sleep(EVERY).await;
            let now = st.stores.audit.stats().appended;
            if now != seen {
                seen = now;
                tokio::task::spawn_blocking(crate::memory::trim);
            }
        }
    });
}

async fn reload_and_record(state: &Arc<AppState>, trigger: &str) {
    match state.reload(trigger).await {
        Ok(v) => {
            notify_ready(state);
            record::reload(state, trigger, None, true, &v, &[]).await
        }
        Err(errs) => record::reload(state, trigger, None, false, "", &errs).await,
    }
}

/// Every endpoint, with the access it needs declared beside it. A known path with the wrong
/// method gets a JSON 405; a path no endpoint declares gets the app's JSON 404.
fn routes(cfg: &mut web::ServiceConfig) {
    use crate::store::tokens::Scope;
    use auth::{Access, Require};
    let scope = Access::Scope;
    // The only way an endpoint is registered: its path and the access it requires.
    let endpoint = |path: &str, access: Access| {
        web::resource(path.to_string())
            .wrap(Require(access))
            .default_service(web::to(errors::method_not_allowed))
    };
    // actix tries the resources in this order: the path every decision takes comes first.
    cfg.service(endpoint("/api/route", scope(Scope::Route)).route(web::post().to(route::route)))
        .service(endpoint("/health", Access::Open).route(web::get().to(ops::health)))
        .service(endpoint("/ready", Access::Open).route(web::get().to(ops::ready)))
        .service(endpoint("/metrics", scope(Scope::Metrics)).route(web::get().to(ops::metrics)))
        .service(endpoint("/api/status", Access::AnyToken).route(web::get().to(ops::status)))
        .service(endpoint("/api/reload", scope(Scope::Admin)).route(web::post().to(ops::reload)))
        .service(
            endpoint("/api/registry/capabilities", Access::AnyToken)
                .route(web::get().to(ops::capabilities)),
        )
        .service(
            endpoint("/api/registry/workers", Access::AnyToken).route(web::get().to(ops::workers)),
        )
        .service(endpoint("/api/audit", scope(Scope::Audit)).route(web::get().to(api::audit_query)))
        .service(
            endpoint("/api/audit/verify", scope(Scope::Audit))
                .route(web::get().to(api::audit_verify)),
        )
        .service(
            endpoint("/api/audit/{decision_id}", scope(Scope::Audit))
                .route(web::get().to(api::audit_show)),
        )
        .service(
            endpoint("/api/tokens", scope(Scope::Admin))
                .route(web::post().to(api::token_create))
                .route(web::get().to(api::token_list)),
        )
        .service(
            endpoint("/api/tokens/{id}", scope(Scope::Admin))
                .route(web::delete().to(api::token_revoke)),
        )
        .service(
            endpoint("/api/keys/rotate", scope(Scope::Admin))
                .route(web::post().to(api::secret_rotate)),
        )
        .service(
            endpoint("/api/secrets", scope(Scope::SecretsWrite))
                .route(web::get().to(api::secret_list)),
        )
        // The release handler checks the secrets:release scope itself, so that a refusal
        // is audited like every other release refusal.
        .service(
            endpoint("/api/secrets/{name}/release", Access::AnyToken)
                .route(web::post().to(api::secret_release)),
        )
        .service(
            endpoint("/api/secrets/{name}", scope(Scope::SecretsWrite))
                .route(web::put().to(api::secret_put))
                .route(web::delete().to(api::secret_delete)),
        )
        // Approvals (SPEC 3.1): the queue for approvers; one approval for its opener (route)
        // or an approver; cancel is the opener's, checked by the handler.
        .service(
            endpoint("/api/approvals", scope(Scope::Approve)).route(web::get().to(approvals::list)),
        )
        .service(
            endpoint(
                "/api/approvals/{id}",
                Access::EitherScope(Scope::Route, Scope::Approve),
            )
            .route(web::get().to(approvals::show)),
        )
        .service(
            endpoint("/api/approvals/{id}/approve", scope(Scope::Approve))
                .route(web::post().to(approvals::approve)),
        )
        .service(
            endpoint("/api/approvals/{id}/deny", scope(Scope::Approve))
                .route(web::post().to(approvals::deny)),
        )
        .service(
            endpoint(
                "/api/approvals/{id}/cancel",
                Access::EitherScope(Scope::Route, Scope::Approve),
            )
            .route(web::post().to(approvals::cancel)),
        )
        // Server-Sent Events from the audit log; tenant-bound tokens see their tenant's.
        .service(endpoint("/api/events", scope(Scope::Audit)).route(web::get().to(events::events)))
        // MCP over streamable HTTP: POST only (no server-initiated stream, so GET is 405).
        .service(endpoint("/mcp", scope(Scope::Route)).route(web::post().to(mcp::post)));
}
