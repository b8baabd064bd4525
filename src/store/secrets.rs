//! Encrypted secrets in sled (SPEC section 6), and the rule for releasing one.
//!
//! Each value is sealed with XChaCha20-Poly1305 under
//! `blake3::derive_key("hall 2026 secrets v1", master_key)`, with a fresh random 24-byte nonce
//! per write and the secret's **name as associated data**, so a record copied to another name
//! does not decrypt. Records (rmp-serde, tree `secrets`, keyed by name) carry the id of the
//! master key they are sealed under; tree `secrets_meta` holds a key-check value so a wrong
//! master key fails [`SecretStore::open`] loudly instead of failing every read later.
//!
//! Values live in [`Zeroizing`] buffers; no `Debug`, `Display` or error of this module ever
//! holds a value.
//!
//! **Key rotation** ([`SecretStore::rotate_key`]) survives interruption at any point:
//! 1. the new key is written durably to the key source's *pending* slot and read back;
//! 2. from then on every write uses the pending key, and each record is re-sealed under it
//!    (compare-and-swap, one by one); readers pick the key by the record's key id;
//! 3. when no record is left under the old key, the db is flushed and its key-check moved
//!    to the new key;
//! 4. the source's current key is replaced by the pending one, then the pending slot removed.
//!
//! After a crash, [`SecretStore::open_from`] loads both keys, so every record stays readable,
//! and running `rotate_key` again resumes with the same pending key and finishes.

use std::sync::RwLock;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::keys::{KeyError, KeySource, KeySources, MasterKey};

/// Largest accepted value: secrets are credentials, not files.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Longest accepted name.
pub const MAX_NAME_LEN: usize = 128;

const AEAD_CONTEXT: &str = "hall 2026 secrets v1";
const CHECK_CONTEXT: &str = "hall 2026 secrets key-check v1";
const META_KEY: &[u8] = b"key_check";
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// What went wrong in the store. Messages name secrets and key ids, never values or keys.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "invalid secret name {0}: use 1 to 128 characters from A-Z a-z 0-9 . _ : @ / -, \
         starting with a letter or digit"
    )]
    InvalidName(String),
    #[error("secret value is {len} bytes; the limit is {max} bytes")]
    ValueTooLarge { len: usize, max: usize },
    #[error(
        "wrong master key: the secrets in this state dir were stored under master key id \
         {expected_key_id}, but the key loaded{from} has id {found_key_id}. Start Hall with \
         the original key (keyring entry, HALL_MASTER_KEY_FILE, systemd credential or \
         <state_dir>/master.key) or restore it from backup"
    )]
    WrongMasterKey {
        expected_key_id: String,
        found_key_id: String,
        /// ` from <source>` when known, so the operator sees which key was tried.
        from: String,
    },
    #[error(
        "secret `{name}` is sealed under master key id {key_id}, which is not loaded \
         (an interrupted rotation whose pending key was lost, or a foreign record)"
    )]
    UnknownKey { name: String, key_id: String },
    #[error(
        "secret `{name}` cannot be decrypted: its record was altered, corrupted or moved \
         from another name"
    )]
    Undecryptable { name: String },
    #[error("secret record `{name}` is malformed: {reason}")]
    Corrupt { name: String, reason: String },
    #[error(
        "secret `{name}` belongs to {}; a token bound to a tenant may change only its own \
         tenant's secrets, and only unbound tokens change unowned ones",
        owner.as_deref().map(|o| format!("tenant {o}")).unwrap_or_else(|| "no tenant".into())
    )]
    NotOwner { name: String, owner: Option<String> },
    #[error("key rotation: {0}")]
    Rotation(String),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("secrets database: {0}")]
    Db(#[from] sled::Error),
}

/// What may be shown about a secret: never its value.
/// How to take back one `put` or `delete`: the sealed record before and after it (never a
/// plaintext value). Used by [`SecretStore::undo`].
pub struct Undo {
    name: String,
    before: Option<sled::IVec>,
    after: Option<sled::IVec>,
}

impl Undo {
    /// The tenant owning the secret this change concerns (after a put, or before a delete).
    pub fn owner(&self) -> Option<String> {
        let raw = self.after.as_ref().or(self.before.as_ref())?;
        decode(&self.name, raw).ok()?.owner
    }
}

impl std::fmt::Debug for Undo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Undo").field("name", &self.name).finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretMeta {
    pub name: String,
    /// The tenant that owns it (written by a token bound to that tenant); `None`: unowned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// The outcome of a completed rotation (for the CLI and the audit log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RotateReport {
    pub old_key_id: String,
    pub new_key_id: String,
    /// Records re-sealed by this run.
    pub reencrypted: usize,
    /// This run finished a rotation an earlier run had started.
    pub resumed: bool,
}

/// One stored secret. `nonce` and `ciphertext` are stored as msgpack `bin` (serde_bytes;
/// it also reads an array of integers).
#[derive(Serialize, Deserialize)]
struct Record {
    key_id: String,
    #[serde(with = "serde_bytes")]
    nonce: Vec<u8>,
    #[serde(with = "serde_bytes")]
    ciphertext: Vec<u8>,
    created_ms: i64,
    updated_ms: i64,
    /// The owning tenant. Added after the first release: absent in older records (unowned).
    /// It is part of the AEAD's associated data, so it cannot be changed without the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
}

/// The AEAD's associated data: the name, and for an owned secret `\0` and the owner (ids
/// cannot contain NUL, so no two (name, owner) pairs share it). Unowned records use the
/// name alone, as every record did before owners existed.
fn associated_data(name: &str, owner: Option<&str>) -> Vec<u8> {
    let mut ad = name.as_bytes().to_vec();
    if let Some(o) = owner {
        ad.push(0);
        ad.extend_from_slice(o.as_bytes());
    }
    ad
}

#[derive(Serialize, Deserialize)]
struct KeyCheck {
    key_id: String,
    #[serde(with = "serde_bytes")]
    check: Vec<u8>,
}

/// A master key with what the store derives from it.
struct StoreKey {
    key_id: String,
    check: [u8; 32],
    aead: Zeroizing<[u8; 32]>,
    master: MasterKey,
}

impl StoreKey {
    fn new(master: MasterKey) -> Self {
        StoreKey {
            key_id: master.key_id(),
            check: blake3::derive_key(CHECK_CONTEXT, master.expose()),
            aead: Zeroizing::new(blake3::derive_key(AEAD_CONTEXT, master.expose())),
            master,
        }
    }

    fn matches(&self, check: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.check[..].ct_eq(check).into()
    }

