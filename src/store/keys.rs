//! Where the 256-bit master key comes from (SPEC section 6).
//!
//! Sources, tried in this order:
//! 1. the OS keyring (service `hall`, user = the state dir's canonical path), unless
//!    `HALL_KEYRING=off`;
//! 2. the file named by `HALL_MASTER_KEY_FILE`;
//! 3. the systemd credential `$CREDENTIALS_DIRECTORY/master.key`;
//! 4. `<state_dir>/master.key`.
//!
//! **Keys are never switched silently.** A key is generated only when no source holds one;
//! it goes to the keyring when the keyring accepts it (and reads it back), else to
//! `<state_dir>/master.key` (0600). If `HALL_MASTER_KEY_FILE` is set, the file must exist:
//! an operator who names a key file never gets a freshly generated key instead.
//!
//! Key files hold 32 raw bytes or 64 hex characters (plus an optional newline). A key file
//! that group or others may access (any of mode bits 0o077) is **refused**, like ssh does
//! for private keys, because a readable master key defeats encryption at rest. The one
//! exception is the systemd credential, whose directory systemd itself makes private to the
//! service: there only world access (0o007) is refused. Errors name the file, never its
//! contents.
//!
//! Rotation support: each source also has a *pending* slot (`<file>.next` beside a key file,
//! or the keyring user `<state dir>#next`) that holds the next key while
//! [`crate::store::secrets::SecretStore::rotate_key`] re-encrypts, so that an interrupted
//! rotation can always be resumed. A systemd credential cannot be rewritten by Hall, so
//! rotation is refused for it.
//!
//! The real keyring blocks on D-Bus; call [`KeySources::load`] before the async runtime
//! starts or inside `spawn_blocking`.

use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rand::RngCore;
use zeroize::{Zeroize, Zeroizing};

use super::{ensure_private_dir, write_private_file};

/// The keyring service name under which Hall stores its master key.
pub const KEYRING_SERVICE: &str = "hall";
/// File name of the generated key in the state dir, and of the systemd credential.
pub const MASTER_KEY_FILE_NAME: &str = "master.key";

const KEY_ID_CONTEXT: &str = "hall 2026 master key id v1";
const PENDING_SUFFIX: &str = ".next";
const KEYRING_PENDING_SUFFIX: &str = "#next";

/// The 256-bit master key. Zeroed on drop; `Debug` shows only its [`key_id`](Self::key_id).
#[derive(Clone)]
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl MasterKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut k[..]);
        MasterKey(k)
    }

    /// Wrap existing key material (e.g. read by the caller from elsewhere).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let mut b = bytes;
        let k = MasterKey(Zeroizing::new(b));
        b.zeroize();
        k
    }

    /// The raw key, for deriving sub-keys. Never log or store it.
    pub(crate) fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// A short, non-secret fingerprint (16 hex chars) that names this key in records,
    /// logs and error messages. A one-way derivation with its own context string, so it
    /// reveals nothing about the key or the keys derived from it.
    pub fn key_id(&self) -> String {
        let d = Zeroizing::new(blake3::derive_key(KEY_ID_CONTEXT, &self.0[..]));
        hex::encode(&d[..8])
    }

    fn to_hex(&self) -> Zeroizing<String> {
        // Encoded into wiped buffers sized up front: no unzeroed copy of the key is left.
        let mut digits = Zeroizing::new([0u8; 64]);
        hex::encode_to_slice(&self.0[..], &mut digits[..]).expect("two digits per byte");
        let mut s = Zeroizing::new(String::with_capacity(64));
        s.push_str(std::str::from_utf8(&digits[..]).expect("hex digits are ASCII"));
        s
    }
}

impl PartialEq for MasterKey {
    /// Constant-time comparison.
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.0[..].ct_eq(&other.0[..]).into()
    }
}
impl Eq for MasterKey {}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey(id {}, <redacted>)", self.key_id())
    }
}

