//! API tokens: issued once, stored only as a blake3 hash, checked without locks.
//!
//! A token is `hall_` followed by 64 lowercase hex digits (32 bytes from the OS CSPRNG). The
//! plaintext exists only in the [`IssuedToken`] handed back by [`TokenStore::issue`] (zeroized
//! on drop) and in `<state_dir>/admin.token` for the bootstrap admin token. sled holds a
//! [`TokenRecord`] per token: its public [`TokenInfo`] plus `blake3(token)`, keyed by the
//! non-secret id (`tok_` + 12 hex digits).
//!
//! The request path ([`TokenStore::authenticate`]) loads an `arc-swap` snapshot of a map keyed by
//! hash: no lock, no disk. Writes (issue, revoke) serialize on a mutex, write sled, then publish
//! a new map, so a revocation is effective for the very next request. `last_used_ms` is kept in
//! an atomic and written back to sled at most once a minute per token (and on [`TokenStore::list`]
//! / [`TokenStore::persist_last_used`]). Each token may carry a rate limit, enforced in memory
//! with an exact integer token bucket (GCRA).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// sled tree holding one [`TokenRecord`] per token, keyed by token id.
const TREE: &str = "tokens";
/// Small facts about the token set: which token the admin token file holds.
const META_TREE: &str = "tokens_meta";
const BOOTSTRAP_KEY: &[u8] = b"bootstrap_admin_id";
/// Every token starts with this, so leaked tokens are recognisable by secret scanners.
pub const TOKEN_PREFIX: &str = "hall_";
/// Random bytes per token (256 bits; the spec asks for at least 128).
const TOKEN_BYTES: usize = 32;
/// Total length of a well-formed token: prefix + two hex digits per byte.
const TOKEN_LEN: usize = TOKEN_PREFIX.len() + 2 * TOKEN_BYTES;
/// Name of the bootstrap admin token and of its file in the state dir.
pub const ADMIN_TOKEN_NAME: &str = "admin";
const ADMIN_TOKEN_FILE: &str = "admin.token";
/// `last_used_ms` is written back to sled at most this often per token.
const LAST_USED_PERSIST_EVERY_MS: i64 = 60_000;
const NEVER: i64 = i64::MIN;
const NAME_MAX_CHARS: usize = 128;
/// A larger admin.token file is not ours: refuse to read it into memory.
const ADMIN_FILE_MAX_BYTES: u64 = 4096;

// ---------------------------------------------------------------------------------------------
// Scopes
// ---------------------------------------------------------------------------------------------

/// What a token may do. `Admin` allows everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// `POST /api/route`.
    Route,
    /// Read and verify the audit log.
    Audit,
    /// `GET /metrics`.
    Metrics,
    /// Store, list and delete secrets.
    SecretsWrite,
    /// Release a secret for an allowed decision.
    SecretsRelease,
    /// Decide approvals (`require_approval` rules): list, approve, deny.
    Approve,
    /// Everything, including token management and reload.
    Admin,
}

impl Scope {
    /// Every scope, in the order the spec lists them.
    pub const ALL: [Scope; 7] = [
        Scope::Route,
        Scope::Audit,
        Scope::Metrics,
        Scope::SecretsWrite,
        Scope::SecretsRelease,
        Scope::Approve,
        Scope::Admin,
    ];