    fn seal(
        &self,
        name: &str,
        owner: Option<&str>,
        value: &[u8],
        created_ms: i64,
        updated_ms: i64,
    ) -> Record {
        let cipher = XChaCha20Poly1305::new((&*self.aead).into());
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        // Reserve room for the tag so the plaintext copy never reallocates (which would
        // leave an un-zeroed copy behind).
        let mut buf = Zeroizing::new(Vec::with_capacity(value.len() + TAG_LEN));
        buf.extend_from_slice(value);
        cipher
            .encrypt_in_place(
                XNonce::from_slice(&nonce),
                &associated_data(name, owner),
                &mut *buf,
            )
            .expect("XChaCha20-Poly1305 encryption of a bounded buffer cannot fail");
        Record {
            key_id: self.key_id.clone(),
            nonce: nonce.to_vec(),
            ciphertext: std::mem::take(&mut *buf),
            created_ms,
            updated_ms,
            owner: owner.map(str::to_string),
        }
    }

    fn open(&self, name: &str, rec: &Record) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        if rec.nonce.len() != NONCE_LEN {
            return Err(SecretError::Corrupt {
                name: name.to_string(),
                reason: format!("nonce is {} bytes, expected {NONCE_LEN}", rec.nonce.len()),
            });
        }
        let cipher = XChaCha20Poly1305::new((&*self.aead).into());
        let mut buf = Zeroizing::new(rec.ciphertext.clone());
        cipher
            .decrypt_in_place(
                XNonce::from_slice(&rec.nonce),
                &associated_data(name, rec.owner.as_deref()),
                &mut *buf,
            )
            .map_err(|_| SecretError::Undecryptable {
                name: name.to_string(),
            })?;
        Ok(buf)
    }
}

/// The keys the store knows: the current one and, during a rotation, the pending one.
struct Keys {
    current: StoreKey,
    pending: Option<StoreKey>,
}

impl Keys {
    /// New records are sealed under the pending key once a rotation has begun.
    fn write_key(&self) -> &StoreKey {
        self.pending.as_ref().unwrap_or(&self.current)
    }
    fn by_id(&self, key_id: &str) -> Option<&StoreKey> {
        std::iter::once(&self.current)
            .chain(self.pending.as_ref())
            .find(|k| k.key_id == key_id)
    }
}

/// A secret's plaintext and its owning tenant.
type ValueAndOwner = (Zeroizing<Vec<u8>>, Option<String>);

/// Encrypted secrets in the `secrets` tree.
pub struct SecretStore {
    db: sled::Db,
    tree: sled::Tree,
    meta: sled::Tree,
    keys: RwLock<Keys>,
    /// One rotation at a time: two concurrent runs could each persist a different
    /// pending key, and records sealed under the overwritten one would be lost.
    rotation: std::sync::Mutex<()>,
}

/// Where a test run of rotation stops, simulating a crash.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy)]
enum StopAt {
    /// After re-sealing this many records.
    AfterRecords(usize),
    /// After all records are re-sealed, before the key-check moves.
    BeforeCheck,
    /// After the key-check moved, before the source's current key is replaced.
    BeforePromote,
    /// After promotion, before the pending slot is removed.
    BeforeClearPending,
}

impl SecretStore {
    /// Open with one master key (tests: the daemon uses [`open_from`](Self::open_from),
    /// which also loads a pending rotation key). Fails with [`SecretError::WrongMasterKey`]
    /// if the db was written under another key.
    #[cfg(test)]
    pub fn open(db: &sled::Db, key: MasterKey) -> Result<Self, SecretError> {
        Self::open_with_pending(db, key, None)
    }

    /// Load the master key (and any pending rotation key) from `sources` and open the
    /// store. Returns the key's source for the startup log line.
    pub fn open_from(
        db: &sled::Db,
        sources: &KeySources,
    ) -> Result<(Self, KeySource), SecretError> {
        let (key, source) = sources.load()?;
        let pending = sources.pending(&source)?;
        let store = Self::open_with_pending(db, key, pending).map_err(|e| match e {
            SecretError::WrongMasterKey {
                expected_key_id,
                found_key_id,
                ..
            } => SecretError::WrongMasterKey {
                expected_key_id,
                found_key_id,
                from: format!(" from {source}"),
            },
            other => other,
        })?;
        Ok((store, source))
    }

    /// Open knowing both keys of an interrupted rotation.
    pub fn open_with_pending(
        db: &sled::Db,
        current: MasterKey,
        pending: Option<MasterKey>,
    ) -> Result<Self, SecretError> {
        let store = SecretStore {
            db: db.clone(),
            tree: db.open_tree("secrets")?,
            meta: db.open_tree("secrets_meta")?,
            keys: RwLock::new(Keys {
                current: StoreKey::new(current),
                pending: pending.map(StoreKey::new),
            }),
            rotation: std::sync::Mutex::new(()),
        };
        store.verify_keys()?;
        Ok(store)
    }

    /// Check the stored key-check value against the loaded keys, and that every record is
    /// sealed under a loaded key. Writes the key-check on first use.
    fn verify_keys(&self) -> Result<(), SecretError> {
        let keys = self.read_keys();
        match self.meta.get(META_KEY)? {
            Some(raw) => {
                let kc: KeyCheck =
                    rmp_serde::from_slice(&raw).map_err(|e| SecretError::Corrupt {
                        name: "(key check)".into(),
                        reason: e.to_string(),
                    })?;
                let known = std::iter::once(&keys.current)
                    .chain(keys.pending.as_ref())
                    .any(|k| k.matches(&kc.check));
                if !known {
                    return Err(SecretError::WrongMasterKey {
                        expected_key_id: kc.key_id,
                        found_key_id: keys.current.key_id.clone(),
                        from: String::new(),
                    });
                }
            }
            None => {
                self.write_check(&keys.current)?;
            }
        }
        for item in self.tree.iter() {
            let (k, v) = item?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let rec = decode(&name, &v)?;
            if keys.by_id(&rec.key_id).is_none() {
                return Err(SecretError::UnknownKey {
                    name,
                    key_id: rec.key_id,
                });
            }
        }
        Ok(())
    }

    fn write_check(&self, key: &StoreKey) -> Result<(), SecretError> {
        let kc = KeyCheck {
            key_id: key.key_id.clone(),
            check: key.check.to_vec(),
        };
        let bytes = rmp_serde::to_vec_named(&kc).expect("key check encodes");
        self.meta.insert(META_KEY, bytes)?;
        self.db.flush()?;
        Ok(())
    }