/// Which source the master key came from, for the startup log line
/// (`master key: <source>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The OS keyring, service [`KEYRING_SERVICE`], under this user name.
    Keyring { user: String },
    /// The file named by `HALL_MASTER_KEY_FILE`.
    File(PathBuf),
    /// `$CREDENTIALS_DIRECTORY/master.key`.
    SystemdCredential(PathBuf),
    /// `<state_dir>/master.key` (generated on first start when nothing else holds a key).
    StateFile(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Keyring { .. } => write!(f, "keyring"),
            KeySource::File(p) => write!(f, "file {}", p.display()),
            KeySource::SystemdCredential(p) => write!(f, "systemd credential {}", p.display()),
            KeySource::StateFile(p) => write!(f, "state file {}", p.display()),
        }
    }
}

/// Why no master key could be obtained. Messages name files and sources, never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("master key file {path} is not usable: {reason}")]
    BadKeyFile { path: PathBuf, reason: String },
    #[error(
        "master key file {path} is accessible by group or others (mode {mode:04o}); \
         run `chmod 600 {path}` and make sure it is owned by the daemon's user"
    )]
    KeyFileTooOpen { path: PathBuf, mode: u32 },
    #[error("HALL_MASTER_KEY_FILE names {path}, which cannot be read: {source}")]
    MissingKeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("keyring: {0}")]
    Keyring(String),
    #[error("bad environment: {0}")]
    BadEnv(String),
    #[error("cannot rotate a master key that comes from {0}: Hall cannot rewrite it")]
    CannotRotate(String),
}

/// Why a keyring call failed (unreachable service, locked store…). Never holds a secret.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct KeyringError(pub String);

/// The OS keyring as Hall uses it: one service, entries addressed by user name.
/// A trait so tests substitute an in-memory keyring and never touch a real one.
pub trait Keyring: Send + Sync {
    /// `Ok(None)` when there is no entry; `Err` when the keyring cannot be asked.
    fn get(&self, user: &str) -> Result<Option<Zeroizing<String>>, KeyringError>;
    fn set(&self, user: &str, password: &str) -> Result<(), KeyringError>;
    /// Removing an entry that does not exist is not an error.
    fn delete(&self, user: &str) -> Result<(), KeyringError>;
}

/// The real OS keyring (keyring crate): Secret Service/keyutils, macOS Keychain, Windows.
pub struct OsKeyring;

fn keyring_err(e: keyring::Error) -> KeyringError {
    match e {
        // Drop the payloads of these two: they may carry stored bytes.
        keyring::Error::BadEncoding(mut b) => {
            b.zeroize();
            KeyringError("stored entry is not UTF-8".into())
        }
        keyring::Error::Ambiguous(v) => {
            KeyringError(format!("entry matched by {} credentials", v.len()))
        }
        other => KeyringError(other.to_string()),
    }
}

impl Keyring for OsKeyring {
    fn get(&self, user: &str) -> Result<Option<Zeroizing<String>>, KeyringError> {
        let entry = keyring::Entry::new(KEYRING_SERVICE, user).map_err(keyring_err)?;
        match entry.get_password() {
            Ok(p) => Ok(Some(Zeroizing::new(p))),
            Err(keyring::Error::NoEntry) => Ok(None),
            Err(e) => Err(keyring_err(e)),
        }
    }
    fn set(&self, user: &str, password: &str) -> Result<(), KeyringError> {
        let entry = keyring::Entry::new(KEYRING_SERVICE, user).map_err(keyring_err)?;
        entry.set_password(password).map_err(keyring_err)
    }
    fn delete(&self, user: &str) -> Result<(), KeyringError> {
        let entry = keyring::Entry::new(KEYRING_SERVICE, user).map_err(keyring_err)?;
        match entry.delete_credential() {
            Ok(()) | Err(keyring::Error::NoEntry) => Ok(()),
            Err(e) => Err(keyring_err(e)),
        }
    }
}

/// The environment that decides where the key comes from, gathered once so tests can
/// build it by hand instead of mutating the process environment.
#[derive(Debug, Clone)]
pub struct KeyEnv {
    pub state_dir: PathBuf,
    /// `HALL_MASTER_KEY_FILE`.
    pub key_file: Option<PathBuf>,
    /// `CREDENTIALS_DIRECTORY` (set by systemd when the unit has credentials).
    pub credentials_dir: Option<PathBuf>,
    /// `false` with `HALL_KEYRING=off` (headless servers, tests).
    pub use_keyring: bool,
}