    /// The scope's name as written in the API and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Route => "route",
            Scope::Audit => "audit",
            Scope::Metrics => "metrics",
            Scope::SecretsWrite => "secrets:write",
            Scope::SecretsRelease => "secrets:release",
            Scope::Approve => "approve",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scope name that is not one of [`Scope::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?} (expected one of: route, audit, metrics, secrets:write, secrets:release, approve, admin)")]
pub struct UnknownScope(pub String);

impl FromStr for Scope {
    type Err = UnknownScope;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| UnknownScope(s.to_string()))
    }
}

impl Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------
// Public data
// ---------------------------------------------------------------------------------------------

/// A token bucket: `burst` requests at once, refilled at `per_minute` requests a minute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_minute: u32,
    pub burst: u32,
}

/// What an admin asks for when issuing a token (the body of `POST /api/tokens`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    pub name: String,
    pub scopes: Vec<Scope>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}

/// The public view of a token: safe to list, log and audit. Never holds the token or its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub tenant_id: Option<String>,
    pub expires_at_ms: Option<i64>,
    pub rate_limit: Option<RateLimit>,
    pub created_at_ms: i64,
    pub last_used_ms: Option<i64>,
}

/// What sled stores per token: the public info and `blake3(token)`.
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub info: TokenInfo,
    hash: [u8; 32],
}

impl fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRecord")
            .field("info", &self.info)
            .field("hash", &"<redacted>")
            .finish()
    }
}

/// A freshly issued token's plaintext. Shown to the caller once, zeroized on drop; its `Debug`
/// never prints the value.
pub struct IssuedToken(Zeroizing<String>);

impl IssuedToken {
    /// The token to hand to the client, exactly once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IssuedToken(<redacted>)")
    }
}

/// Where the bootstrap admin token lives and whether this call wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminBootstrap {
    pub path: PathBuf,
    /// The id of the admin token issued now, when the file was (re)written.
    pub created: Option<String>,
    /// The earlier bootstrap token this one replaces (its file was lost or no longer held
    /// a valid admin token), now revoked.
    pub revoked: Option<String>,
}

/// The outcome of one rate-limit check, with what the `X-RateLimit-*` headers need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// `X-RateLimit-Limit`: the bucket size (`burst`).
    pub limit: u32,
    /// `X-RateLimit-Remaining`: requests allowed right now after this one.
    pub remaining: u32,
    /// `X-RateLimit-Reset`: seconds until the bucket is full again.
    pub reset_secs: u64,
    /// `Retry-After` when denied: seconds until one request is allowed (at least 1).
    pub retry_after_secs: Option<u64>,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a presented token was refused. Every variant is a 401; none carries the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("no bearer token was presented")]
    Missing,
    #[error("the bearer token is not a Hall token")]
    Malformed,
    #[error("the bearer token is unknown or revoked")]
    Unknown,
    #[error("the bearer token has expired")]
    Expired,
}

/// Failures of the token store (not of authentication; see [`AuthFailure`]).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The request to issue a token is invalid; `field` names the input at fault.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("token database error: {0}")]
    Db(#[from] sled::Error),
    /// A stored record cannot be decoded: refuse to start rather than guess.
    #[error("stored token record {id:?} is corrupt: {message}")]
    Corrupt { id: String, message: String },
    #[error("cannot encode token record: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl TokenError {
    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        TokenError::Invalid {
            field,
            message: message.into(),
        }
    }
}

/// Pull the token out of an `Authorization` header value (`Bearer <token>`, scheme matched
/// case-insensitively as RFC 7235 says).
pub fn bearer_token(authorization: Option<&str>) -> Result<&str, AuthFailure> {
    let value = authorization.ok_or(AuthFailure::Missing)?.trim();
    if value.is_empty() || value.eq_ignore_ascii_case("bearer") {
        return Err(AuthFailure::Missing);
    }
    let (scheme, rest) = value.split_once(' ').ok_or(AuthFailure::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthFailure::Malformed);
    }
    let token = rest.trim_start_matches(' ');
    if token.is_empty() {
        return Err(AuthFailure::Missing);
    }
    Ok(token)
}

// ---------------------------------------------------------------------------------------------
// Authenticated tokens and their rate buckets
// ---------------------------------------------------------------------------------------------

/// A token that passed [`TokenStore::authenticate`]: what the request may do, and its bucket.
pub struct Authenticated {
    info: TokenInfo,
    last_used_ms: AtomicI64,
    /// The `last_used_ms` value sled last received (or when we last tried).
    persisted_ms: AtomicI64,
    bucket: Option<Mutex<Gcra>>,
}

impl fmt::Debug for Authenticated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticated")
            .field("id", &self.info.id)
            .field("name", &self.info.name)
            .field("scopes", &self.info.scopes)
            .field("tenant_id", &self.info.tenant_id)
            .finish_non_exhaustive()
    }
}

impl Authenticated {
    fn new(record: TokenRecord) -> Self {
        let last = record.info.last_used_ms.unwrap_or(NEVER);
        let bucket = record.info.rate_limit.map(|rl| Mutex::new(Gcra::new(rl)));
        Authenticated {
            last_used_ms: AtomicI64::new(last),
            persisted_ms: AtomicI64::new(last),
            bucket,
            info: record.info,
        }
    }

    /// The token's id, for the audit log and for revocation (never the token itself).
    pub fn id(&self) -> &str {
        &self.info.id
    }

    /// The token's human name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Whether the token may use an endpoint that needs `scope`. `admin` allows everything.
    pub fn allows(&self, scope: Scope) -> bool {
        self.info
            .scopes
            .iter()
            .any(|s| *s == scope || *s == Scope::Admin)
    }

    /// The tenant this token is bound to, if any.
    pub fn tenant(&self) -> Option<&str> {
        self.info.tenant_id.as_deref()
    }

    /// Whether this token may act for `tenant_id`: unbound tokens may act for any tenant,
    /// bound ones only for their own (else the caller answers 403 `tenant_mismatch`).
    pub fn may_act_for(&self, tenant_id: &str) -> bool {
        match self.tenant() {
            None => true,
            Some(t) => t == tenant_id,
        }
    }

    /// The public view, with the current in-memory `last_used_ms`.
    pub fn info(&self) -> TokenInfo {
        let mut info = self.info.clone();
        info.last_used_ms = match self.last_used_ms.load(Ordering::Relaxed) {
            NEVER => None,
            ms => Some(ms),
        };
        info
    }

    /// Take one request from this token's bucket at `now`.
    ///
    /// `None` means the token has no rate limit: allow, and send no `X-RateLimit-*` headers.
    pub fn rate_check(&self, now: Instant) -> Option<RateDecision> {
        let bucket = self.bucket.as_ref()?;
        // The lock only guards a few integer operations; a poisoned lock still holds a valid
        // bucket (every update is a single assignment), so keep using it.
        let mut gcra = bucket.lock().unwrap_or_else(|e| e.into_inner());
        Some(gcra.check(now))
    }
}

/// An exact integer token bucket in its GCRA form (generic cell rate algorithm).
///
/// Instead of a fractional token count we keep `tat`, the time at which the bucket would be
/// full again, in nanoseconds since the first check. Each request costs `interval` ns of
/// "debt"; a request is allowed while the debt after it stays within `burst * interval`.
/// Integer arithmetic means no rounding drift: over any window of `e` ns at most
/// `burst + e / interval` requests pass, and `interval` is rounded *up*, so never more than
/// `burst + e * per_minute / 60 s`.
#[derive(Debug)]
struct Gcra {
    limit: u32,
    interval_ns: u128,
    capacity_ns: u128,
    origin: Option<Instant>,
    tat_ns: u128,
}

const NANOS_PER_SEC: u128 = 1_000_000_000;
const NANOS_PER_MIN: u128 = 60 * NANOS_PER_SEC;

fn ceil_secs(ns: u128) -> u64 {
    u64::try_from(ns.div_ceil(NANOS_PER_SEC)).unwrap_or(u64::MAX)
}

impl Gcra {
    fn new(rl: RateLimit) -> Self {
        // Validated non-zero at issue; max(1) keeps a hand-edited record from dividing by 0.
        let per_minute = u128::from(rl.per_minute.max(1));
        let burst = rl.burst.max(1);
        let interval_ns = NANOS_PER_MIN.div_ceil(per_minute);
        Gcra {
            limit: burst,
            interval_ns,
            capacity_ns: interval_ns * u128::from(burst),
            origin: None,
            tat_ns: 0,
        }
    }

    fn check(&mut self, now: Instant) -> RateDecision {
        let origin = *self.origin.get_or_insert(now);
        // An `Instant` older than the origin (callers racing) counts as the origin.
        let now_ns = now.saturating_duration_since(origin).as_nanos();
        let debt = self.tat_ns.saturating_sub(now_ns);
        let remaining_after = |debt: u128| {
            u32::try_from((self.capacity_ns - debt.min(self.capacity_ns)) / self.interval_ns)
                .unwrap_or(u32::MAX)
        };
        if debt + self.interval_ns <= self.capacity_ns {
            let debt = debt + self.interval_ns;
            self.tat_ns = now_ns + debt;
            RateDecision {
                allowed: true,
                limit: self.limit,
                remaining: remaining_after(debt),
                reset_secs: ceil_secs(debt),
                retry_after_secs: None,
            }
        } else {
            let wait = debt + self.interval_ns - self.capacity_ns;
            RateDecision {
                allowed: false,
                limit: self.limit,
                remaining: remaining_after(debt),
                reset_secs: ceil_secs(debt),
                retry_after_secs: Some(ceil_secs(wait).max(1)),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------------

type TokenMap = HashMap<[u8; 32], Arc<Authenticated>>;

/// All API tokens: sled for durability, an `arc-swap` map for lock-free authentication.
/// Cheap to clone (all clones share one store).
#[derive(Clone)]
pub struct TokenStore {
    inner: Arc<Inner>,
}

struct Inner {
    tree: sled::Tree,
    meta: sled::Tree,
    by_hash: ArcSwap<TokenMap>,
    /// Serializes issue/revoke so concurrent writers never publish a map missing the other's
    /// change. Never taken on the request path.
    writer: Mutex<()>,
}

impl fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenStore")
            .field("tokens", &self.inner.by_hash.load().len())
            .finish()
    }
}

fn hash_token(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

fn well_formed(token: &str) -> bool {
    token.len() == TOKEN_LEN
        && token.starts_with(TOKEN_PREFIX)
        && token[TOKEN_PREFIX.len()..]
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn validate(new: &mut NewToken, now_ms: i64) -> Result<(), TokenError> {
    if new.name.trim().is_empty() {
        return Err(TokenError::invalid("name", "must not be empty"));
    }
    // Names are shown in lists and the audit log: no control or bidi characters.
    crate::text::check(&new.name, NAME_MAX_CHARS)
        .map_err(|e| TokenError::invalid("name", e.to_string()))?;
    if new.scopes.is_empty() {
        return Err(TokenError::invalid(
            "scopes",
            "at least one scope is required (route, audit, metrics, secrets:write, secrets:release, approve, admin)",
        ));
    }
    new.scopes.sort();
    new.scopes.dedup();
    if let Some(t) = &new.tenant_id {
        if !crate::engine::valid_id(t) {
            return Err(TokenError::invalid(
                "tenant_id",
                "must start with a letter or digit and contain only letters, digits and . _ : @ / - (at most 128 characters)",
            ));
        }
    }
    if let Some(exp) = new.expires_at_ms {
        if exp <= now_ms {
            return Err(TokenError::invalid(
                "expires_at_ms",
                "must be in the future",
            ));
        }
    }
    if let Some(rl) = new.rate_limit {
        if rl.per_minute == 0 {
            return Err(TokenError::invalid(
                "rate_limit.per_minute",
                "must be greater than 0",
            ));
        }
        if rl.burst == 0 {
            return Err(TokenError::invalid(
                "rate_limit.burst",
                "must be greater than 0",
            ));
        }
    }
    Ok(())
}

impl TokenStore {
    /// Open the `tokens` tree of `db` and load every token into memory.
    ///
    /// A record that cannot be decoded is an error: skipping it would quietly disable a token
    /// someone relies on and hide the corruption; refusing to start makes it visible.
    pub fn open(db: &sled::Db) -> Result<Self, TokenError> {
        let tree = db.open_tree(TREE)?;
        let mut map = TokenMap::new();
        for item in tree.iter() {
            let (key, value) = item?;
            let id = String::from_utf8_lossy(&key).into_owned();
            let record: TokenRecord =
                rmp_serde::from_slice(&value).map_err(|e| TokenError::Corrupt {
                    id: id.clone(),
                    message: e.to_string(),
                })?;
            if record.info.id != id {
                return Err(TokenError::Corrupt {
                    id,
                    message: "record id does not match its key".into(),
                });
            }
            map.insert(record.hash, Arc::new(Authenticated::new(record)));
        }
        Ok(TokenStore {
            inner: Arc::new(Inner {
                tree,
                meta: db.open_tree(META_TREE)?,
                by_hash: ArcSwap::from_pointee(map),
                writer: Mutex::new(()),
            }),
        })
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Issue a new token. The plaintext is returned once and never stored.
    pub fn issue(
        &self,
        mut new: NewToken,
        now_ms: i64,
    ) -> Result<(IssuedToken, TokenInfo), TokenError> {
        validate(&mut new, now_ms)?;
        let mut raw = Zeroizing::new([0u8; TOKEN_BYTES]);
        OsRng.fill_bytes(raw.as_mut());
        let mut token = Zeroizing::new(String::with_capacity(TOKEN_LEN));
        token.push_str(TOKEN_PREFIX);
        // Encoded into a wiped buffer: no unzeroed copy of the token is left behind.
        let mut digits = Zeroizing::new([0u8; 2 * TOKEN_BYTES]);
        hex::encode_to_slice(raw.as_ref(), digits.as_mut()).expect("two digits per byte");
        token.push_str(std::str::from_utf8(digits.as_ref()).expect("hex digits are ASCII"));
        let hash = hash_token(&token);

        let _w = self.lock_writer();
        let current = self.inner.by_hash.load_full();
        let id = loop {
            let mut id_bytes = [0u8; 6];
            OsRng.fill_bytes(&mut id_bytes);
            let id = format!("tok_{}", hex::encode(id_bytes));
            if !self.inner.tree.contains_key(id.as_bytes())? {
                break id;
            }
        };
        let info = TokenInfo {
            id: id.clone(),
            name: new.name,
            scopes: new.scopes,
            tenant_id: new.tenant_id,
            expires_at_ms: new.expires_at_ms,
            rate_limit: new.rate_limit,
            created_at_ms: now_ms,
            last_used_ms: None,
        };
        let record = TokenRecord {
            info: info.clone(),
            hash,
        };
        let bytes = rmp_serde::to_vec_named(&record)?;
        self.inner.tree.insert(id.as_bytes(), bytes)?;
        // The token is shown once: make sure it still works after a crash.
        self.inner.tree.flush()?;
        let mut map = TokenMap::clone(&current);
        map.insert(hash, Arc::new(Authenticated::new(record)));
        self.inner.by_hash.store(Arc::new(map));
        Ok((IssuedToken(token), info))
    }

    /// Every token's public view, sorted by creation time. Also writes pending `last_used_ms`
    /// values back to sled (best effort: a failure is logged, the listing still returned).
    pub fn list(&self) -> Vec<TokenInfo> {
        if let Err(e) = self.persist_last_used() {
            tracing::warn!(error = %e, "could not persist token last-used times");
        }
        let map = self.inner.by_hash.load();
        let mut out: Vec<TokenInfo> = map.values().map(|a| a.info()).collect();
        out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        out
    }

    /// Revoke the token `id`. It stops authenticating at once, before the durable delete;
    /// if that delete fails the error says so and a retry completes it.
    /// Returns whether such a token existed.
    pub fn revoke(&self, id: &str) -> Result<bool, TokenError> {
        let _w = self.lock_writer();
        let current = self.inner.by_hash.load_full();
        let mut map = TokenMap::clone(&current);
        let before = map.len();
        map.retain(|_, a| a.info.id != id);
        let in_memory = map.len() != before;
        if in_memory {
            self.inner.by_hash.store(Arc::new(map));
        }
        let on_disk = self.inner.tree.remove(id.as_bytes())?.is_some();
        if on_disk {
            self.inner.tree.flush()?;
        }
        Ok(in_memory || on_disk)
    }

    /// Check a presented token (the part after `Bearer `). Lock-free: one snapshot load, one
    /// blake3 hash, one map lookup.
    pub fn authenticate(
        &self,
        presented: &str,
        now_ms: i64,
    ) -> Result<Arc<Authenticated>, AuthFailure> {
        if presented.is_empty() {
            return Err(AuthFailure::Missing);
        }
        if !well_formed(presented) {
            return Err(AuthFailure::Malformed);
        }
        let hash = hash_token(presented);
        let map = self.inner.by_hash.load();
        // No constant-time compare after this lookup: the map is keyed by the blake3 hash of
        // the token, so a hit already means `found.hash == hash` (comparing them again
        // compared nothing new). What the lookup's timing can leak is about the *hashes* of
        // stored tokens, never the tokens: an attacker controls only the input of a
        // preimage-resistant hash, and learning a stored hash gives no token that matches it.
        let found = map.get(&hash).ok_or(AuthFailure::Unknown)?;
        if found.info.expires_at_ms.is_some_and(|exp| now_ms >= exp) {
            return Err(AuthFailure::Expired);
        }
        let found = Arc::clone(found);
        drop(map);
        // A plain load first: within one millisecond every request but the first finds the
        // time already there, and skips a write to a cache line every worker shares.
        if found.last_used_ms.load(Ordering::Relaxed) < now_ms {
            found.last_used_ms.fetch_max(now_ms, Ordering::Relaxed);
        }
        let persisted = found.persisted_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(persisted) >= LAST_USED_PERSIST_EVERY_MS
            && found
                .persisted_ms
                .compare_exchange(persisted, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // One request a minute per token pays for an in-memory sled update (no fsync).
            if let Err(e) = self.persist_one(&found, now_ms) {
                tracing::warn!(token_id = %found.info.id, error = %e, "could not persist token last-used time");
            }
        }
        Ok(found)
    }

    /// Write every token's in-memory `last_used_ms` that sled does not have yet. Call it at
    /// shutdown; [`list`](Self::list) calls it too.
    pub fn persist_last_used(&self) -> Result<(), TokenError> {
        let map = self.inner.by_hash.load_full();
        for a in map.values() {
            let last = a.last_used_ms.load(Ordering::Relaxed);
            if last != NEVER && a.persisted_ms.fetch_max(last, Ordering::Relaxed) < last {
                self.persist_one(a, last)?;
            }
        }
        Ok(())
    }

    /// Update `last_used_ms` of a stored record in place. `update_and_fetch` only rewrites an
    /// existing key, so a revocation racing with this can never resurrect the record.
    fn persist_one(&self, a: &Authenticated, last_used_ms: i64) -> Result<(), TokenError> {
        let mut corrupt = None;
        self.inner
            .tree
            .update_and_fetch(a.info.id.as_bytes(), |old| {
                let old = old?;
                match rmp_serde::from_slice::<TokenRecord>(old) {
                    Ok(mut rec) => {
                        if rec.info.last_used_ms.is_some_and(|t| t >= last_used_ms) {
                            return Some(old.to_vec());
                        }
                        rec.info.last_used_ms = Some(last_used_ms);
                        match rmp_serde::to_vec_named(&rec) {
                            Ok(v) => Some(v),
                            Err(e) => {
                                corrupt = Some(e.to_string());
                                Some(old.to_vec())
                            }
                        }
                    }
                    Err(e) => {
                        corrupt = Some(e.to_string());
                        Some(old.to_vec())
                    }
                }
            })?;
        match corrupt {
            Some(message) => Err(TokenError::Corrupt {
                id: a.info.id.clone(),
                message,
            }),
            None => Ok(()),
        }
    }

    /// Make sure `<state_dir>/admin.token` holds a working admin token, issuing one if not.
    ///
    /// Kept when it still authenticates with the `admin` scope; otherwise (missing, revoked,
    /// expired, not admin, garbage) a new admin token is issued and the file rewritten 0600.
    /// Other tokens, including an older bootstrap token whose file was lost, are left alone.
    pub fn ensure_admin_token(
        &self,
        state_dir: &Path,
        now_ms: i64,
    ) -> Result<AdminBootstrap, TokenError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TokenError::Io { path, source }
        };
        super::ensure_private_dir(state_dir).map_err(io_err(state_dir))?;
        let path = state_dir.join(ADMIN_TOKEN_FILE);
        if let Some(existing) = read_admin_file(&path)? {
            let keep = self
                .authenticate(existing.trim(), now_ms)
                .is_ok_and(|a| a.allows(Scope::Admin));
            if keep {
                // Someone may have loosened it; the token is a full admin credential.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(io_err(&path))?;
                return Ok(AdminBootstrap {
                    path,
                    created: None,
                    revoked: None,
                });
            }
        }
        let earlier = self
            .inner
            .meta
            .get(BOOTSTRAP_KEY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        let (token, info) = self.issue(
            NewToken {
                name: ADMIN_TOKEN_NAME.to_string(),
                scopes: vec![Scope::Admin],
                tenant_id: None,
                expires_at_ms: None,
                rate_limit: None,
            },
            now_ms,
        )?;
        let mut contents = Zeroizing::new(Vec::with_capacity(TOKEN_LEN + 1));
        contents.extend_from_slice(token.expose().as_bytes());
        contents.push(b'\n');
        super::write_private_file(&path, &contents).map_err(io_err(&path))?;
        self.inner.meta.insert(BOOTSTRAP_KEY, info.id.as_bytes())?;
        self.inner.meta.flush()?;
        // The file is the bootstrap credential: the token it held must not outlive it (someone
        // who deleted the file to rotate it expects the old token to stop working). Revoked
        // only now, so a crash before this point leaves a working admin token in the file.
        let mut revoked = None;
        if let Some(old) = earlier.filter(|old| *old != info.id) {
            if self.revoke(&old)? {
                revoked = Some(old);
            }
        }
        Ok(AdminBootstrap {
            path,
            created: Some(info.id),
            revoked,
        })
    }
}

/// Read the admin token file; `None` when it does not exist. Other I/O errors are returned
/// (fail closed: an unreadable file is not silently replaced).
fn read_admin_file(path: &Path) -> Result<Option<Zeroizing<String>>, TokenError> {
    use std::io::Read;
    let io_err = |source| TokenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let mut buf = Zeroizing::new(Vec::new());
    file.take(ADMIN_FILE_MAX_BYTES)
        .read_to_end(&mut buf)
        .map_err(io_err)?;
    // Not UTF-8 means not a token: treat it as stale and replace it.
    Ok(Some(Zeroizing::new(
        std::str::from_utf8(&buf).unwrap_or("").to_string(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    const NOW: i64 = 1_700_000_000_000;

    fn temp_db() -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::test_db_at(&dir.path().join("db"));
        (dir, db)
    }

    fn new_token(name: &str, scopes: &[Scope]) -> NewToken {
        NewToken {
            name: name.to_string(),
            scopes: scopes.to_vec(),
            tenant_id: None,
            expires_at_ms: None,
            rate_limit: None,
        }
    }

    fn issue(store: &TokenStore, new: NewToken) -> (IssuedToken, TokenInfo) {
        store.issue(new, NOW).unwrap()
    }

    #[test]
    fn scope_strings_round_trip() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>().unwrap(), scope);
            assert_eq!(scope.to_string(), scope.as_str());
            let json = serde_json::to_string(&scope).unwrap();
            assert_eq!(json, format!("\"{}\"", scope.as_str()));
            assert_eq!(serde_json::from_str::<Scope>(&json).unwrap(), scope);
        }
        let err = "secrets".parse::<Scope>().unwrap_err();
        assert!(err.to_string().contains("secrets:write"), "{err}");
        assert!("ADMIN".parse::<Scope>().is_err());
        assert!(serde_json::from_str::<Scope>("\"root\"").is_err());
    }

    #[test]
    fn each_scope_allows_itself_and_admin_allows_all() {
        let (_d, db) = temp_db();
        let store = TokenStore::open(&db).unwrap();
        for scope in Scope::ALL {
            let (tok, info) = issue(&store, new_token("t", &[scope]));
            let auth = store.authenticate(tok.expose(), NOW).unwrap();
            assert_eq!(auth.id(), info.id);
            for other in Scope::ALL {
                let expected = scope == Scope::Admin || other == scope;
                assert_eq!(auth.allows(other), expected, "{scope} allows {other}?");
            }
        }
    }

    #[test]
    fn token_format_and_randomness() {
        let (_d, db) = temp_db();
        let store = TokenStore::open(&db).unwrap();
        let (a, ia) = issue(&store, new_token("a", &[Scope::Route]));
        let (b, ib) = issue(&store, new_token("b", &[Scope::Route]));
        for t in [a.expose(), b.expose()] {
            assert!(t.starts_with("hall_"));
            assert_eq!(t.len(), 5 + 64);
            assert!(t[5..]
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        }
        assert_ne!(a.expose(), b.expose());
        assert_ne!(ia.id, ib.id);
        for id in [&ia.id, &ib.id] {
            assert!(id.starts_with("tok_") && id.len() == 16, "{id}");
            assert!(!a.expose().contains(&id[4..]) && !b.expose().contains(&id[4..]));
        }
    }

    #[test]
    fn revoke_is_immediate_and_durable() {
        let (dir, db) = temp_db();
        let store = TokenStore::open(&db).unwrap();
        let (tok, info) = issue(&store, new_token("r", &[Scope::Route]));
        let (keep, _) = issue(&store, new_token("k", &[Scope::Route]));
        let held = store.authenticate(tok.expose(), NOW).unwrap();
        assert!(store.revoke(&info.id).unwrap());
        assert_eq!(
            store.authenticate(tok.expose(), NOW).unwrap_err(),
            AuthFailure::Unknown
        );
        // A request that authenticated before the revoke may still persist last_used: it must
        // not bring the record back.
        store.persist_one(&held, NOW + 5).unwrap();
        assert!(!store.revoke(&info.id).unwrap());
        assert!(!store.revoke("tok_doesnotexist").unwrap());
        assert!(store.authenticate(keep.expose(), NOW).is_ok());
        drop(store);
        drop(db);
        let db = crate::store::test_db_at(&dir.path().join("db"));
        let store = TokenStore::open(&db).unwrap();
        assert_eq!(
            store.authenticate(tok.expose(), NOW).unwrap_err(),
            AuthFailure::Unknown
        );
        assert!(store.authenticate(keep.expose(), NOW).is_ok());
        assert_eq!(store.list().len(), 1);
    }

    #[test]
    fn revoke_wins_against_concurrent_requests() {
        use std::sync::atomic::{AtomicBool, AtomicU32};
        let (_d, db) = temp_db();
        let store = TokenStore::open(&db).unwrap();
        let (tok, info) = issue(&store, new_token("c", &[Scope::Route]));
        let token = Arc::new(tok.expose().to_string());
        let revoked = Arc::new(AtomicBool::new(false));
        let successes = Arc::new(AtomicU32::new(0));
        let workers: Vec<_> = (0..4i64)
            .map(|i| {
                let (store, token) = (store.clone(), token.clone());
                let (revoked, successes) = (revoked.clone(), successes.clone());
                std::thread::spawn(move || {
                    let mut refused_after = 0;
                    let mut n = 0i64;
                    // Keep going until 500 requests have been refused after the revoke.
                    while refused_after < 500 {
                        n += 1;
                        let after_revoke = revoked.load(Ordering::SeqCst);
                        match store.authenticate(&token, NOW + n * 7 + i) {
                            Ok(_) => {
                                assert!(!after_revoke, "authenticated after revoke returned");
                                successes.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => {
                                assert_eq!(e, AuthFailure::Unknown);
                                refused_after += u32::from(after_revoke);
                            }
                        }
                    }
                })
            })
            .collect();
        // Revoke while requests are in full flow.
        while successes.load(Ordering::SeqCst) < 1000 {
            std::thread::yield_now();
        }
        assert!(store.revoke(&info.id).unwrap());
        revoked.store(true, Ordering::SeqCst);
        for w in workers {
            w.join().unwrap();
        }
        // Concurrent last_used write-backs did not bring the record back.
        assert!(db.open_tree(TREE).unwrap().is_empty());
        assert!(store.list().is_empty());
    }

    #[test]
    fn expired_unknown_malformed_missing() {
        let (_d, db) = temp_db();
        let store = TokenStore::open(&db).unwrap();
        let mut n = new_token("e", &[Scope::Route]);
        n.expires_at_ms = Some(NOW + 1000);
        let (tok, _) = issue(&store, n);
        assert!(store.authenticate(tok.expose(), NOW + 999).is_ok());
        assert_eq!(
            store.authenticate(tok.expose(), NOW + 1000).unwrap_err(),
            AuthFailure::Expired
        );
        let unknown = format!("hall_{}", "ab".repeat(32));
        assert_eq!(
            store.authenticate(&unknown, NOW).unwrap_err(),
            AuthFailure::Unknown
        );
        let valid = tok.expose().to_string();
        for bad in [
            "nope".to_string(),
            valid[5..].to_string(),
            valid.to_uppercase(),
            format!("{valid}0"),
            valid[..valid.len() - 1].to_string(),
            format!(" {}", &valid[1..]),
            format!("hall_{}g", &valid[5..valid.len() - 1]),
            format!("{}é", &valid[..valid.len() - 2]),
        ] {
            assert_eq!(
                store.authenticate(&bad, NOW).unwrap_err(),
                AuthFailure::Malformed,
                "{bad:?}"
            );
        }
        assert_eq!(
            store.authenticate("", NOW).unwrap_err(),
            AuthFailure::Missing
        );
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token(None), Err(AuthFailure::Missing));
        assert_eq!(bearer_token(Some("")), Err(AuthFailure::Missing));
        assert_eq!(bearer_token(Some("Bearer ")), Err(AuthFailure::Missing));
        assert_eq!(bearer_token(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer_token(Some("bearer  abc")), Ok("abc"));
        assert_eq!(bearer_token(Some("BEARER abc")), Ok("abc"));
        assert_eq!(bearer_token(Some("Basic abc")), Err(AuthFailure::Malformed));
        assert_eq!(bearer_token(Some("Bearerabc")), Err(AuthFailure::Malformed));
        // Extra words make the token malformed later, not silently truncated.
        assert_eq!(bearer_token(Some("Bearer a b")), Ok("a b"));
    }

    #[test]
    fn tenant_binding_is_returned() {
        let (_d, db) = temp_db();
        let store = TokenStore::open(&db).unwrap();
        let mut n = new_token("t", &[Scope::Route, Scope::SecretsRelease]);
        n.tenant_id = Some("org.acme".into());
        let (tok, info) = issue(&store, n);
        assert_eq!(info.tenant_id.as_deref(), Some("org.acme"));
        let auth = store.authenticate(tok.expose(), NOW).unwrap();
        assert_eq!(auth.tenant(), Some("org.acme"));
        assert!(auth.may_act_for("org.acme"));
        assert!(!auth.may_act_for("org.other"));
        assert!(!auth.may_act_for("org.acme2"));
        let (free, _) = issue(&store, new_token("f", &[Scope::Route]));
        let auth = store.authenticate(free.expose(), NOW).unwrap();
        assert_eq!(auth.tenant(), None);
        assert!(auth.may_act_for("anyone"));
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let (_d, db) = temp_db();
        let store = TokenStore::open(&db).unwrap();
        let field = |n: NewToken| match store.issue(n, NOW) {
            Err(TokenError::Invalid { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?}"),
        };
        assert_eq!(field(new_token("", &[Scope::Route])), "name");
        assert_eq!(field(new_token("   ", &[Scope::Route])), "name");
        assert_eq!(field(new_token(&"x".repeat(129), &[Scope::Route])), "name");
        assert_eq!(field(new_token("a\nb", &[Scope::Route])), "name");
        assert_eq!(field(new_token("n", &[])), "scopes");
        for bad in ["", "-abc", ".x", "a b", "a\u{e9}", &"a".repeat(129), "a;b"] {
            let mut n = new_token("n", &[Scope::Route]);
            n.tenant_id = Some(bad.to_string());
            assert_eq!(field(n), "tenant_id", "{bad:?}");
        }
        let mut n = new_token("n", &[Scope::Route]);
        n.expires_at_ms = Some(NOW);
        assert_eq!(field(n), "expires_at_ms");
        let mut n = new_token("n", &[Scope::Route]);
        n.rate_limit = Some(RateLimit {
            per_minute: 0,
            burst: 1,
        });
        assert_eq!(field(n), "rate_limit.per_minute");
        let mut n = new_token("n", &[Scope::Route]);
        n.rate_limit = Some(RateLimit {
            per_minute: 1,
            burst: 0,
        });
        assert_eq!(field(n), "rate_limit.burst");
        assert!(
            store.list().is_empty(),
            "nothing issued by invalid requests"
        );

        // The limits themselves are accepted.
        let mut n = new_token(&"é".repeat(128), &[Scope::Route, Scope::Route]);
        n.tenant_id = Some(
            format!("A{}", "._:@/-9".repeat(18))
                .chars()
                .take(128)
                .collect(),
        );
        let (_, info) = issue(&store, n);
        assert_eq!(info.scopes, vec![Scope::Route], "duplicates removed");
    }

    #[test]
    fn new_token_json_rejects_unknown_fields() {
        let ok: NewToken = serde_json::from_str(
            r#"{"name":"ci","scopes":["route","secrets:release"],"rate_limit":{"per_minute":60,"burst":5}}"#,
        )
        .unwrap();
        assert_eq!(ok.scopes, vec![Scope::Route, Scope::SecretsRelease]);
        assert!(serde_json::from_str::<NewToken>(
            r#"{"name":"x","scopes":["route"],"admin":true}"#
        )
        .is_err());
        assert!(serde_json::from_str::<NewToken>(r#"{"name":"x","scopes":["root"]}"#).is_err());
    }

    /// Every key and value in every tree of the db, concatenated, must not contain `needle`.
    fn assert_db_lacks(db: &sled::Db, needle: &[u8]) {
        db.flush().unwrap();
        let mut trees = 0;
        for name in db.tree_names() {
            assert!(!contains(&name, needle));
            let tree = db.open_tree(&name).unwrap();
            for item in tree.iter() {
                let (k, v) = item.unwrap();
                assert!(!contains(&k, needle), "key holds the secret");
                assert!(!contains(&v, needle), "value holds the secret");
            }
            trees += 1;
        }
        assert!(trees >= 2, "scanned the default tree and the tokens tree");
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn sled_holds_no_plaintext_token() {
        let (dir, db) = temp_db();
        let store = TokenStore::open(&db).unwrap();
        let (tok, _) = issue(&store, new_token("p", &[Scope::Admin]));
        store
            .authenticate(tok.expose(), NOW + LAST_USED_PERSIST_EVERY_MS)
            .unwrap();
        store.persist_last_used().unwrap();
        let plain = tok.expose().as_bytes();
        assert_db_lacks(&db, plain);
        // Not even the random part alone, nor its raw bytes.
        assert_db_lacks(&db, &plain[5..]);
        let raw: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&tok.expose()[5 + 2 * i..7 + 2 * i], 16).unwrap())
            .collect();
        assert_db_lacks(&db, &raw);
        // And the files on disk neither (sled's log holds what was written).
        drop(store);
        drop(db);
        for entry in walk(dir.path()) {
            let bytes = std::fs::read(&entry).unwrap();
            assert!(
                !contains(&bytes, plain),
                "{} holds the token",
                entry.display()
            );
        }
    }

    fn walk(p: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
        out
    }

    #[test]
    fn debug_and_json_never_show_token_or_hash() {
        let (_d, db) = temp_db();
        let store = TokenStore::open(&db).unwrap();
        let mut n = new_token("d", &[Scope::Route]);
        n.rate_limit = Some(RateLimit {
            per_minute: 60,
            burst: 2,
        });
        let (tok, info) = issue(&store, n);
        let hash = hash_token(tok.expose());
        let hash_hex = hex::encode(hash);
        let auth = store.authenticate(tok.expose(), NOW).unwrap();
        let record = TokenRecord {
            info: info.clone(),
            hash,
        };
        let outputs = [
            format!("{tok:?}"),
            format!("{record:?}"),
            format!("{record:#?}"),
            format!("{auth:?}"),
            format!("{store:?}"),
            format!("{info:?}"),
            serde_json::to_string(&store.list()).unwrap(),
            serde_json::to_string(&info).unwrap(),
            serde_json::to_string(&auth.info()).unwrap(),
        ];
        let hash_dec = format!("{:?}", hash.to_vec());
        for out in &outputs {
            assert!(!out.contains(tok.expose()), "{out}");
            assert!(!out.contains(&tok.expose()[5..]), "{out}");
            assert!(!out.contains(&hash_hex), "{out}");
            assert!(!out.contains(&hash_dec[1..hash_dec.len() - 1]), "{out}");
            assert!(!out.contains("\"hash\""), "{out}");
        }
        assert!(outputs[1].contains("redacted") && outputs[0].contains("redacted"));
        let listed = serde_json::to_value(store.list()).unwrap();
        let obj = listed[0].as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "created_at_ms",
                "expires_at_ms",
                "id",
                "last_used_ms",
                "name",
                "rate_limit",
                "scopes",
                "tenant_id"
            ]
        );
    }

    #[test]
    fn reopen_keeps_tokens_and_last_used() {
        let (dir, db) = temp_db();
        let store = TokenStore::open(&db).unwrap();
        let mut n = new_token("keep", &[Scope::Audit, Scope::Metrics]);
        n.tenant_id = Some("org.acme".into());
        n.rate_limit = Some(RateLimit {
            per_minute: 10,
            burst: 3,
        });
        n.expires_at_ms = Some(NOW + 10_000_000);
        let (tok, info) = issue(&store, n);
        store.authenticate(tok.expose(), NOW + 1).unwrap();
        let listed = store.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].last_used_ms, Some(NOW + 1));
        drop(store);
        drop(db);
        let db = crate::store::test_db_at(&dir.path().join("db"));
        let store = TokenStore::open(&db).unwrap();
        let auth = store.authenticate(tok.expose(), NOW + 2).unwrap();
        assert!(auth.allows(Scope::Audit) && !auth.allows(Scope::Route));
        assert_eq!(auth.tenant(), Some("org.acme"));
        let reopened = &store.list()[0];
        assert_eq!(reopened.last_used_ms, Some(NOW + 2));
        let mut expected = info;
        expected.last_used_ms = Some(NOW + 2);
        assert_eq!(reopened, &expected);
    }

    #[test]
    fn last_used_is_written_at_most_once_a_minute() {
        let (_d, db) = temp_db();
        let store = TokenStore::open(&db).unwrap();
        let (tok, info) = issue(&store, new_token("u", &[Scope::Route]));
        let stored = || -> Option<i64> {
            let v = db
                .open_tree(TREE)
                .unwrap()
                .get(info.id.as_bytes())
                .unwrap()
                .unwrap();
            rmp_serde::from_slice::<TokenRecord>(&v)
                .unwrap()
                .info
                .last_used_ms
        };
        assert_eq!(stored(), None);
        // First use ever: written (a token never used before is worth recording).
        store.authenticate(tok.expose(), NOW).unwrap();
        assert_eq!(stored(), Some(NOW));
        // Within the minute: memory only.
        for i in 1..100 {
            store.authenticate(tok.expose(), NOW + i * 100).unwrap();
        }
        assert_eq!(stored(), Some(NOW));
        let auth = store.authenticate(tok.expose(), NOW + 59_999).unwrap();
        assert_eq!(auth.info().last_used_ms, Some(NOW + 59_999));
        assert_eq!(stored(), Some(NOW));
        store.authenticate(tok.expose(), NOW + 60_000).unwrap();
        assert_eq!(stored(), Some(NOW + 60_000));
        store.authenticate(tok.expose(), NOW + 60_500).unwrap();
        assert_eq!(stored(), Some(NOW + 60_000));
        // Listing flushes what is pending.
        assert_eq!(store.list()[0].last_used_ms, Some(NOW + 60_500));
        assert_eq!(stored(), Some(NOW + 60_500));
    }

    #[test]
    fn corrupt_record_fails_open() {
        let (_d, db) = temp_db();
        db.open_tree(TREE)
            .unwrap()
            .insert("tok_x", &b"garbage"[..])
            .unwrap();
        match TokenStore::open(&db) {
            Err(TokenError::Corrupt { id, .. }) => assert_eq!(id, "tok_x"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    // ---- rate limiting ------------------------------------------------------------------

    fn limited(store: &TokenStore, per_minute: u32, burst: u32) -> Arc<Authenticated> {
        let mut n = new_token("rl", &[Scope::Route]);
        n.rate_limit = Some(RateLimit { per_minute, burst });
        let (tok, _) = issue(store, n);
        store.authenticate(tok.expose(), NOW).unwrap()
    }

    #[test]
    fn unlimited_tokens_have_no_bucket() {
        let (_d, db) = temp_db();
        let store = TokenStore::open(&db).unwrap();
        let (tok, _) = issue(&store, new_token("u", &[Scope::Route]));
        let auth = store.authenticate(tok.expose(), NOW).unwrap();
        assert_eq!(auth.rate_check(Instant::now()), None);
    }

    #[test]
    fn burst_then_denied_then_recovers() {
        let (_d, db) = temp_db();
        let store = TokenStore::open(&db).unwrap();
        // 60/min = one a second, burst 3.
        let auth = limited(&store, 60, 3);
        let t0 = Instant::now();
        for expected_remaining in [2, 1, 0] {
            let d = auth.rate_check(t0).unwrap();
            assert!(d.allowed);
            assert_eq!(d.limit, 3);
            assert_eq!(d.remaining, expected_remaining);
            assert_eq!(d.retry_after_secs, None);
        }
        let d = auth.rate_check(t0).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.remaining, 0);
        assert_eq!(d.retry_after_secs, Some(1));
        assert_eq!(d.reset_secs, 3, "three seconds until the bucket is full");
        // Half a second later: still nothing, still "retry in 1 s" (rounded up, at least 1).
        let d = auth.rate_check(t0 + Duration::from_millis(500)).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after_secs, Some(1));
        // After a second, exactly one more.
        let t1 = t0 + Duration::from_secs(1);
        assert!(auth.rate_check(t1).unwrap().allowed);
        assert!(!auth.rate_check(t1).unwrap().allowed);
        // After a long pause the bucket is full again, but never more than full.
        let t2 = t1 + Duration::from_secs(3600);
        let allowed = (0..10)
            .filter(|_| auth.rate_check(t2).unwrap().allowed)
            .count();
        assert_eq!(allowed, 3);
        // An out-of-order (older) instant does not mint tokens.
        assert!(!auth.rate_check(t0).unwrap().allowed);
    }

    #[test]
    fn slow_rate_retry_after_and_reset() {
        let (_d, db) = temp_db();
        let store = TokenStore::open(&db).unwrap();
        // 2/min = one every 30 s, burst 2.
        let auth = limited(&store, 2, 2);
        let t0 = Instant::now();
        let d = auth.rate_check(t0).unwrap();
        assert_eq!((d.allowed, d.remaining, d.reset_secs), (true, 1, 30));
        let d = auth.rate_check(t0).unwrap();
        assert_eq!((d.allowed, d.remaining, d.reset_secs), (true, 0, 60));
        let d = auth.rate_check(t0 + Duration::from_secs(10)).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after_secs, Some(20));
        assert_eq!(d.reset_secs, 50);
        assert!(
            auth.rate_check(t0 + Duration::from_secs(30))
                .unwrap()
                .allowed
        );
    }

    #[test]
    fn buckets_are_per_token_and_survive_re_authentication() {
        let (_d, db) = temp_db();
        let store = TokenStore::open(&db).unwrap();
        let mut n = new_token("a", &[Scope::Route]);
        n.rate_limit = Some(RateLimit {
            per_minute: 1,
            burst: 1,
        });
        let (a, _) = issue(&store, n.clone());
        let (b, _) = issue(&store, n);
        let t = Instant::now();
        let a1 = store.authenticate(a.expose(), NOW).unwrap();
        assert!(a1.rate_check(t).unwrap().allowed);
        // Another request with the same token shares the bucket.
        let a2 = store.authenticate(a.expose(), NOW).unwrap();
        assert!(!a2.rate_check(t).unwrap().allowed);
        // Issuing another token (which republishes the map) keeps a's bucket.
        let _ = issue(&store, new_token("c", &[Scope::Route]));
        let a3 = store.authenticate(a.expose(), NOW).unwrap();
        assert!(!a3.rate_check(t).unwrap().allowed);
        let b1 = store.authenticate(b.expose(), NOW).unwrap();
        assert!(b1.rate_check(t).unwrap().allowed);
    }

    proptest! {
        #[test]
        fn bucket_never_exceeds_burst_plus_refill(
            per_minute in 1u32..100_000,
            burst in 1u32..50,
            steps in proptest::collection::vec(0u64..5_000_000_000, 1..300),
        ) {
            let mut g = Gcra::new(RateLimit { per_minute, burst });
            let t0 = Instant::now();
            let mut elapsed_ns: u128 = 0;
            let mut allowed: u128 = 0;
            for step in steps {
                elapsed_ns += u128::from(step);
                let d = g.check(t0 + Duration::from_nanos(elapsed_ns as u64));
                prop_assert!(d.remaining <= burst);
                prop_assert_eq!(d.allowed, d.retry_after_secs.is_none());
                if let Some(r) = d.retry_after_secs { prop_assert!(r >= 1); }
                if d.allowed {
                    allowed += 1;
                }
                // allowed <= burst + elapsed * per_minute / 60 s, in exact integers.
                prop_assert!(
                    allowed.saturating_sub(u128::from(burst)) * NANOS_PER_MIN
                        <= elapsed_ns * u128::from(per_minute),
                    "allowed {} burst {} elapsed {} ns rate {}/min", allowed, burst, elapsed_ns, per_minute
                );
            }
        }

        #[test]
        fn retry_after_is_honest(per_minute in 1u32..10_000, burst in 1u32..20) {
            let mut g = Gcra::new(RateLimit { per_minute, burst });
            let t0 = Instant::now();
            let mut d = g.check(t0);
            while d.allowed { d = g.check(t0); }
            let wait = d.retry_after_secs.unwrap();
            // Waiting what Retry-After says is enough.
            prop_assert!(g.check(t0 + Duration::from_secs(wait)).allowed);
        }
    }

    // ---- admin bootstrap ----------------------------------------------------------------

    #[test]
    fn admin_token_created_once_kept_and_replaced_when_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let db = crate::store::open_db(&state).unwrap();
        let store = TokenStore::open(&db).unwrap();

        let first = store.ensure_admin_token(&state, NOW).unwrap();
        assert!(first.created.is_some());
        assert_eq!(first.revoked, None);
        assert_eq!(first.path, state.join("admin.token"));
        let mode = std::fs::metadata(&first.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let token1 = std::fs::read_to_string(&first.path).unwrap();
        assert!(token1.ends_with('\n'));
        let auth = store.authenticate(token1.trim(), NOW).unwrap();
        assert!(auth.allows(Scope::Admin));
        assert_eq!(auth.name(), "admin");

        let second = store.ensure_admin_token(&state, NOW + 1).unwrap();
        assert!(second.created.is_none());
        assert_eq!(std::fs::read_to_string(&second.path).unwrap(), token1);
        assert_eq!(store.list().len(), 1);

        // A loosened file is tightened again.
        std::fs::set_permissions(&first.path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(store
            .ensure_admin_token(&state, NOW + 2)
            .unwrap()
            .created
            .is_none());
        let mode = std::fs::metadata(&first.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        assert!(store.revoke(auth.id()).unwrap());
        let third = store.ensure_admin_token(&state, NOW + 3).unwrap();
        assert!(third.created.is_some());
        // It was revoked already: nothing more to revoke.
        assert_eq!(third.revoked, None);
        let token3 = std::fs::read_to_string(&third.path).unwrap();
        assert_ne!(token3, token1);
        assert!(store
            .authenticate(token3.trim(), NOW)
            .unwrap()
            .allows(Scope::Admin));
        let mode = std::fs::metadata(&third.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn admin_file_missing_garbage_or_not_admin_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let db = crate::store::open_db(&state).unwrap();
        let store = TokenStore::open(&db).unwrap();
        let path = state.join("admin.token");

        // A user's own token named "admin" is not the bootstrap token: never revoked here.
        let (namesake, _) = issue(&store, new_token("admin", &[Scope::Admin]));
        let first = store.ensure_admin_token(&state, NOW).unwrap();
        let token1 = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        // A lost file: a new token, and the one it held stops working.
        let second = store.ensure_admin_token(&state, NOW).unwrap();
        assert!(second.created.is_some());
        assert_eq!(second.revoked, first.created);
        assert_eq!(
            store.authenticate(token1.trim(), NOW).unwrap_err(),
            AuthFailure::Unknown
        );

        std::fs::write(&path, b"\xff\xfe not a token").unwrap();
        let third = store.ensure_admin_token(&state, NOW).unwrap();
        assert!(third.created.is_some());
        assert_eq!(third.revoked, second.created);

        let (route_only, _) = issue(&store, new_token("r", &[Scope::Route]));
        std::fs::write(&path, route_only.expose()).unwrap();
        let fourth = store.ensure_admin_token(&state, NOW).unwrap();
        assert_eq!(fourth.revoked, third.created);
        // Tokens the file did not come from are untouched.
        assert!(store.authenticate(route_only.expose(), NOW).is_ok());
        assert!(store.authenticate(namesake.expose(), NOW).is_ok());
        // The bootstrap id survives a reopen of the store.
        drop(store);
        let store = TokenStore::open(&db).unwrap();
        std::fs::remove_file(&path).unwrap();
        let fifth = store.ensure_admin_token(&state, NOW).unwrap();
        assert_eq!(fifth.revoked, fourth.created);
        let now_in_file = std::fs::read_to_string(&path).unwrap();
        assert!(store
            .authenticate(now_in_file.trim(), NOW)
            .unwrap()
            .allows(Scope::Admin));
    }

    #[test]
    fn unreadable_admin_file_is_an_error_not_a_silent_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let db = crate::store::open_db(&state).unwrap();
        let store = TokenStore::open(&db).unwrap();
        // A directory where the file should be cannot be read as a token.
        std::fs::create_dir(state.join("admin.token")).unwrap();
        assert!(matches!(
            store.ensure_admin_token(&state, NOW),
            Err(TokenError::Io { .. })
        ));
    }
}
