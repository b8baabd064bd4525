//! The daemon's shared state: the current snapshot, reload status, metrics.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use serde::Serialize;

use super::metrics::Metrics;
use crate::config::Config;
use crate::engine::Snapshot;
use crate::load::{Reloaded, Reloader};
use crate::store::audit::AuditLog;
use crate::store::keys::{KeySource, KeySources};
use crate::store::secrets::SecretStore;
use crate::store::tokens::TokenStore;

/// What the last reload did, for `/api/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadStatus {
    pub at: Option<String>,
    pub ok: bool,
    pub trigger: Option<String>,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// Shared by every worker thread. The request path only reads `snapshot` (lock-free)
/// and bumps atomics in `metrics`.
pub struct AppState {
    pub config: Config,
    /// The port actually bound (differs from the config when it asked for port 0).
    pub port: AtomicU16,
    pub snapshot: ArcSwapOption<Snapshot>,
    pub loaded_at: Mutex<Option<String>>,
    pub last_reload: Mutex<ReloadStatus>,
    /// Serializes reloads so an older load can never overwrite a newer one, and holds the
    /// parse cache they share (a reload re-parses only the files that changed).
    reload_lock: tokio::sync::Mutex<Reloader>,
    pub metrics: Metrics,
    pub started: Instant,
    pub stores: Stores,
    /// Whether systemd has been told READY=1 (sent once, after the first good load).
    pub ready_notified: std::sync::atomic::AtomicBool,
    /// Content hash of the files the last reload read (`load::fingerprint`), for the rescan.
    pub files_fingerprint: Mutex<Option<blake3::Hash>>,
    /// A storage failure seen outside the audit writer (a sled write that failed), cleared
    /// by the healer's next successful probe (`storage.rs`).
    pub storage_error: Mutex<Option<String>>,
    /// Set by the healer: when the server stops, re-execute to reopen the database.
    pub reexec: std::sync::atomic::AtomicBool,
    /// The directory watches, once started (their health is in `/api/status`).
    pub watch: std::sync::OnceLock<Arc<crate::load::watch::DirWatch>>,
}

/// The sled-backed stores, opened before the server starts.
pub struct Stores {
    pub audit: AuditLog,
    pub tokens: TokenStore,
    pub secrets: SecretStore,
    pub approvals: crate::store::approvals::ApprovalStore,
    pub key_sources: KeySources,
    pub key_source: KeySource,
    /// Kept so the database outlives every tree handle.
    pub db: sled::Db,
}

/// The result of a reload: the new version, or every error (the old set stays in force).
pub type ReloadResult = Result<String, Vec<String>>;

impl AppState {
    pub fn new(config: Config, stores: Stores) -> AppState {
        let port = config.listen.port();
        AppState {
            config,
            port: AtomicU16::new(port),
            snapshot: ArcSwapOption::empty(),
            loaded_at: Mutex::new(None),
            last_reload: Mutex::new(ReloadStatus::default()),
            reload_lock: tokio::sync::Mutex::new(Reloader::default()),
            metrics: Metrics::default(),
            started: Instant::now(),
            stores,
            ready_notified: std::sync::atomic::AtomicBool::new(false),
            files_fingerprint: Mutex::new(None),
            storage_error: Mutex::new(None),
            reexec: std::sync::atomic::AtomicBool::new(false),
            watch: std::sync::OnceLock::new(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port.load(Ordering::Relaxed)
    }

    /// Load the files off the request path and swap the new snapshot in atomically.
    /// Requests already holding the old snapshot finish on it.
    pub async fn reload(self: &Arc<Self>, trigger: &str) -> ReloadResult {
        let mut reloader = self.reload_lock.lock().await;
        let (reg, pol) = (
            self.config.registry_dir.clone(),
            self.config.policies_dir.clone(),
        );
        // The cache moves into the blocking task and back; if the task panics it is lost,
        // and the next reload simply parses every file again.
        let mut cache = std::mem::take(&mut *reloader);
        let (cache, loaded) = tokio::task::spawn_blocking(move || {
            let loaded = cache.load_dirs(&reg, &pol);
            (cache, loaded)
        })
        .await
        .map_err(|e| vec![format!("reload task failed: {e}")])?;
        *self
            .files_fingerprint
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = cache.fingerprint();
        *reloader = cache;
        let now = now_rfc3339();
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut status = ReloadStatus {
            at: Some(now.clone()),
            trigger: Some(trigger.to_string()),
            ..Default::default()
        };
        let mut old = None;
        let result = match loaded {
            Ok(Reloaded { snapshot, warnings }) => {
                let version = snapshot.version.clone();
                let counts = (
                    snapshot.rules.len(),
                    snapshot.capabilities.len(),
                    snapshot.workers.len(),
                );
                // Swap first: formatting warnings and logging need not delay the new set.
                old = self.snapshot.swap(Some(snapshot));
                *self.loaded_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
                status.ok = true;
                status.warnings = warnings.iter().map(|d| d.to_string()).collect();
                for w in &status.warnings {
                    tracing::warn!(trigger, "{w}");
                }
                tracing::info!(
                    trigger,
                    policy_version = %version,
                    rules = counts.0,
                    capabilities = counts.1,
                    workers = counts.2,
                    "policy set loaded"
                );
                self.metrics.reload(true, unix);
                Ok(version)
            }
            Err(e) => {
                status.errors = e.errors().map(|d| d.to_string()).collect();
                for err in &status.errors {
                    tracing::error!(trigger, "{err}");
                }
                if self.snapshot.load().is_some() {
                    tracing::error!(
                        trigger,
                        errors = status.errors.len(),
                        "policy reload failed; the last good policy set stays in force"
                    );
                } else {
                    tracing::error!(
                        trigger,
                        errors = status.errors.len(),
                        "policy load failed and no policy set is loaded: /api/route answers 503 until \
                         the files load (read {})",
                        self.config.describe_sources()
                    );
                }
                self.metrics.reload(false, unix);
                Err(status.errors.clone())
            }
        };
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = status;
        retire(old);
        result
    }
}

/// Drop the replaced snapshot and hand the memory freed by a load back to the OS, off the
/// runtime threads.
///
/// Dropping a 10,000-rule snapshot frees ~100,000 allocations (5–10 ms): done here, not in
/// the reload, so `/api/reload` answers and the audit record is written without waiting for
/// it. (Requests still holding the old snapshot keep it alive until they finish; then the
/// last of them frees it. The reloader holds only the new one.)
fn retire(old: Option<Arc<Snapshot>>) {
    tokio::task::spawn_blocking(move || {
        drop(old);
        crate::memory::trim();
    });
}

pub use crate::clock::now_ms;

/// Now, as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    crate::clock::rfc3339_ms(now_ms()).unwrap_or_default()
}