impl KeyEnv {
    /// Read `HALL_MASTER_KEY_FILE`, `CREDENTIALS_DIRECTORY` and `HALL_KEYRING` (`on`/`off`,
    /// default `on`) from the process environment.
    pub fn from_process_env(state_dir: &Path) -> Result<Self, KeyError> {
        let nonempty = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let use_keyring = match std::env::var("HALL_KEYRING") {
            Err(std::env::VarError::NotPresent) => true,
            Ok(v) => match v.to_ascii_lowercase().as_str() {
                "" | "on" | "1" | "true" | "yes" => true,
                "off" | "0" | "false" | "no" => false,
                _ => {
                    return Err(KeyError::BadEnv(format!(
                        "HALL_KEYRING must be `on` or `off`, not `{v}`"
                    )))
                }
            },
            Err(e) => return Err(KeyError::BadEnv(format!("HALL_KEYRING: {e}"))),
        };
        Ok(KeyEnv {
            state_dir: state_dir.to_path_buf(),
            key_file: nonempty("HALL_MASTER_KEY_FILE"),
            credentials_dir: nonempty("CREDENTIALS_DIRECTORY"),
            use_keyring,
        })
    }
}

/// The master key's sources: an environment plus a keyring implementation.
pub struct KeySources {
    env: KeyEnv,
    keyring: Box<dyn Keyring>,
}

impl KeySources {
    /// Sources using the real OS keyring (when `env.use_keyring`).
    pub fn new(env: KeyEnv) -> Self {
        Self::with_keyring(env, Box::new(OsKeyring))
    }

    /// Sources with a substitute keyring (tests, or another secret backend).
    pub fn with_keyring(env: KeyEnv, keyring: Box<dyn Keyring>) -> Self {
        KeySources { env, keyring }
    }

    /// The keyring user name: the canonical state dir path, so two state dirs on one
    /// machine get two keys. Creates the state dir (0700) if needed.
    fn keyring_user(&self) -> Result<String, KeyError> {
        ensure_private_dir(&self.env.state_dir).map_err(|source| KeyError::Io {
            what: "cannot create state dir",
            path: self.env.state_dir.clone(),
            source,
        })?;
        let canon = fs::canonicalize(&self.env.state_dir).map_err(|source| KeyError::Io {
            what: "cannot resolve state dir",
            path: self.env.state_dir.clone(),
            source,
        })?;
        Ok(canon.to_string_lossy().into_owned())
    }

    /// Find the master key, or create one if no source holds any. See the module doc for
    /// the order and the rules.
    pub fn load(&self) -> Result<(MasterKey, KeySource), KeyError> {
        // 1. keyring. An unreachable keyring is not fatal: headless servers have none.
        let mut keyring_user = None;
        if self.env.use_keyring {
            let user = self.keyring_user()?;
            if let Ok(Some(pw)) = self.keyring.get(&user) {
                let key = parse_key_text(pw.as_bytes()).map_err(|reason| {
                    KeyError::Keyring(format!(
                        "the entry for service `{KEYRING_SERVICE}`, user `{user}` is not a \
                         master key: {reason}"
                    ))
                })?;
                return Ok((key, KeySource::Keyring { user }));
            }
            keyring_user = Some(user);
        }
        // 2. HALL_MASTER_KEY_FILE: must exist when set.
        if let Some(path) = &self.env.key_file {
            return match read_key_file(path, 0o077) {
                Ok(k) => Ok((k, KeySource::File(path.clone()))),
                Err(KeyError::Io { source, .. }) => Err(KeyError::MissingKeyFile {
                    path: path.clone(),
                    source,
                }),
                Err(e) => Err(e),
            };
        }
        // 3. systemd credential, if the unit provides one by that name.
        if let Some(dir) = &self.env.credentials_dir {
            let path = dir.join(MASTER_KEY_FILE_NAME);
            if path.exists() {
                let k = read_key_file(&path, 0o007)?;
                return Ok((k, KeySource::SystemdCredential(path)));
            }
        }
        // 4. an existing state file.
        let state_file = self.env.state_dir.join(MASTER_KEY_FILE_NAME);
        if state_file.exists() {
            let k = read_key_file(&state_file, 0o077)?;
            return Ok((k, KeySource::StateFile(state_file)));
        }
        // Nothing anywhere: generate, in the keyring if it takes the key.
        let key = MasterKey::generate();
        if let Some(user) = keyring_user {
            if self.keyring_store_verified(&user, &key).is_ok() {
                return Ok((key, KeySource::Keyring { user }));
            }
        }
        ensure_private_dir(&self.env.state_dir).map_err(|source| KeyError::Io {
            what: "cannot create state dir",
            path: self.env.state_dir.clone(),
            source,
        })?;
        write_key_file(&state_file, &key)?;
        Ok((key, KeySource::StateFile(state_file)))
    }

