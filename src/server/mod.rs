//! The daemon (`hall serve`): actix-web on loopback, hot reload, graceful shutdown.

mod api;
pub mod auth;
mod errors;
pub mod guard;
mod metrics;
mod ops;
mod record;
mod route;
mod state;

use std::sync::Arc;

use actix_web::{web, App, HttpServer};

pub use errors::ApiError;
pub use state::AppState;

use crate::cli::{CliResult, ServeArgs};
use crate::config::{Config, Flags, LogFormat};

/// Run the daemon until SIGTERM/SIGINT; exit 0 after in-flight requests finish.
pub fn run(args: ServeArgs) -> CliResult {
    let config = Config::resolve(&Flags {
        config: args.files.config.clone(),
        listen: args.listen.clone(),
        registry_dir: args.files.registry.clone(),
        policies_dir: args.files.policies.clone(),
        state_dir: args.state_dir.clone(),
        allowed_origins: args.allowed_origins.clone(),
        audit_durability: args.audit_durability.clone(),
        log_format: args.log_format.clone(),
    })?;
    init_logging(config.log_format);
    let loopback = guard::is_loopback_listen(&config.listen);
    if !loopback && !args.allow_non_loopback {
        return Err(format!(
            "refusing to listen on {}: not a loopback address. Hall's API is meant for this machine only; \
             pass --allow-non-loopback to expose it to the network anyway (remote clients must then \
             address it by IP, http://<ip>:<port>: host names other than localhost get 403 bad_host)",
            config.listen
        )
        .into());
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
    crate::store::ensure_private_dir(&config.state_dir).map_err(|e| {
        format!(
            "cannot create state dir {}: {e}",
            config.state_dir.display()
        )
    })?;
    // A write past RLIMIT_FSIZE must be an error the audit log can refuse on, not a kill.
    // SAFETY: setting a signal disposition to SIG_IGN.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // Take the port before anything is written: a start that fails because the port is in
    // use must leave no audit record (such as a freshly issued admin token) behind.
    let listener = std::net::TcpListener::bind(config.listen).map_err(|e| {
        format!(
            "cannot listen on {}: {e} (another daemon on that port? change listen in {}, or pass --listen)",
            config.listen,
            config
                .config_file
                .as_ref()
                .map_or_else(|| "hall.toml".to_string(), |p| p.display().to_string())
        )
    })?;
    let stores = open_stores(&config)?;
    actix_web::rt::System::new().block_on(serve(config, stores, listener))
}

/// Open sled and every store, before the runtime starts (the OS keyring may block).
fn open_stores(config: &Config) -> Result<state::Stores, Box<dyn std::error::Error>> {
    use crate::store::{audit, keys, secrets, tokens};
    let dir = &config.state_dir;
    let db = crate::store::open_db(dir).map_err(|e| {
        format!(
            "cannot open the database in {}: {e} (is another hall running on this state dir?)",
            dir.display()
        )
    })?;
    let audit = audit::AuditLog::open(
        &db,
        audit::AuditConfig {
            durability: config.audit_durability,
            retention_days: config.audit_retention_days,
            ..Default::default()
        },
    )
    .map_err(|e| format!("cannot open the audit log: {e}"))?;
    let tokens =
        tokens::TokenStore::open(&db).map_err(|e| format!("cannot open the token store: {e}"))?;
    let boot = tokens
        .ensure_admin_token(dir, state::now_ms())
        .map_err(|e| format!("cannot create the admin token: {e}"))?;
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
                    .map_err(|e| format!("cannot record the admin token in the audit log: {e}"))?;
            }
        }
        None => tracing::info!(path = %boot.path.display(), "admin token file"),
    }
    let key_sources = keys::KeySources::new(
        keys::KeyEnv::from_process_env(dir).map_err(|e| format!("master key: {e}"))?,
    );
    let (secrets, key_source) = secrets::SecretStore::open_from(&db, &key_sources)
        .map_err(|e| format!("cannot open the secret store: {e}"))?;
    tracing::info!(source = %key_source, key_id = %secrets.key_id(), "master key loaded");
    Ok(state::Stores {
        audit,
        tokens,
        secrets,
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
) -> CliResult {
    tracing::info!(
        registry = %config.registry_dir.display(),
        policies = %config.policies_dir.display(),
        state_dir = %config.state_dir.display(),
        "starting hall {}",
        env!("CARGO_PKG_VERSION")
    );
    let state = Arc::new(AppState::new(config.clone(), stores));
    match state.reload("startup").await {
        Ok(v) => record::reload(&state, true, &v, &[]).await,
        Err(errs) => {
            record::reload(&state, false, "", &errs).await;
            tracing::warn!(
                "no policy set loaded: /api/route answers 503 until the files are fixed (read {})",
                config.describe_sources()
            );
        }
    }

    let data = web::Data::from(state.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .wrap(actix_web::middleware::from_fn(auth::gate))
            .configure(routes)
            .default_service(web::to(errors::not_found))
    })
    .backlog(2048)
    .shutdown_timeout(30)
    .listen(listener)
    .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = server.addrs().first().copied().unwrap_or(config.listen);
    state
        .port
        .store(addr.port(), std::sync::atomic::Ordering::Relaxed);
    let server = server.run();
    tracing::info!("listening on http://{addr}");
    notify_ready(&state);
    spawn_watchdog();
    spawn_memory_trim(&state);

    // Hot reload: file events (debounced) and SIGHUP.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let _watcher = match crate::load::watch::watch(
        &[config.registry_dir.clone(), config.policies_dir.clone()],
        tx.clone(),
    ) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(
                "cannot watch the policy dirs ({e}); reload with SIGHUP or POST /api/reload"
            );
            None
        }
    };
    let st = state.clone();
    actix_web::rt::spawn(async move {
        while crate::load::watch::next_quiet(&mut rx, crate::load::watch::QUIET).await {
            reload_and_record(&st, "file change").await;
        }
    });
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

    server.await.map_err(|e| format!("server error: {e}"))?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tracing::info!("stopped accepting; in-flight requests finished");
    record::shutdown(&state).await;
    tracing::info!("shut down cleanly");
    drop(tx);
    Ok(std::process::ExitCode::SUCCESS)
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
                tokio::task::spawn_blocking(state::trim_heap);
            }
        }
    });
}

