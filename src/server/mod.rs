//! The daemon (`hall serve`): actix-web on loopback, hot reload, graceful shutdown.

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
    if !config.listen.ip().is_loopback() && !args.allow_non_loopback {
        return Err(format!(
            "refusing to listen on {}: not a loopback address. Hall's API is meant for this machine only; \
             pass --allow-non-loopback to expose it to the network anyway",
            config.listen
        )
        .into());
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
    actix_web::rt::System::new().block_on(serve(config))
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

async fn serve(config: Config) -> CliResult {
    tracing::info!(
        registry = %config.registry_dir.display(),
        policies = %config.policies_dir.display(),
        state_dir = %config.state_dir.display(),
        "starting hall {}",
        env!("CARGO_PKG_VERSION")
    );
    let state = Arc::new(AppState::new(config.clone()));
    if state.reload("startup").await.is_err() {
        tracing::warn!("no policy set loaded: /api/route answers 503 until the files are fixed");
    }

    let data = web::Data::from(state.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .configure(routes)
            .default_service(web::to(errors::not_found))
    })
    .backlog(2048)
    .shutdown_timeout(30)
    .bind(config.listen)
    .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = server.addrs().first().copied().unwrap_or(config.listen);
    state
        .port
        .store(addr.port(), std::sync::atomic::Ordering::Relaxed);
    let server = server.run();
    tracing::info!("listening on http://{addr}");

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
    tracing::info!("stopped accepting; in-flight requests finished");
    record::shutdown(&state).await;
    tracing::info!("shut down cleanly");
    drop(tx);
    Ok(std::process::ExitCode::SUCCESS)
}

async fn reload_and_record(state: &Arc<AppState>, trigger: &str) {
    match state.reload(trigger).await {
        Ok(v) => record::reload(state, true, &v, &[]).await,
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
}