    /// Set a keyring entry and read it back; a keyring that accepts writes it cannot
    /// return (seen on half-working sessions) must not hold our only key.
    fn keyring_store_verified(&self, user: &str, key: &MasterKey) -> Result<(), KeyError> {
        let hex = key.to_hex();
        self.keyring
            .set(user, &hex)
            .map_err(|e| KeyError::Keyring(e.0))?;
        match self.keyring.get(user) {
            Ok(Some(back)) if back.as_bytes() == hex.as_bytes() => Ok(()),
            _ => {
                let _ = self.keyring.delete(user);
                Err(KeyError::Keyring(
                    "the keyring accepted the key but did not return it".into(),
                ))
            }
        }
    }

    /// The pending (next) key of an interrupted or ongoing rotation, if any.
    pub fn pending(&self, source: &KeySource) -> Result<Option<MasterKey>, KeyError> {
        match source {
            KeySource::Keyring { user } => {
                let user = format!("{user}{KEYRING_PENDING_SUFFIX}");
                match self.keyring.get(&user) {
                    Ok(Some(pw)) => parse_key_text(pw.as_bytes()).map(Some).map_err(|reason| {
                        KeyError::Keyring(format!("the pending entry `{user}` is bad: {reason}"))
                    }),
                    Ok(None) => Ok(None),
                    // Not knowing whether a pending key exists is fatal: records may be
                    // encrypted under it.
                    Err(e) => Err(KeyError::Keyring(format!(
                        "cannot read pending entry `{user}`: {e}"
                    ))),
                }
            }
            KeySource::File(p) | KeySource::StateFile(p) => {
                let pending = pending_path(p);
                if pending.exists() {
                    read_key_file(&pending, 0o077).map(Some)
                } else {
                    Ok(None)
                }
            }
            KeySource::SystemdCredential(_) => Ok(None),
        }
    }

    /// Durably record `key` as the pending key of `source` (first step of a rotation).
    pub fn store_pending(&self, source: &KeySource, key: &MasterKey) -> Result<(), KeyError> {
        match source {
            KeySource::Keyring { user } => {
                self.keyring_store_verified(&format!("{user}{KEYRING_PENDING_SUFFIX}"), key)
            }
            KeySource::File(p) | KeySource::StateFile(p) => write_key_file(&pending_path(p), key),
            KeySource::SystemdCredential(_) => Err(KeyError::CannotRotate(source.to_string())),
        }
    }

    /// Make `key` the current key of `source` (last step of a rotation). The pending slot is
    /// removed by [`clear_pending`](Self::clear_pending) afterwards.
    pub fn promote(&self, source: &KeySource, key: &MasterKey) -> Result<(), KeyError> {
        match source {
            KeySource::Keyring { user } => self.keyring_store_verified(user, key),
            KeySource::File(p) | KeySource::StateFile(p) => write_key_file(p, key),
            KeySource::SystemdCredential(_) => Err(KeyError::CannotRotate(source.to_string())),
        }
    }