async fn reload_and_record(state: &Arc<AppState>, trigger: &str) {
    match state.reload(trigger).await {
        Ok(v) => {
            notify_ready(state);
            record::reload(state, true, &v, &[]).await
        }
        Err(errs) => record::reload(state, false, "", &errs).await,
    }
}

/// Every endpoint. A known path with the wrong method gets a JSON 405.
fn routes(cfg: &mut web::ServiceConfig) {
    let m405 = || web::to(errors::method_not_allowed);
    cfg.service(
        web::resource("/health")
            .route(web::get().to(ops::health))
            .default_service(m405()),
    )
    .service(
        web::resource("/ready")
            .route(web::get().to(ops::ready))
            .default_service(m405()),
    )
    .service(
        web::resource("/metrics")
            .route(web::get().to(ops::metrics))
            .default_service(m405()),
    )
    .service(
        web::resource("/api/status")
            .route(web::get().to(ops::status))
            .default_service(m405()),
    )
    .service(
        web::resource("/api/reload")
            .route(web::post().to(ops::reload))
            .default_service(m405()),
    )
    .service(
        web::resource("/api/route")
            .route(web::post().to(route::route))
            .default_service(m405()),
    )
    .service(
        web::resource("/api/registry/capabilities")
            .route(web::get().to(ops::capabilities))
            .default_service(m405()),
    )
    .service(
        web::resource("/api/registry/workers")
            .route(web::get().to(ops::workers))
            .default_service(m405()),
    );
    let one = |path: &str, h| {
        web::resource(path.to_string())
            .route(h)
            .default_service(m405())
    };
    cfg.service(one("/api/audit", web::get().to(api::audit_query)))
        .service(one("/api/audit/verify", web::get().to(api::audit_verify)))
        .service(one(
            "/api/audit/{decision_id}",
            web::get().to(api::audit_show),
        ))
        .service(
            web::resource("/api/tokens")
                .route(web::post().to(api::token_create))
                .route(web::get().to(api::token_list))
                .default_service(m405()),
        )
        .service(one("/api/tokens/{id}", web::delete().to(api::token_revoke)))
        .service(one("/api/secrets", web::get().to(api::secret_list)))
        .service(one("/api/keys/rotate", web::post().to(api::secret_rotate)))
        .service(one(
            "/api/secrets/{name}/release",
            web::post().to(api::secret_release),
        ))
        .service(
            web::resource("/api/secrets/{name}")
                .route(web::put().to(api::secret_put))
                .route(web::delete().to(api::secret_delete))
                .default_service(m405()),
        );
}