    fn read_keys(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        // A panic while holding the lock cannot leave `Keys` half-updated (assignments
        // only), so a poisoned lock is still consistent.
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_keys(&self) -> std::sync::RwLockWriteGuard<'_, Keys> {
        self.keys.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The id of the key new writes are sealed under (for status output).
    pub fn key_id(&self) -> String {
        self.read_keys().write_key().key_id.clone()
    }

    /// Store (or replace) a secret as an unbound writer; durable when this returns (tests:
    /// the daemon uses [`put_undoable`](Self::put_undoable)).
    #[cfg(test)]
    pub fn put(&self, name: &str, value: &[u8], now_ms: i64) -> Result<SecretMeta, SecretError> {
        self.put_undoable(name, value, now_ms, None, None)
            .map(|(meta, _)| meta)
    }

    /// Store (or replace) a secret, durable when this returns, by a writer bound to `writer_tenant` (or unbound), also returning
    /// how to take the change back (see [`Undo`]).
    ///
    /// Ownership: a bound writer creates secrets owned by its tenant and may replace only
    /// those ([`SecretError::NotOwner`] otherwise); `owner` must then be `None` or its own
    /// tenant. An unbound writer may replace any secret and sets its owner to `owner` (`None`:
    /// unowned) — so a value the operator writes never stays owned by a tenant that merely
    /// created the name first.
    pub fn put_undoable(
        &self,
        name: &str,
        value: &[u8],
        now_ms: i64,
        writer_tenant: Option<&str>,
        owner: Option<&str>,
    ) -> Result<(SecretMeta, Undo), SecretError> {
        let owner = match (writer_tenant, owner) {
            (Some(w), Some(o)) if w != o => {
                return Err(SecretError::NotOwner {
                    name: name.to_string(),
                    owner: Some(o.to_string()),
                })
            }
            (Some(w), _) => Some(w),
            (None, o) => o,
        };
        validate_name(name)?;
        if value.len() > MAX_VALUE_LEN {
            return Err(SecretError::ValueTooLarge {
                len: value.len(),
                max: MAX_VALUE_LEN,
            });
        }
        // Hold the read lock across the write, so a rotation starting now waits until this
        // record is in the tree (and will then re-seal it) — see `rotate_key`.
        let keys = self.read_keys();
        let key = keys.write_key();
        let mut old = self.tree.get(name)?;
        let meta = loop {
            let created_ms = match &old {
                Some(raw) => {
                    let rec = decode(name, raw)?;
                    check_owner(name, rec.owner.as_deref(), writer_tenant)?;
                    rec.created_ms
                }
                None => now_ms,
            };
            let rec = key.seal(name, owner, value, created_ms, now_ms);
            let bytes = sled::IVec::from(rmp_serde::to_vec_named(&rec).expect("record encodes"));
            match self
                .tree
                .compare_and_swap(name, old.as_ref(), Some(bytes.clone()))?
            {
                Ok(()) => {
                    let meta = SecretMeta {
                        name: name.to_string(),
                        tenant_id: owner.map(str::to_string),
                        created_ms,
                        updated_ms: now_ms,
                    };
                    let undo = Undo {
                        name: name.to_string(),
                        before: old,
                        after: Some(bytes),
                    };
                    break (meta, undo);
                }
                Err(cas) => old = cas.current,
            }
        };
        drop(keys);
        self.db.flush()?;
        Ok(meta)
    }

    /// Take back a change, only if the record is still exactly what that change left (a
    /// later write or a key rotation wins). Returns whether it was undone. The daemon uses it
    /// when a change cannot be written to the audit log: no unaudited change stays.
    pub fn undo(&self, undo: Undo) -> Result<bool, SecretError> {
        // Under the read lock, like a write: a rotation re-seals after, not during.
        let _keys = self.read_keys();
        let done = self
            .tree
            .compare_and_swap(&undo.name, undo.after, undo.before)?
            .is_ok();
        if done {
            self.db.flush()?;
        }
        Ok(done)
    }

    /// The value, or `None` if no secret has this name. Only `release` should hand it out.
    pub fn get(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, SecretError> {
        Ok(self.get_owned(name)?.map(|(v, _)| v))
    }

    /// The value and its owning tenant.
    fn get_owned(&self, name: &str) -> Result<Option<ValueAndOwner>, SecretError> {
        validate_name(name)?;
        // Lock the keys before reading the record: a rotation finishing between the two
        // would drop the old key the record was sealed under (UnknownKey, a spurious 500).
        let keys = self.read_keys();
        let Some(raw) = self.tree.get(name)? else {
            return Ok(None);
        };
        let rec = decode(name, &raw)?;
        let key = keys
            .by_id(&rec.key_id)
            .ok_or_else(|| SecretError::UnknownKey {
                name: name.to_string(),
                key_id: rec.key_id.clone(),
            })?;
        let value = key.open(name, &rec)?;
        Ok(Some((value, rec.owner)))
    }

    /// Names, owners and times of all secrets, sorted by name. Never values.
    pub fn list(&self) -> Result<Vec<SecretMeta>, SecretError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let rec = decode(&name, &v)?;
            out.push(SecretMeta {
                name,
                tenant_id: rec.owner,
                created_ms: rec.created_ms,
                updated_ms: rec.updated_ms,
            });
        }
        Ok(out)
    }

    /// Remove a secret as an unbound writer; `false` if there was none. Durable when this
    /// returns (tests: the daemon uses [`delete_undoable`](Self::delete_undoable)).
    #[cfg(test)]
    pub fn delete(&self, name: &str) -> Result<bool, SecretError> {
        self.delete_undoable(name, None).map(|u| u.is_some())
    }

    /// Remove a secret, durable when this returns, by a writer bound to `writer_tenant` (or unbound), returning
    /// how to take it back; `None` if there was none. Ownership as for
    /// [`put_undoable`](Self::put_undoable).
    pub fn delete_undoable(
        &self,
        name: &str,
        writer_tenant: Option<&str>,
    ) -> Result<Option<Undo>, SecretError> {
        validate_name(name)?;
        let before = loop {
            let Some(current) = self.tree.get(name)? else {
                return Ok(None);
            };
            check_owner(
                name,
                decode(name, &current)?.owner.as_deref(),
                writer_tenant,
            )?;
            // Remove exactly the record whose owner was checked.
            if self
                .tree
                .compare_and_swap(name, Some(&current), None as Option<&[u8]>)?
                .is_ok()
            {
                break current;
            }
        };
        self.db.flush()?;
        Ok(Some(Undo {
            name: name.to_string(),
            before: Some(before),
            after: None,
        }))
    }

    /// Check [`check_release`], then return the value (or [`Refusal::UnknownSecret`]).
    /// Existence is checked last so a caller without the right cannot probe names.
    pub fn release(
        &self,
        name: &str,
        decision: Option<&DecisionFacts<'_>>,
        caller: &Caller<'_>,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Zeroizing<Vec<u8>>, ReleaseError> {
        check_release(name, decision, caller, now_ms, ttl_ms).map_err(ReleaseError::Refused)?;
        match self.get_owned(name) {
            // An owned secret serves its tenant's decisions only.
            Ok(Some((_, Some(owner)))) if decision.is_some_and(|d| d.tenant_id != owner) => {
                Err(ReleaseError::Refused(Refusal::OwnedByOtherTenant))
            }
            Ok(Some((v, _))) => Ok(v),
            Ok(None) => Err(ReleaseError::Refused(Refusal::UnknownSecret)),
            Err(e) => Err(ReleaseError::Store(e)),
        }
    }

    /// Re-seal every secret under a new master key and make it the current key of `source`
    /// (the source the store's key was loaded from). Safe to interrupt; run it again to
    /// finish (it then reuses the pending key). Refused for a systemd credential, which
    /// Hall cannot rewrite.
    pub fn rotate_key(
        &self,
        sources: &KeySources,
        source: &KeySource,
    ) -> Result<RotateReport, SecretError> {
        Ok(self
            .rotate_inner(sources, source, None)?
            .expect("rotation without a stop point runs to the end"))
    }