    /// Remove the pending slot of `source` (after promotion).
    pub fn clear_pending(&self, source: &KeySource) -> Result<(), KeyError> {
        match source {
            KeySource::Keyring { user } => self
                .keyring
                .delete(&format!("{user}{KEYRING_PENDING_SUFFIX}"))
                .map_err(|e| KeyError::Keyring(e.0)),
            KeySource::File(p) | KeySource::StateFile(p) => {
                let pending = pending_path(p);
                match fs::remove_file(&pending) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(source) => Err(KeyError::Io {
                        what: "cannot remove pending key file",
                        path: pending,
                        source,
                    }),
                }
            }
            KeySource::SystemdCredential(_) => Ok(()),
        }
    }
}

fn pending_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_os_string();
    s.push(PENDING_SUFFIX);
    PathBuf::from(s)
}

fn write_key_file(path: &Path, key: &MasterKey) -> Result<(), KeyError> {
    // Sized for the newline up front: pushing onto a full Vec reallocates and leaves an
    // unwiped copy of the key in freed memory.
    let hex = key.to_hex();
    let mut text = Zeroizing::new(Vec::with_capacity(hex.len() + 1));
    text.extend_from_slice(hex.as_bytes());
    text.push(b'\n');
    write_private_file(path, &text).map_err(|source| KeyError::Io {
        what: "cannot write master key file",
        path: path.to_path_buf(),
        source,
    })
}

/// Read and parse a key file, refusing it if any of `forbidden_mode` bits are set.
fn read_key_file(path: &Path, forbidden_mode: u32) -> Result<MasterKey, KeyError> {
    let io = |source| KeyError::Io {
        what: "cannot read master key file",
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::File::open(path).map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    let bad = |reason: String| KeyError::BadKeyFile {
        path: path.to_path_buf(),
        reason,
    };
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & forbidden_mode != 0 {
        return Err(KeyError::KeyFileTooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    // Never read more than the longest valid form (65 bytes) + 1 to detect "too long".
    let mut buf = Zeroizing::new(Vec::with_capacity(66));
    (&mut f).take(66).read_to_end(&mut buf).map_err(io)?;
    parse_key_file(&buf).map_err(bad)
}

/// 32 raw bytes, or 64 hex characters with an optional trailing newline.
fn parse_key_file(buf: &[u8]) -> Result<MasterKey, String> {
    if buf.len() == 32 {
        // Straight into the wiped buffer: a plain array passed by value leaves a copy here.
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(buf);
        return Ok(MasterKey(key));
    }
    parse_key_text(buf)
}

fn parse_key_text(buf: &[u8]) -> Result<MasterKey, String> {
    let text = buf.strip_suffix(b"\n").unwrap_or(buf);
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    let shape = || {
        format!(
            "expected 32 raw bytes or 64 hex characters (optionally followed by a newline), \
             found {}{} bytes",
            buf.len(),
            if buf.len() >= 66 { " or more" } else { "" }
        )
    };
    if text.len() != 64 {
        return Err(shape());
    }
    // Decoded straight into the wiped buffer.
    let mut key = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text, &mut key[..])
        .map_err(|_| "64 characters, but not all hex digits".to_string())?;
    Ok(MasterKey(key))
}

/// An in-memory keyring for tests, with switches to make it unreachable.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    #[derive(Default, Clone)]
    pub(crate) struct MemoryKeyring {
        pub entries: Arc<Mutex<HashMap<String, String>>>,
        /// `get` fails as a headless machine's keyring does.
        pub get_fails: Arc<Mutex<bool>>,
        /// `set` fails (no Secret Service).
        pub set_fails: Arc<Mutex<bool>>,
    }

    impl MemoryKeyring {
        pub fn unreachable() -> Self {
            let k = Self::default();
            *k.get_fails.lock().unwrap() = true;
            *k.set_fails.lock().unwrap() = true;
            k
        }
    }

    impl Keyring for MemoryKeyring {
        fn get(&self, user: &str) -> Result<Option<Zeroizing<String>>, KeyringError> {
            if *self.get_fails.lock().unwrap() {
                return Err(KeyringError("no secret service provider".into()));
            }
            Ok(self
                .entries
                .lock()
                .unwrap()
                .get(user)
                .map(|s| Zeroizing::new(s.clone())))
        }
        fn set(&self, user: &str, password: &str) -> Result<(), KeyringError> {
            if *self.set_fails.lock().unwrap() {
                return Err(KeyringError("no secret service provider".into()));
            }
            self.entries
                .lock()
                .unwrap()
                .insert(user.to_string(), password.to_string());
            Ok(())
        }
        fn delete(&self, user: &str) -> Result<(), KeyringError> {
            if *self.set_fails.lock().unwrap() {
                return Err(KeyringError("no secret service provider".into()));
            }
            self.entries.lock().unwrap().remove(user);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::MemoryKeyring;
    use super::*;

    fn env(dir: &Path) -> KeyEnv {
        KeyEnv {
            state_dir: dir.join("state"),
            key_file: None,
            credentials_dir: None,
            use_keyring: true,
        }
    }

    fn sources(env: KeyEnv, kr: &MemoryKeyring) -> KeySources {
        KeySources::with_keyring(env, Box::new(kr.clone()))
    }

    fn write_mode(path: &Path, contents: &[u8], mode: u32) {
        fs::write(path, contents).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn user_of(e: &KeyEnv) -> String {
        fs::canonicalize(&e.state_dir)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn keyring_hit_wins_over_every_file() {
        let t = tempfile::tempdir().unwrap();
        let mut e = env(t.path());
        fs::create_dir_all(&e.state_dir).unwrap();
        let file = t.path().join("env.key");
        write_mode(&file, &[7u8; 32], 0o600);
        e.key_file = Some(file);
        let kr = MemoryKeyring::default();
        let k = MasterKey::from_bytes([9u8; 32]);
        kr.set(&user_of(&e), &k.to_hex()).unwrap();
        let (got, src) = sources(e.clone(), &kr).load().unwrap();
        assert_eq!(got, k);
        assert_eq!(src, KeySource::Keyring { user: user_of(&e) });
        assert_eq!(src.to_string(), "keyring");
    }

    #[test]
    fn keyring_miss_uses_env_file_and_does_not_create_a_keyring_key() {
        let t = tempfile::tempdir().unwrap();
        let mut e = env(t.path());
        let file = t.path().join("env.key");
        let hex = format!("{}\n", "ab".repeat(32));
        write_mode(&file, hex.as_bytes(), 0o600);
        e.key_file = Some(file.clone());
        let kr = MemoryKeyring::default();
        let (got, src) = sources(e, &kr).load().unwrap();
        assert_eq!(got, MasterKey::from_bytes([0xab; 32]));
        assert_eq!(src.to_string(), format!("file {}", file.display()));
        assert!(kr.entries.lock().unwrap().is_empty(), "no silent new key");
    }

    #[test]
    fn env_file_beats_systemd_credential_which_beats_state_file() {
        let t = tempfile::tempdir().unwrap();
        let mut e = env(t.path());
        fs::create_dir_all(&e.state_dir).unwrap();
        let creds = t.path().join("creds");
        fs::create_dir_all(&creds).unwrap();
        write_mode(&creds.join("master.key"), &[2u8; 32], 0o400);
        write_mode(&e.state_dir.join("master.key"), &[3u8; 32], 0o600);
        e.credentials_dir = Some(creds.clone());
        let kr = MemoryKeyring::unreachable();

        let (got, src) = sources(e.clone(), &kr).load().unwrap();
        assert_eq!(got, MasterKey::from_bytes([2u8; 32]));
        assert_eq!(
            src.to_string(),
            format!("systemd credential {}", creds.join("master.key").display())
        );

        let file = t.path().join("env.key");
        write_mode(&file, &[1u8; 32], 0o600);
        e.key_file = Some(file);
        let (got, src) = sources(e.clone(), &kr).load().unwrap();
        assert_eq!(got, MasterKey::from_bytes([1u8; 32]));
        assert!(matches!(src, KeySource::File(_)));

        e.key_file = None;
        e.credentials_dir = Some(t.path().join("no-such-creds"));
        let (got, src) = sources(e, &kr).load().unwrap();
        assert_eq!(got, MasterKey::from_bytes([3u8; 32]));
        assert!(matches!(src, KeySource::StateFile(_)));
    }

    #[test]
    fn generates_in_keyring_when_reachable_and_reuses_it() {
        let t = tempfile::tempdir().unwrap();
        let e = env(t.path());
        let kr = MemoryKeyring::default();
        let (k1, s1) = sources(e.clone(), &kr).load().unwrap();
        assert!(matches!(s1, KeySource::Keyring { .. }));
        assert!(!e.state_dir.join("master.key").exists());
        let (k2, s2) = sources(e, &kr).load().unwrap();
        assert_eq!(k1, k2);
        assert_eq!(s1, s2);
    }

    #[test]
    fn unreachable_keyring_generates_a_0600_state_file_and_reuses_it() {
        let t = tempfile::tempdir().unwrap();
        let e = env(t.path());
        let kr = MemoryKeyring::unreachable();
        let (k1, s1) = sources(e.clone(), &kr).load().unwrap();
        let path = e.state_dir.join("master.key");
        assert_eq!(s1, KeySource::StateFile(path.clone()));
        assert_eq!(s1.to_string(), format!("state file {}", path.display()));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(&e.state_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let (k2, s2) = sources(e.clone(), &kr).load().unwrap();
        assert_eq!(k1, k2);
        assert_eq!(s1, s2);
        // And a keyring that later becomes reachable but is empty does not take over.
        let kr2 = MemoryKeyring::default();
        let (k3, s3) = sources(e, &kr2).load().unwrap();
        assert_eq!(k1, k3);
        assert_eq!(s1, s3);
        assert!(kr2.entries.lock().unwrap().is_empty());
    }

    #[test]
    fn keyring_that_loses_writes_is_not_trusted() {
        struct BlackHole;
        impl Keyring for BlackHole {
            fn get(&self, _: &str) -> Result<Option<Zeroizing<String>>, KeyringError> {
                Ok(None)
            }
            fn set(&self, _: &str, _: &str) -> Result<(), KeyringError> {
                Ok(())
            }
            fn delete(&self, _: &str) -> Result<(), KeyringError> {
                Ok(())
            }
        }
        let t = tempfile::tempdir().unwrap();
        let e = env(t.path());
        let (_, src) = KeySources::with_keyring(e, Box::new(BlackHole))
            .load()
            .unwrap();
        assert!(matches!(src, KeySource::StateFile(_)));
    }

    #[test]
    fn keyring_off_never_calls_the_keyring() {
        let t = tempfile::tempdir().unwrap();
        let mut e = env(t.path());
        e.use_keyring = false;
        let kr = MemoryKeyring::default();
        kr.set(&e.state_dir.to_string_lossy(), &"cd".repeat(32))
            .unwrap();
        let (_, src) = sources(e, &kr).load().unwrap();
        assert!(matches!(src, KeySource::StateFile(_)));
        assert_eq!(kr.entries.lock().unwrap().len(), 1);
    }

    #[test]
    fn missing_env_file_is_an_error_not_a_new_key() {
        let t = tempfile::tempdir().unwrap();
        let mut e = env(t.path());
        let file = t.path().join("missing.key");
        e.key_file = Some(file.clone());
        let err = sources(e.clone(), &MemoryKeyring::unreachable())
            .load()
            .unwrap_err();
        assert!(matches!(err, KeyError::MissingKeyFile { .. }), "{err}");
        assert!(err.to_string().contains(&file.display().to_string()));
        assert!(!e.state_dir.join("master.key").exists());
    }

    #[test]
    fn bad_key_files_are_refused_with_the_path_and_without_the_contents() {
        let t = tempfile::tempdir().unwrap();
        let kr = MemoryKeyring::unreachable();
        let cases: &[(&[u8], u32, &str)] = &[
            (b"SECRETSECRET", 0o600, "found 12 bytes"),
            (&[b'z'; 64], 0o600, "not all hex"),
            (&[b'a'; 200], 0o600, "or more"),
            (&[0u8; 33], 0o600, "found 33 bytes"),
            (&[5u8; 32], 0o640, "chmod 600"),
            (&[5u8; 32], 0o604, "chmod 600"),
        ];
        for (i, (contents, mode, needle)) in cases.iter().enumerate() {
            let mut e = env(t.path());
            let file = t.path().join(format!("bad{i}.key"));
            write_mode(&file, contents, *mode);
            e.key_file = Some(file.clone());
            let msg = sources(e, &kr).load().unwrap_err().to_string();
            assert!(msg.contains(needle), "case {i}: {msg}");
            assert!(msg.contains(&file.display().to_string()), "case {i}: {msg}");
            assert!(!msg.contains("SECRET"), "case {i}: {msg}");
        }
        // A hex key with CRLF is accepted.
        let mut e = env(t.path());
        let file = t.path().join("crlf.key");
        write_mode(&file, format!("{}\r\n", "0F".repeat(32)).as_bytes(), 0o400);
        e.key_file = Some(file);
        let (k, _) = sources(e, &kr).load().unwrap();
        assert_eq!(k, MasterKey::from_bytes([0x0f; 32]));
    }

    #[test]
    fn systemd_credential_may_be_group_readable_but_not_world_readable() {
        let t = tempfile::tempdir().unwrap();
        let mut e = env(t.path());
        let creds = t.path().join("creds");
        fs::create_dir_all(&creds).unwrap();
        let p = creds.join("master.key");
        write_mode(&p, &[4u8; 32], 0o440);
        e.credentials_dir = Some(creds);
        let kr = MemoryKeyring::unreachable();
        assert!(sources(e.clone(), &kr).load().is_ok());
        fs::set_permissions(&p, fs::Permissions::from_mode(0o444)).unwrap();
        let err = sources(e, &kr).load().unwrap_err();
        assert!(matches!(err, KeyError::KeyFileTooOpen { .. }), "{err}");
    }

    #[test]
    fn bad_keyring_entry_is_an_error_not_replaced() {
        let t = tempfile::tempdir().unwrap();
        let e = env(t.path());
        fs::create_dir_all(&e.state_dir).unwrap();
        let kr = MemoryKeyring::default();
        kr.set(&user_of(&e), "not a key").unwrap();
        let err = sources(e.clone(), &kr).load().unwrap_err();
        assert!(matches!(err, KeyError::Keyring(_)), "{err}");
        assert!(!err.to_string().contains("not a key"));
        assert_eq!(
            kr.entries.lock().unwrap().get(&user_of(&e)).unwrap(),
            "not a key"
        );
    }

    #[test]
    fn debug_and_key_id_do_not_reveal_the_key() {
        let k = MasterKey::from_bytes([0x42; 32]);
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(&"42".repeat(8)), "{dbg}");
        assert!(dbg.contains(&k.key_id()));
        assert_eq!(k.key_id().len(), 16);
        assert_ne!(k.key_id(), MasterKey::from_bytes([0x43; 32]).key_id());
        assert!(!hex::encode([0x42; 32]).contains(&k.key_id()));
    }

    #[test]
    fn pending_slot_round_trip_for_files_and_keyring() {
        let t = tempfile::tempdir().unwrap();
        let e = env(t.path());
        for kr in [MemoryKeyring::default(), MemoryKeyring::unreachable()] {
            let s = sources(e.clone(), &kr);
            let (cur, src) = s.load().unwrap();
            assert_eq!(s.pending(&src).unwrap(), None);
            let next = MasterKey::generate();
            s.store_pending(&src, &next).unwrap();
            assert_eq!(s.pending(&src).unwrap(), Some(next.clone()));
            assert_eq!(s.load().unwrap().0, cur);
            s.promote(&src, &next).unwrap();
            s.clear_pending(&src).unwrap();
            assert_eq!(s.pending(&src).unwrap(), None);
            assert_eq!(s.load().unwrap(), (next, src));
        }
        let creds = KeySource::SystemdCredential(t.path().join("c"));
        let s = sources(e, &MemoryKeyring::default());
        assert!(matches!(
            s.store_pending(&creds, &MasterKey::generate()),
            Err(KeyError::CannotRotate(_))
        ));
    }
}