    /// `rotate_key`, stopping (as if crashed) at `stop`; `Ok(None)` when it stopped.
    fn rotate_inner(
        &self,
        sources: &KeySources,
        source: &KeySource,
        stop: Option<StopAt>,
    ) -> Result<Option<RotateReport>, SecretError> {
        let _one_at_a_time = self.rotation.lock().unwrap_or_else(|p| p.into_inner());
        // 1. The pending key: the persisted one if a rotation was interrupted, else new.
        let persisted = sources.pending(source)?;
        let resumed = persisted.is_some();
        let new = match persisted {
            Some(p) => p,
            None => {
                if self.read_keys().pending.is_some() {
                    return Err(SecretError::Rotation(format!(
                        "the pending key vanished from {source}; refusing to continue"
                    )));
                }
                let k = MasterKey::generate();
                sources.store_pending(source, &k)?;
                // Never seal anything under a key that is not durably stored.
                if sources.pending(source)?.as_ref() != Some(&k) {
                    return Err(SecretError::Rotation(format!(
                        "the new key could not be stored in {source}"
                    )));
                }
                k
            }
        };
        let (old_key_id, new_key_id) = {
            let mut keys = self.write_keys();
            if let Some(p) = &keys.pending {
                if p.master != new {
                    return Err(SecretError::Rotation(format!(
                        "the pending key in {source} (id {}) is not the one this store \
                         was opened with (id {})",
                        new.key_id(),
                        p.key_id
                    )));
                }
            } else {
                keys.pending = Some(StoreKey::new(new.clone()));
            }
            (keys.current.key_id.clone(), new.key_id())
        };

        // 2. Re-seal, in passes, until a pass finds nothing left under another key.
        let mut reencrypted = 0usize;
        loop {
            let mut this_pass = 0usize;
            for item in self.tree.iter() {
                let (k, raw) = item?;
                let name = String::from_utf8_lossy(&k).into_owned();
                let rec = decode(&name, &raw)?;
                if rec.key_id == new_key_id {
                    continue;
                }
                if let Some(StopAt::AfterRecords(n)) = stop {
                    if reencrypted == n {
                        return Ok(None);
                    }
                }
                let keys = self.read_keys();
                let from = keys
                    .by_id(&rec.key_id)
                    .ok_or_else(|| SecretError::UnknownKey {
                        name: name.clone(),
                        key_id: rec.key_id.clone(),
                    })?;
                let value = from.open(&name, &rec)?;
                let to = keys.pending.as_ref().expect("pending key installed above");
                let sealed = to.seal(
                    &name,
                    rec.owner.as_deref(),
                    &value,
                    rec.created_ms,
                    rec.updated_ms,
                );
                let bytes = rmp_serde::to_vec_named(&sealed).expect("record encodes");
                // A concurrent put/delete wins; the next pass looks again.
                if self
                    .tree
                    .compare_and_swap(&k, Some(raw), Some(bytes))?
                    .is_ok()
                {
                    this_pass += 1;
                    reencrypted += 1;
                }
            }
            if this_pass == 0 {
                break;
            }
        }
        if let Some(StopAt::AfterRecords(_)) = stop {
            // Fewer records than the stop point: crash before the flush.
            return Ok(None);
        }
        self.db.flush()?;
        if matches!(stop, Some(StopAt::BeforeCheck)) {
            return Ok(None);
        }

        // 3. The db now belongs to the new key.
        {
            let keys = self.read_keys();
            self.write_check(keys.pending.as_ref().expect("pending key installed"))?;
        }
        if matches!(stop, Some(StopAt::BeforePromote)) {
            return Ok(None);
        }

        // 4. Promote in the source, then forget the old key.
        sources.promote(source, &new)?;
        if matches!(stop, Some(StopAt::BeforeClearPending)) {
            return Ok(None);
        }
        sources.clear_pending(source)?;
        {
            let mut keys = self.write_keys();
            let pending = keys.pending.take().expect("pending key installed");
            keys.current = pending;
        }
        Ok(Some(RotateReport {
            old_key_id,
            new_key_id,
            reencrypted,
            resumed,
        }))
    }
}

/// A writer bound to a tenant may change that tenant's secrets only; an unbound writer may
/// change any.
fn check_owner(name: &str, owner: Option<&str>, writer: Option<&str>) -> Result<(), SecretError> {
    match writer {
        Some(w) if owner != Some(w) => Err(SecretError::NotOwner {
            name: name.to_string(),
            owner: owner.map(str::to_string),
        }),
        _ => Ok(()),
    }
}

fn decode(name: &str, raw: &[u8]) -> Result<Record, SecretError> {
    rmp_serde::from_slice(raw).map_err(|e| SecretError::Corrupt {
        name: name.to_string(),
        reason: e.to_string(),
    })
}

/// Names follow `[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}`.
pub fn validate_name(name: &str) -> Result<(), SecretError> {
    // Secret names follow the one id syntax (at most MAX_NAME_LEN = 128 bytes).
    if crate::engine::valid_id(name) {
        Ok(())
    } else {
        let shown: String = name.chars().take(64).collect();
        let more = if name.chars().count() > 64 { "…" } else { "" };
        Err(SecretError::InvalidName(format!("{shown:?}{more}")))
    }
}

// ---------------------------------------------------------------------------------------
// Release conditions.

/// What the daemon knows about the decision a release request names.
#[derive(Debug, Clone, Copy)]
pub struct DecisionFacts<'a> {
    pub allowed: bool,
    pub dry_run: bool,
    pub decided_at_ms: i64,
    /// The selected worker's `secrets` list.
    pub worker_secrets: &'a [String],
    pub tenant_id: &'a str,
}

/// Who asks for the release.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The tenant the token is bound to, if any.
    pub tenant: Option<&'a str>,
    pub is_admin: bool,
    pub has_release_scope: bool,
}

/// Why a release was refused. Each has a stable machine code for the API and the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this token lacks the secrets:release scope")]
    MissingScope,
    #[error("no decision with this id")]
    UnknownDecision,
    #[error("the decision did not allow the request")]
    DecisionDenied,
    #[error("the decision was a dry run")]
    DryRun,
    #[error("the decision is older than secrets.release_ttl")]
    DecisionExpired,
    #[error("the decision's worker does not list this secret")]
    WorkerNotEntitled,
    #[error("the token is not bound to the decision's tenant")]
    TenantMismatch,
    #[error("no secret with this name")]
    UnknownSecret,
    #[error("the secret belongs to another tenant than the decision's")]
    OwnedByOtherTenant,
}

impl Refusal {
    /// The machine code of the error response (`"code"`) and of the audit record.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::MissingScope => "forbidden",
            Refusal::UnknownDecision => "unknown_decision",
            Refusal::DecisionDenied => "decision_denied",
            Refusal::DryRun => "dry_run",
            Refusal::DecisionExpired => "decision_expired",
            Refusal::WorkerNotEntitled => "worker_not_entitled",
            Refusal::TenantMismatch | Refusal::OwnedByOtherTenant => "tenant_mismatch",
            Refusal::UnknownSecret => "unknown_secret",
        }
    }
}

/// Why [`SecretStore::release`] returned no value.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("release refused: {0}")]
    Refused(Refusal),
    #[error(transparent)]
    Store(SecretError),
}

/// Whether `caller` may receive `secret` on the strength of `decision`. Pure: the daemon
/// gathers the facts; `now_ms` and `ttl_ms` (`secrets.release_ttl`) come from it too.
///
/// Checked in this order, so a caller learns nothing about a decision it has no right to:
/// 1. scope `secrets:release` (admin has every scope), else `forbidden`;
/// 2. a valid secret name, else `unknown_secret` (no such secret can exist);
/// 3. the decision exists, else `unknown_decision`;
/// 4. tenant: a tenant-bound token only for that tenant's decisions; an **unbound token
///    only if admin** — an unbound `secrets:release` token could otherwise take any
///    tenant's secrets, so it gets `tenant_mismatch` (bind release tokens to a tenant);
/// 5. the decision was allowed (`decision_denied`), not a dry run (`dry_run`);
/// 6. its age is in `[0, ttl_ms)`, else `decision_expired` (a decision from the future
///    means the clock stepped back: fail closed);
/// 7. the selected worker lists the secret, else `worker_not_entitled`.
///
/// Whether the secret exists is checked after this (`unknown_secret`), by
/// [`SecretStore::release`].
pub fn check_release(
    secret: &str,
    decision: Option<&DecisionFacts<'_>>,
    caller: &Caller<'_>,
    now_ms: i64,
    ttl_ms: i64,
) -> Result<(), Refusal> {
    if !(caller.has_release_scope || caller.is_admin) {
        return Err(Refusal::MissingScope);
    }
    if validate_name(secret).is_err() {
        return Err(Refusal::UnknownSecret);
    }
    let d = decision.ok_or(Refusal::UnknownDecision)?;
    match caller.tenant {
        Some(t) if t == d.tenant_id => {}
        Some(_) => return Err(Refusal::TenantMismatch),
        None if caller.is_admin => {}
        None => return Err(Refusal::TenantMismatch),
    }
    if !d.allowed {
        return Err(Refusal::DecisionDenied);
    }
    if d.dry_run {
        return Err(Refusal::DryRun);
    }
    let age = now_ms.checked_sub(d.decided_at_ms);
    if !matches!(age, Some(a) if (0..ttl_ms).contains(&a)) {
        return Err(Refusal::DecisionExpired);
    }
    if !d.worker_secrets.iter().any(|s| s == secret) {
        return Err(Refusal::WorkerNotEntitled);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::keys::fake::MemoryKeyring;
    use super::super::keys::KeyEnv;
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;

    fn mem_db() -> sled::Db {
        sled::Config::new().temporary(true).open().unwrap()
    }

    fn key(b: u8) -> MasterKey {
        MasterKey::from_bytes([b; 32])
    }

    fn raw(store: &SecretStore, name: &str) -> Record {
        decode(name, &store.tree.get(name).unwrap().unwrap()).unwrap()
    }

    #[test]
    fn a_change_is_undone_only_while_it_is_the_latest() {
        let db = mem_db();
        let s = SecretStore::open(&db, key(1)).unwrap();
        // A new secret, undone: gone.
        let (_, undo) = s.put_undoable("a", b"one", 1, None, None).unwrap();
        assert!(s.undo(undo).unwrap());
        assert_eq!(s.get("a").unwrap(), None);
        // A replaced value, undone: the old value (and times) are back.
        s.put("a", b"one", 1).unwrap();
        let (_, undo) = s.put_undoable("a", b"two", 2, None, None).unwrap();
        assert!(s.undo(undo).unwrap());
        assert_eq!(&s.get("a").unwrap().unwrap()[..], b"one");
        assert_eq!(s.list().unwrap()[0].updated_ms, 1);
        // A delete, undone: back.
        let undo = s.delete_undoable("a", None).unwrap().unwrap();
        assert!(s.undo(undo).unwrap());
        assert_eq!(&s.get("a").unwrap().unwrap()[..], b"one");
        assert!(s.delete_undoable("nope", None).unwrap().is_none());
        // A later write wins: the earlier change is not undone over it.
        let (_, undo) = s.put_undoable("a", b"two", 2, None, None).unwrap();
        s.put("a", b"three", 3).unwrap();
        assert!(!s.undo(undo).unwrap());
        assert_eq!(&s.get("a").unwrap().unwrap()[..], b"three");
        let undo = s.delete_undoable("a", None).unwrap().unwrap();
        s.put("a", b"four", 4).unwrap();
        assert!(!s.undo(undo).unwrap());
        assert_eq!(&s.get("a").unwrap().unwrap()[..], b"four");
        // Debug output names the secret, never the sealed bytes.
        let (_, undo) = s.put_undoable("b", b"five", 5, None, None).unwrap();
        assert_eq!(format!("{undo:?}"), r#"Undo { name: "b" }"#);
    }

    #[test]
    fn round_trip_update_and_delete() {
        let db = mem_db();
        let s = SecretStore::open(&db, key(1)).unwrap();
        let m = s.put("db/password", b"hunter2", 1000).unwrap();
        assert_eq!(
            m,
            SecretMeta {
                name: "db/password".into(),
                tenant_id: None,
                created_ms: 1000,
                updated_ms: 1000
            }
        );
        assert_eq!(&s.get("db/password").unwrap().unwrap()[..], b"hunter2");
        let m = s.put("db/password", b"", 2000).unwrap();
        assert_eq!((m.created_ms, m.updated_ms), (1000, 2000));
        assert_eq!(&s.get("db/password").unwrap().unwrap()[..], b"");
        assert_eq!(s.get("other").unwrap(), None);
        assert!(s.delete("db/password").unwrap());
        assert!(!s.delete("db/password").unwrap());
        assert_eq!(s.get("db/password").unwrap(), None);
    }

    #[test]
    fn same_value_twice_gives_different_ciphertexts() {
        let s = SecretStore::open(&mem_db(), key(1)).unwrap();
        s.put("a", b"same value", 1).unwrap();
        let r1 = raw(&s, "a");
        s.put("a", b"same value", 2).unwrap();
        let r2 = raw(&s, "a");
        assert_eq!(r1.nonce.len(), 24);
        assert_ne!(r1.nonce, r2.nonce);
        assert_ne!(r1.ciphertext, r2.ciphertext);
        assert_eq!(r1.ciphertext.len(), b"same value".len() + TAG_LEN);
    }

    #[test]
    fn record_moved_to_another_name_does_not_decrypt() {
        let s = SecretStore::open(&mem_db(), key(1)).unwrap();
        s.put("prod.token", b"top", 1).unwrap();
        let bytes = s.tree.get("prod.token").unwrap().unwrap();
        s.tree.insert("dev.token", bytes).unwrap();
        let err = s.get("dev.token").unwrap_err();
        assert!(matches!(err, SecretError::Undecryptable { ref name } if name == "dev.token"));
        assert_eq!(&s.get("prod.token").unwrap().unwrap()[..], b"top");
    }

    #[test]
    fn tampered_ciphertext_or_nonce_fails() {
        let s = SecretStore::open(&mem_db(), key(1)).unwrap();
        s.put("x", b"value", 1).unwrap();
        for which in 0..3 {
            let mut r = raw(&s, "x");
            match which {
                0 => r.ciphertext[0] ^= 1,
                1 => *r.ciphertext.last_mut().unwrap() ^= 0x80,
                _ => r.nonce[5] ^= 1,
            }
            s.tree
                .insert("y", rmp_serde::to_vec_named(&r).unwrap())
                .unwrap();
            // Same name as sealed, so only the tampering can fail it.
            s.tree
                .insert("x", s.tree.get("y").unwrap().unwrap())
                .unwrap();
            assert!(
                matches!(s.get("x"), Err(SecretError::Undecryptable { .. })),
                "case {which}"
            );
            s.tree.remove("y").unwrap();
            s.put("x", b"value", 1).unwrap();
        }
    }

    #[test]
    fn wrong_master_key_is_detected_at_open() {
        let db = mem_db();
        let s = SecretStore::open(&db, key(1)).unwrap();
        s.put("a", b"v", 1).unwrap();
        drop(s);
        let err = SecretStore::open(&db, key(2)).err().unwrap();
        match &err {
            SecretError::WrongMasterKey {
                expected_key_id,
                found_key_id,
                ..
            } => {
                assert_eq!(expected_key_id, &key(1).key_id());
                assert_eq!(found_key_id, &key(2).key_id());
            }
            other => panic!("{other}"),
        }
        // Even with no secret stored yet, the key-check pins the key.
        let db = mem_db();
        drop(SecretStore::open(&db, key(1)).unwrap());
        assert!(matches!(
            SecretStore::open(&db, key(2)),
            Err(SecretError::WrongMasterKey { .. })
        ));
        assert!(SecretStore::open(&db, key(1)).is_ok());
    }

    #[test]
    fn record_under_an_unknown_key_is_detected_at_open() {
        let db = mem_db();
        let s = SecretStore::open(&db, key(1)).unwrap();
        let foreign = StoreKey::new(key(9)).seal("z", None, b"v", 1, 1);
        s.tree
            .insert("z", rmp_serde::to_vec_named(&foreign).unwrap())
            .unwrap();
        drop(s);
        let err = SecretStore::open(&db, key(1)).err().unwrap();
        assert!(
            matches!(&err, SecretError::UnknownKey { name, key_id } if name == "z" && *key_id == key(9).key_id()),
            "{err}"
        );
    }

    #[test]
    fn list_shows_metadata_never_values() {
        let s = SecretStore::open(&mem_db(), key(1)).unwrap();
        s.put("b", b"VALUE-B-1234", 5).unwrap();
        s.put("a", b"VALUE-A-5678", 6).unwrap();
        let list = s.list().unwrap();
        assert_eq!(
            list.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let json = serde_json::to_string(&list).unwrap();
        let dbg = format!("{list:?}");
        for text in [&json, &dbg] {
            assert!(!text.contains("VALUE-"), "{text}");
        }
        assert!(json.contains("\"created_ms\":6"));
    }

    #[test]
    fn raw_sled_files_never_contain_a_plaintext_value() {
        let t = tempfile::tempdir().unwrap();
        let value = b"plaintext-canary-7c1f9e2a-do-not-store";
        {
            let db = crate::store::test_db_at(&t.path().join("db"));
            let s = SecretStore::open(&db, key(1)).unwrap();
            s.put("canary", value, 1).unwrap();
            s.put("canary2", value, 2).unwrap();
            db.flush().unwrap();
        }
        fn walk(p: &Path, out: &mut Vec<Vec<u8>>) {
            for e in std::fs::read_dir(p).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out)
                } else {
                    out.push(std::fs::read(&p).unwrap())
                }
            }
        }
        let mut files = Vec::new();
        walk(t.path(), &mut files);
        assert!(!files.is_empty());
        let total: usize = files.iter().map(Vec::len).sum();
        assert!(total > value.len());
        // The names are stored in clear (they are not secret): proves the scan sees data.
        assert!(files.iter().any(|f| f.windows(7).any(|w| w == b"canary2")));
        for f in &files {
            assert!(!f.windows(value.len()).any(|w| w == value));
            assert!(!f.windows(16).any(|w| w == &value[..16]));
        }
    }

    #[test]
    fn names_and_sizes_are_validated() {
        let s = SecretStore::open(&mem_db(), key(1)).unwrap();
        for ok in ["a", "A9", "x.y_z:w@v/u-t", &"a".repeat(128)] {
            s.put(ok, b"v", 1).unwrap();
        }
        for bad in ["", ".a", "-a", "a b", "a\n", "é", &"a".repeat(129)] {
            let err = s.put(bad, b"v", 1).unwrap_err();
            assert!(matches!(err, SecretError::InvalidName(_)), "{bad:?}");
            assert!(err.to_string().contains("1 to 128 characters"));
        }
        let big = vec![b'q'; MAX_VALUE_LEN + 1];
        let err = s.put("big", &big, 1).unwrap_err();
        assert!(err.to_string().contains("65537 bytes"), "{err}");
        assert!(!err.to_string().contains("qqqq"));
        s.put("big", &big[..MAX_VALUE_LEN], 1).unwrap();
        assert_eq!(s.get("big").unwrap().unwrap().len(), MAX_VALUE_LEN);
    }

    // ---- rotation ----

    struct Rig {
        dir: tempfile::TempDir,
        keyring: MemoryKeyring,
    }

    impl Rig {
        fn new(keyring: MemoryKeyring) -> Self {
            Rig {
                dir: tempfile::tempdir().unwrap(),
                keyring,
            }
        }
        fn sources(&self) -> KeySources {
            let env = KeyEnv {
                state_dir: self.dir.path().join("state"),
                key_file: None,
                credentials_dir: None,
                use_keyring: true,
            };
            KeySources::with_keyring(env, Box::new(self.keyring.clone()))
        }
        /// A fresh "process": reopen the db from disk and the keys from their source.
        fn boot(&self) -> (sled::Db, SecretStore, KeySource) {
            let db = crate::store::test_db_at(&self.dir.path().join("db"));
            let (s, src) = SecretStore::open_from(&db, &self.sources()).unwrap();
            (db, s, src)
        }
    }

    fn value_of(i: usize) -> Vec<u8> {
        format!("secret value number {i}").into_bytes()
    }

    /// Store n secrets, crash the rotation at `stop`, reboot, rerun, check everything.
    fn interrupted_rotation(keyring: MemoryKeyring, n: usize, stop: StopAt) {
        let rig = Rig::new(keyring);
        let (db, s, src) = rig.boot();
        let old = s.key_id();
        let (old_key, _) = rig.sources().load().unwrap();
        for i in 0..n {
            s.put(&format!("s{i}"), &value_of(i), i as i64).unwrap();
        }
        let stopped = s.rotate_inner(&rig.sources(), &src, Some(stop)).unwrap();
        assert!(stopped.is_none(), "{stop:?} must stop the run");
        drop((s, db));

        // After the crash: everything readable, and new writes still work.
        let (db, s, src2) = rig.boot();
        assert_eq!(src, src2);
        for i in 0..n {
            assert_eq!(
                s.get(&format!("s{i}")).unwrap().unwrap().to_vec(),
                value_of(i)
            );
        }
        s.put("written.mid.rotation", b"mid", 99).unwrap();

        let report = s.rotate_key(&rig.sources(), &src).unwrap();
        assert!(report.resumed);
        assert_ne!(report.new_key_id, old);
        // Interrupted after promotion, the store already booted on the new key.
        assert!([&old, &report.new_key_id].contains(&&report.old_key_id));
        drop((s, db));

        let (db, s, _) = rig.boot();
        assert_eq!(s.key_id(), report.new_key_id);
        assert_eq!(rig.sources().pending(&src).unwrap(), None);
        for i in 0..n {
            let name = format!("s{i}");
            assert_eq!(s.get(&name).unwrap().unwrap().to_vec(), value_of(i));
            assert_eq!(raw(&s, &name).key_id, report.new_key_id);
        }
        assert_eq!(&s.get("written.mid.rotation").unwrap().unwrap()[..], b"mid");
        drop(s);
        // The old key no longer opens the db.
        assert!(matches!(
            SecretStore::open(&db, old_key),
            Err(SecretError::WrongMasterKey { .. })
        ));
    }

    #[test]
    fn rotation_interrupted_at_every_step_then_rerun_ends_on_the_new_key() {
        for kr in [MemoryKeyring::unreachable(), MemoryKeyring::default()] {
            for stop in [
                StopAt::AfterRecords(0),
                StopAt::AfterRecords(2),
                StopAt::BeforeCheck,
                StopAt::BeforePromote,
                StopAt::BeforeClearPending,
            ] {
                interrupted_rotation(kr.clone(), 4, stop);
            }
        }
    }

    #[test]
    fn full_rotation_re_seals_everything_and_changes_the_source_key() {
        let rig = Rig::new(MemoryKeyring::unreachable());
        let (_db, s, src) = rig.boot();
        let (before, _) = rig.sources().load().unwrap();
        for i in 0..5 {
            s.put(&format!("k{i}"), &value_of(i), 1).unwrap();
        }
        let r = s.rotate_key(&rig.sources(), &src).unwrap();
        assert_eq!((r.reencrypted, r.resumed), (5, false));
        let (after, src2) = rig.sources().load().unwrap();
        assert_eq!(src, src2);
        assert_ne!(before, after);
        assert_eq!(after.key_id(), r.new_key_id);
        assert_eq!(s.key_id(), r.new_key_id);
        // A second rotation is a new one.
        let r2 = s.rotate_key(&rig.sources(), &src).unwrap();
        assert!(!r2.resumed);
        assert_ne!(r2.new_key_id, r.new_key_id);
        assert_eq!(s.get("k3").unwrap().unwrap().to_vec(), value_of(3));
    }

    #[test]
    fn writes_and_rotations_racing_leave_every_secret_readable_under_the_final_key() {
        let rig = Rig::new(MemoryKeyring::default());
        let (_db, s, src) = rig.boot();
        for i in 0..20 {
            s.put(&format!("pre{i}"), &value_of(i), 1).unwrap();
        }
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for i in 0..40 {
                    s.put(&format!("during{i}"), &value_of(i), 2).unwrap();
                }
            });
            for _ in 0..2 {
                scope.spawn(|| s.rotate_key(&rig.sources(), &src).unwrap());
            }
        });
        let final_id = s.key_id();
        assert_eq!(rig.sources().load().unwrap().0.key_id(), final_id);
        for (prefix, n) in [("pre", 20), ("during", 40)] {
            for i in 0..n {
                let name = format!("{prefix}{i}");
                assert_eq!(s.get(&name).unwrap().unwrap().to_vec(), value_of(i));
                assert_eq!(raw(&s, &name).key_id, final_id, "{name}");
            }
        }
    }

    #[test]
    fn reads_racing_rotations_never_fail() {
        // A read that fetched a record sealed under the old key must still find that key
        // after a rotation completes and swaps the keys.
        let rig = Rig::new(MemoryKeyring::unreachable());
        let (_db, s, src) = rig.boot();
        for i in 0..3 {
            s.put(&format!("r{i}"), &value_of(i), 1).unwrap();
        }
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        for i in 0..3 {
                            let got = s.get(&format!("r{i}"));
                            assert_eq!(got.unwrap().unwrap().to_vec(), value_of(i));
                        }
                    }
                });
            }
            for _ in 0..100 {
                s.rotate_key(&rig.sources(), &src).unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }

    #[test]
    fn rotation_refused_for_systemd_credential() {
        let t = tempfile::tempdir().unwrap();
        let creds = t.path().join("creds");
        std::fs::create_dir_all(&creds).unwrap();
        std::fs::write(creds.join("master.key"), [6u8; 32]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            creds.join("master.key"),
            std::fs::Permissions::from_mode(0o400),
        )
        .unwrap();
        let env = KeyEnv {
            state_dir: t.path().join("state"),
            key_file: None,
            credentials_dir: Some(creds),
            use_keyring: false,
        };
        let sources = KeySources::with_keyring(env, Box::new(MemoryKeyring::default()));
        let (s, src) = SecretStore::open_from(&mem_db(), &sources).unwrap();
        s.put("a", b"v", 1).unwrap();
        let err = s.rotate_key(&sources, &src).unwrap_err();
        assert!(err.to_string().contains("systemd credential"), "{err}");
        assert_eq!(&s.get("a").unwrap().unwrap()[..], b"v");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
        #[test]
        fn rotation_interrupted_after_k_of_n_then_rerun(n in 0usize..7, k in 0usize..8) {
            let k = k.min(n);
            interrupted_rotation(MemoryKeyring::unreachable(), n, StopAt::AfterRecords(k));
        }
    }

    // ---- release ----

    #[test]
    fn every_refusal_and_its_code() {
        let secrets = vec!["db.password".to_string()];
        let ok = DecisionFacts {
            allowed: true,
            dry_run: false,
            decided_at_ms: 10_000,
            worker_secrets: &secrets,
            tenant_id: "org.acme",
        };
        let bound = Caller {
            tenant: Some("org.acme"),
            is_admin: false,
            has_release_scope: true,
        };
        let now = 10_000 + 299_999;
        let ttl = 300_000;
        let name = "db.password";
        assert_eq!(check_release(name, Some(&ok), &bound, now, ttl), Ok(()));
        let admin = Caller {
            tenant: None,
            is_admin: true,
            has_release_scope: false,
        };
        assert_eq!(check_release(name, Some(&ok), &admin, now, ttl), Ok(()));

        let cases: Vec<(Result<(), Refusal>, Refusal, &str)> = vec![
            (
                check_release(
                    name,
                    Some(&ok),
                    &Caller {
                        has_release_scope: false,
                        ..bound
                    },
                    now,
                    ttl,
                ),
                Refusal::MissingScope,
                "forbidden",
            ),
            (
                check_release(name, None, &bound, now, ttl),
                Refusal::UnknownDecision,
                "unknown_decision",
            ),
            (
                check_release(
                    name,
                    Some(&DecisionFacts {
                        allowed: false,
                        ..ok
                    }),
                    &bound,
                    now,
                    ttl,
                ),
                Refusal::DecisionDenied,
                "decision_denied",
            ),
            (
                check_release(
                    name,
                    Some(&DecisionFacts {
                        dry_run: true,
                        ..ok
                    }),
                    &bound,
                    now,
                    ttl,
                ),
                Refusal::DryRun,
                "dry_run",
            ),
            (
                check_release(name, Some(&ok), &bound, now + 1, ttl),
                Refusal::DecisionExpired,
                "decision_expired",
            ),
            (
                check_release(name, Some(&ok), &bound, 9_999, ttl),
                Refusal::DecisionExpired,
                "decision_expired",
            ),
            (
                check_release("api.key", Some(&ok), &bound, now, ttl),
                Refusal::WorkerNotEntitled,
                "worker_not_entitled",
            ),
            (
                check_release(
                    name,
                    Some(&ok),
                    &Caller {
                        tenant: Some("org.other"),
                        ..bound
                    },
                    now,
                    ttl,
                ),
                Refusal::TenantMismatch,
                "tenant_mismatch",
            ),
            (
                // Unbound, not admin: strict.
                check_release(
                    name,
                    Some(&ok),
                    &Caller {
                        tenant: None,
                        ..bound
                    },
                    now,
                    ttl,
                ),
                Refusal::TenantMismatch,
                "tenant_mismatch",
            ),
            (
                check_release("../etc", Some(&ok), &bound, now, ttl),
                Refusal::UnknownSecret,
                "unknown_secret",
            ),
        ];
        for (i, (got, want, code)) in cases.into_iter().enumerate() {
            assert_eq!(got, Err(want), "case {i}");
            assert_eq!(want.code(), code);
        }
        // A tenant-bound admin token is still bound.
        let bound_admin = Caller {
            tenant: Some("org.other"),
            is_admin: true,
            has_release_scope: true,
        };
        assert_eq!(
            check_release(name, Some(&ok), &bound_admin, now, ttl),
            Err(Refusal::TenantMismatch)
        );
        // Another tenant learns nothing about the decision's state.
        let denied = DecisionFacts {
            allowed: false,
            ..ok
        };
        let other = Caller {
            tenant: Some("org.other"),
            ..bound
        };
        assert_eq!(
            check_release(name, Some(&denied), &other, now, ttl),
            Err(Refusal::TenantMismatch)
        );
    }

    #[test]
    fn release_returns_the_value_or_unknown_secret() {
        let s = SecretStore::open(&mem_db(), key(1)).unwrap();
        s.put("db.password", b"pw", 1).unwrap();
        let listed = vec!["db.password".to_string(), "missing".to_string()];
        let d = DecisionFacts {
            allowed: true,
            dry_run: false,
            decided_at_ms: 0,
            worker_secrets: &listed,
            tenant_id: "t",
        };
        let c = Caller {
            tenant: Some("t"),
            is_admin: false,
            has_release_scope: true,
        };
        assert_eq!(
            &s.release("db.password", Some(&d), &c, 1, 300_000).unwrap()[..],
            b"pw"
        );
        assert!(matches!(
            s.release("missing", Some(&d), &c, 1, 300_000),
            Err(ReleaseError::Refused(Refusal::UnknownSecret))
        ));
        assert!(matches!(
            s.release("db.password", Some(&d), &c, 300_000, 300_000),
            Err(ReleaseError::Refused(Refusal::DecisionExpired))
        ));
    }

    /// The records and the key check in the golden state dir were written by v0.1.0 (its own
    /// `bin` codec); they read back and encode again to the very same bytes, so the stored
    /// format did not move when serde_bytes took over.
    #[test]
    fn records_written_by_v0_1_0_encode_to_the_same_bytes() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/v0.1.0/db");
        let t = tempfile::tempdir().unwrap();
        for f in ["conf", "db"] {
            std::fs::copy(fixture.join(f), t.path().join(f)).unwrap();
        }
        let db = sled::open(t.path()).unwrap();
        let mut n = 0;
        for item in db.open_tree("secrets").unwrap().iter() {
            let (name, v) = item.unwrap();
            let rec: Record = rmp_serde::from_slice(&v).unwrap();
            assert!(!rec.nonce.is_empty() && !rec.ciphertext.is_empty());
            assert_eq!(
                rmp_serde::to_vec_named(&rec).unwrap(),
                v.to_vec(),
                "{name:?}"
            );
            n += 1;
        }
        assert_eq!(n, 1, "the fixture keeps one secret");
        let raw = db
            .open_tree("secrets_meta")
            .unwrap()
            .get(META_KEY)
            .unwrap()
            .unwrap();
        let kc: KeyCheck = rmp_serde::from_slice(&raw).unwrap();
        assert_eq!(rmp_serde::to_vec_named(&kc).unwrap(), raw.to_vec());

        // A fixed record, byte for byte: `bin 8` for both byte strings.
        let rec = Record {
            key_id: "k".into(),
            nonce: vec![1, 2, 3],
            ciphertext: vec![4, 5],
            created_ms: 6,
            updated_ms: 7,
            // Unowned records are written exactly as before owners existed.
            owner: None,
        };
        let bytes = rmp_serde::to_vec_named(&rec).unwrap();
        assert_eq!(
            hex::encode(&bytes),
            "85a66b65795f6964a16ba56e6f6e6365c403010203aa63697068657274657874c4020405\
             aa637265617465645f6d7306aa757064617465645f6d7307"
        );
        // The array-of-integers form (a plain `Vec<u8>`) still reads, as it did.
        #[derive(Serialize)]
        struct AsArrays {
            key_id: &'static str,
            nonce: Vec<u8>,
            ciphertext: Vec<u8>,
            created_ms: i64,
            updated_ms: i64,
        }
        let raw = rmp_serde::to_vec_named(&AsArrays {
            key_id: "k",
            nonce: vec![1, 2, 3],
            ciphertext: vec![4, 5],
            created_ms: 6,
            updated_ms: 7,
        })
        .unwrap();
        let back: Record = rmp_serde::from_slice(&raw).unwrap();
        assert_eq!((back.nonce, back.ciphertext), (vec![1, 2, 3], vec![4, 5]));
    }
}
