//! What one audit record is, how it is encoded in sled, and how it looks as JSON.
//!
//! Stored value of record `seq` (key: `seq` as big-endian u64):
//!
//! ```text
//! prev_hash (32 bytes) ‖ body ‖ hash (32 bytes)
//! hash = blake3(prev_hash ‖ body)
//! body = MessagePack array [format version, seq, entry]
//! ```
//!
//! Keeping `prev_hash` in front of the body means the hash input is literally the first
//! `len - 32` bytes of the value: verifying a record is one blake3 call and two compares.
//!
//! Every body names its format version, and every version ever written stays readable
//! (docs/audit-format.md says how to add a field; the golden tests below and in
//! `tests/golden_audit.rs` say whether a change kept that promise):
//!
//! - **1** (v0.1.0): `entry` = all 19 fields of [`AuditEntry`] in order, `kind` as its name,
//!   ids and versions as text. Read only.
//! - **2** (written now): `entry` = `[ts_ms, kind code, …]` in [`StoredEntry`] order, with the
//!   empty fields at the end left out and every field after `kind` defaulting when absent;
//!   a decision id that is a UUID is stored as its 16 bytes, a `blake3:<hex>` policy version
//!   as its 32 bytes and a `tok_<hex>` token id as its 6 bytes (anything else as text). A
//!   typical route decision is about a quarter smaller than in version 1.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Version of the body encoding this release writes, stored first in every body so that
/// every earlier version stays readable.
pub(crate) const FORMAT_VERSION: u8 = 2;
/// Length of a blake3 hash.
pub(crate) const HASH_LEN: usize = 32;

/// A blake3 hash. Shown (JSON, logs) as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Hash32(pub [u8; HASH_LEN]);

impl Hash32 {
    /// The `prev_hash` of the very first record: 32 zero bytes.
    pub const ZERO: Hash32 = Hash32([0; HASH_LEN]);

    /// Lowercase hex, as the API shows it.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }

    /// Parse 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Hash32> {
        let mut out = [0u8; HASH_LEN];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Hash32(out))
    }

    pub(crate) fn from_slice(s: &[u8]) -> Option<Hash32> {
        <[u8; HASH_LEN]>::try_from(s).ok().map(Hash32)
    }
}

impl fmt::Display for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; HASH_LEN * 2];
        hex::encode_to_slice(self.0, &mut buf).map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash32({self})")
    }
}

impl Serialize for Hash32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Hash32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Hash32::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("expected a hash of 64 hex digits"))
    }
}

/// When `append` may return, relative to the disk (`audit.durability` in hall.toml).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Return only after the record is flushed to disk: a client never receives a decision
    /// that a crash could erase. Concurrent appends share one flush (group commit).
    #[default]
    Durable,
    /// Return once the record is chained and inserted in sled's memory; the writer flushes at
    /// least every `AuditConfig::batch_interval`. **Loss window:** a crash (kill -9, power loss)
    /// can lose the records answered during the last `batch_interval` (plus the time one flush
    /// takes). What survives is still a valid chain: `verify` passes after the crash.
    Batched,
}

impl FromStr for Durability {
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

/// What happened, in the user's words. Serialized snake_case (`"token_issue"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// A `/api/route` decision: allowed, denied or dry run.
    Decision,
    /// A policy reload, successful or not (`detail` holds the errors).
    Reload,
    /// An API token was issued (`token_id`, `detail` = the token's name; never the token).
    TokenIssue,
    /// An API token was revoked.
    TokenRevoke,
    /// A secret was stored (`detail` = the secret's name; never the value).
    SecretStore,
    /// A secret was deleted.
    SecretDelete,
    /// A secret was released for a decision (`decision_id`).
    SecretRelease,
    /// A release was refused (`detail` = the refusal code).
    SecretRefusal,
    /// The master key was rotated (`detail` = old and new key ids). Added after the first
    /// release: older logs never hold it.
    KeyRotate,
    // Approvals (SPEC 3.1). Each names the token and the request (tenant, capability, env,
    // label, rule, worker); `detail` holds `approval_id=…`, the digest and the note.
    // Added after the first release: older logs never hold them.
    /// An approval was opened by a `require_approval` decision.
    ApprovalOpened,
    /// An approver said yes but more distinct approvers are needed.
    ApprovalVoted,
    /// It became approved (last approver, or the veto window passed).
    ApprovalApproved,
    /// An approver denied (or vetoed) it.
    ApprovalDenied,
    /// Its ttl (or, once approved, its redemption window) passed.
    ApprovalExpired,
    /// The opener cancelled it.
    ApprovalCancelled,
    /// A redemption was allowed (single use: it is now used).
    ApprovalUsed,
}

impl RecordKind {
    /// The kind's code in a stored record (format 2). A new kind takes the next free code;
    /// a code is never reused or renumbered.
    fn code(self) -> u8 {
        match self {
            RecordKind::Decision => 0,
            RecordKind::Reload => 1,
            RecordKind::TokenIssue => 2,
            RecordKind::TokenRevoke => 3,
            RecordKind::SecretStore => 4,
            RecordKind::SecretDelete => 5,
            RecordKind::SecretRelease => 6,
            RecordKind::SecretRefusal => 7,
            RecordKind::KeyRotate => 8,
            RecordKind::ApprovalOpened => 9,
            RecordKind::ApprovalVoted => 10,
            RecordKind::ApprovalApproved => 11,
            RecordKind::ApprovalDenied => 12,
            RecordKind::ApprovalExpired => 13,
            RecordKind::ApprovalCancelled => 14,
            RecordKind::ApprovalUsed => 15,
        }
    }

    fn from_code(code: u8) -> Option<RecordKind> {
        Some(match code {
            0 => RecordKind::Decision,
            1 => RecordKind::Reload,
            2 => RecordKind::TokenIssue,
            3 => RecordKind::TokenRevoke,
            4 => RecordKind::SecretStore,
            5 => RecordKind::SecretDelete,
            6 => RecordKind::SecretRelease,
            7 => RecordKind::SecretRefusal,
            8 => RecordKind::KeyRotate,
            9 => RecordKind::ApprovalOpened,
            10 => RecordKind::ApprovalVoted,
            11 => RecordKind::ApprovalApproved,
            12 => RecordKind::ApprovalDenied,
            13 => RecordKind::ApprovalExpired,
            14 => RecordKind::ApprovalCancelled,
            15 => RecordKind::ApprovalUsed,
            _ => return None,
        })
    }
}

/// What a caller hands to `AuditLog::append`: everything but `seq`, `prev_hash` and `hash`,
/// which the writer assigns.
///
/// Build one with struct update syntax:
/// `AuditEntry { tenant_id: Some(t), ..AuditEntry::new(RecordKind::Decision, now_ms) }`.
///
/// The writer keeps the log time-ordered: if `ts_ms` is older than the previous record's
/// (clock stepped back, or two requests raced to the writer), it is raised to that time.
/// Adding a field: see docs/audit-format.md (the stored form is [`StoredEntry`]; the
/// compiler points at every place that must name the new field).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    /// When it happened, milliseconds since the Unix epoch (UTC).
    pub ts_ms: i64,
    pub kind: RecordKind,
    pub decision_id: Option<String>,
    pub tenant_id: Option<String>,
    pub capability_id: Option<String>,
    pub env: Option<String>,
    pub data_label: Option<String>,
    /// The decision's outcome; `None` for non-decision kinds.
    pub allowed: Option<bool>,
    pub dry_run: bool,
    pub worker_id: Option<String>,
    pub deny_reason: Option<String>,
    pub rule_id: Option<String>,
    pub policy_version: Option<String>,
    pub correlation_id: Option<String>,
    /// The request's `context` object as compact JSON text (`serde_json::to_string` of the
    /// parsed value). Shown as a JSON object in JSON output.
    pub context: Option<String>,
    pub tenant_risk: Option<String>,
    pub qos_class: Option<String>,
    /// The id of the token that made the request (never the token itself).
    pub token_id: Option<String>,
    /// For non-decision kinds: reload errors, token name, secret name, refusal code.
    pub detail: Option<String>,
}

impl AuditEntry {
    /// An entry of `kind` at `ts_ms` with every optional field empty.
    pub fn new(kind: RecordKind, ts_ms: i64) -> AuditEntry {
        AuditEntry {
            ts_ms,
            kind,
            decision_id: None,
            tenant_id: None,
            capability_id: None,
            env: None,
            data_label: None,
            allowed: None,
            dry_run: false,
            worker_id: None,
            deny_reason: None,
            rule_id: None,
            policy_version: None,
            correlation_id: None,
            context: None,
            tenant_risk: None,
            qos_class: None,
            token_id: None,
            detail: None,
        }
    }
}

/// One record as stored: the entry plus its place in the chain.
///
/// Its JSON form (API, export) is flat: `seq`, `time` (RFC 3339 UTC with milliseconds),
/// every entry field (`context` as a JSON object), `prev_hash`, `hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: u64,
    pub entry: AuditEntry,
    pub prev_hash: Hash32,
    pub hash: Hash32,
}

impl AuditRecord {
    /// `ts_ms` as RFC 3339 UTC with milliseconds, e.g. `2026-11-23T09:30:00.123Z`;
    /// `None` if the timestamp is outside what a calendar date can show.
    pub fn time(&self) -> Option<String> {
        format_time(self.entry.ts_ms)
    }
}

pub(crate) use crate::clock::rfc3339_ms as format_time;

/// Flat JSON view used to serialize a record.
#[derive(Serialize)]
struct RecordJsonOut<'a> {
    seq: u64,
    time: Option<String>,
    ts_ms: i64,
    kind: RecordKind,
    decision_id: &'a Option<String>,
    tenant_id: &'a Option<String>,
    capability_id: &'a Option<String>,
    env: &'a Option<String>,
    data_label: &'a Option<String>,
    allowed: Option<bool>,
    dry_run: bool,
    worker_id: &'a Option<String>,
    deny_reason: &'a Option<String>,
    rule_id: &'a Option<String>,
    policy_version: &'a Option<String>,
    correlation_id: &'a Option<String>,
    context: Option<Box<serde_json::value::RawValue>>,
    tenant_risk: &'a Option<String>,
    qos_class: &'a Option<String>,
    token_id: &'a Option<String>,
    detail: &'a Option<String>,
    prev_hash: Hash32,
    hash: Hash32,
}

impl Serialize for AuditRecord {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = &self.entry;
        // Stored context is the JSON text the client sent, byte for byte; show it as the
        // object it is, without re-parsing numbers (a big integer or 1e999 stays as sent).
        // Text that is somehow not JSON is shown as a JSON string rather than dropped.
        let context = e.context.as_deref().map(|text| {
            serde_json::value::RawValue::from_string(text.to_string()).unwrap_or_else(|_| {
                serde_json::value::to_raw_value(text).expect("a string serializes")
            })
        });
        RecordJsonOut {
            seq: self.seq,
            time: format_time(e.ts_ms),
            ts_ms: e.ts_ms,
            kind: e.kind,
            decision_id: &e.decision_id,
            tenant_id: &e.tenant_id,
            capability_id: &e.capability_id,
            env: &e.env,
            data_label: &e.data_label,
            allowed: e.allowed,
            dry_run: e.dry_run,
            worker_id: &e.worker_id,
            deny_reason: &e.deny_reason,
            rule_id: &e.rule_id,
            policy_version: &e.policy_version,
            correlation_id: &e.correlation_id,
            context,
            tenant_risk: &e.tenant_risk,
            qos_class: &e.qos_class,
            token_id: &e.token_id,
            detail: &e.detail,
            prev_hash: self.prev_hash,
            hash: self.hash,
        }
        .serialize(s)
    }
}

/// Flat JSON view used to read a record back (e.g. from an export). `time` is derived from
/// `ts_ms` and ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordJsonIn {
    seq: u64,
    #[serde(default, rename = "time")]
    _time: Option<String>,
    ts_ms: i64,
    kind: RecordKind,
    decision_id: Option<String>,
    tenant_id: Option<String>,
    capability_id: Option<String>,
    env: Option<String>,
    data_label: Option<String>,
    allowed: Option<bool>,
    dry_run: bool,
    worker_id: Option<String>,
    deny_reason: Option<String>,
    rule_id: Option<String>,
    policy_version: Option<String>,
    correlation_id: Option<String>,
    context: Option<Box<serde_json::value::RawValue>>,
    tenant_risk: Option<String>,
    qos_class: Option<String>,
    token_id: Option<String>,
    detail: Option<String>,
    prev_hash: Hash32,
    hash: Hash32,
}

impl<'de> Deserialize<'de> for AuditRecord {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = RecordJsonIn::deserialize(d)?;
        // The inverse of the JSON view: an object's exact text, or the string that stood in
        // for text that was not JSON.
        let context = r.context.map(|raw| {
            serde_json::from_str::<String>(raw.get()).unwrap_or_else(|_| raw.get().to_string())
        });
        Ok(AuditRecord {
            seq: r.seq,
            entry: AuditEntry {
                ts_ms: r.ts_ms,
                kind: r.kind,
                decision_id: r.decision_id,
                tenant_id: r.tenant_id,
                capability_id: r.capability_id,
                env: r.env,
                data_label: r.data_label,
                allowed: r.allowed,
                dry_run: r.dry_run,
                worker_id: r.worker_id,
                deny_reason: r.deny_reason,
                rule_id: r.rule_id,
                policy_version: r.policy_version,
                correlation_id: r.correlation_id,
                context,
                tenant_risk: r.tenant_risk,
                qos_class: r.qos_class,
                token_id: r.token_id,
                detail: r.detail,
            },
            prev_hash: r.prev_hash,
            hash: r.hash,
        })
    }
}

/// The most records a log can hold: a decision id has 40 bits for its seq.
pub(crate) const MAX_SEQ: u64 = (1 << 40) - 1;

/// The id of the decision recorded at `seq`: a UUIDv7 (RFC 9562) whose 48-bit time is
/// `ts_ms`, with the seq in the top 40 bits of `rand_b` and 34 random bits (`rand_a` and the
/// rest of `rand_b`). Time-ordered like any v7 id; a lookup by id is one read of record `seq`
/// (no index to write per decision), which must then name this exact id, so a forged or
/// altered id finds nothing.
///
/// The seq is masked with `keyed_hash(key, ts_ms)`, `key` being a random per-log secret:
/// otherwise a client could read the log's size, and so other tenants' traffic, off its ids.
pub(crate) fn decision_uuid(key: &[u8; 32], ts_ms: i64, seq: u64, random: u64) -> uuid::Uuid {
    let ts = (ts_ms.max(0) as u128) & ((1 << 48) - 1);
    let rand_a = u128::from(random >> 22) & 0xfff;
    let hidden = (seq ^ seq_mask(key, ts as u64)) & MAX_SEQ;
    let rand_b = (u128::from(hidden) << 22) | (u128::from(random) & 0x3f_ffff);
    uuid::Uuid::from_u128((ts << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b)
}

/// The seq a decision id made by [`decision_uuid`] with `key` points at (`None`: not a v7 id).
pub(crate) fn seq_of_decision_id(key: &[u8; 32], id: &str) -> Option<u64> {
    let u = uuid::Uuid::try_parse(id).ok()?;
    if u.get_version_num() != 7 {
        return None;
    }
    let v = u.as_u128();
    let hidden = ((v & ((1 << 62) - 1)) >> 22) as u64;
    Some((hidden ^ seq_mask(key, (v >> 80) as u64)) & MAX_SEQ)
}

fn seq_mask(key: &[u8; 32], ts: u64) -> u64 {
    let h = blake3::keyed_hash(key, &ts.to_be_bytes());
    u64::from_be_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) & MAX_SEQ
}

/// Encode record `seq` into `buf` (cleared first) as `prev ‖ body ‖ hash`; returns the hash.
pub(crate) fn encode_value(
    buf: &mut Vec<u8>,
    prev: &Hash32,
    seq: u64,
    entry: &AuditEntry,
) -> Result<Hash32, rmp::encode::ValueWriteError> {
    buf.clear();
    buf.extend_from_slice(&prev.0);
    write_body(buf, seq, entry)?;
    let hash = blake3::hash(buf);
    buf.extend_from_slice(hash.as_bytes());
    Ok(Hash32(*hash.as_bytes()))
}

/// Format 2's body, `[FORMAT_VERSION, seq, [ts_ms, kind, fields…]]`, leaving off the empty
/// fields at the end. Written with the MessagePack calls rmp-serde would make for
/// `(FORMAT_VERSION, seq, entry)` (so the bytes are the same: the golden tests and
/// `the_writer_makes_the_bytes_serde_makes` hold it to that), without serde's machinery: this
/// runs for every decision, under the chain lock.
fn write_body(
    buf: &mut Vec<u8>,
    seq: u64,
    entry: &AuditEntry,
) -> Result<(), rmp::encode::ValueWriteError> {
    use rmp::encode as mp;
    let fields = stored_fields(entry);
    let used = used_fields(&fields);
    mp::write_array_len(buf, 3)?;
    mp::write_uint(buf, u64::from(FORMAT_VERSION))?;
    mp::write_uint(buf, seq)?;
    mp::write_array_len(buf, 2 + used as u32)?;
    mp::write_sint(buf, entry.ts_ms)?;
    mp::write_uint(buf, u64::from(entry.kind.code()))?;
    for f in &fields[..used] {
        f.write(buf)?;
    }
    Ok(())
}

/// Decode a body of any format version: `(seq, entry)`.
fn decode_body(body: &[u8]) -> Result<(u64, AuditEntry), Defect> {
    // Every body is a 3-element array (0x93) whose first element is the version, a
    // positive fixint: the version is the second byte.
    let undecodable = |_| Defect::Undecodable;
    match body {
        [0x93, 1, ..] => {
            let (_, seq, e): (u8, u64, EntryV1) =
                rmp_serde::from_slice(body).map_err(undecodable)?;
            Ok((seq, e.into()))
        }
        [0x93, 2, ..] => {
            let (_, seq, e): (u8, u64, StoredEntry) =
                rmp_serde::from_slice(body).map_err(undecodable)?;
            Ok((seq, e.into_entry().ok_or(Defect::Undecodable)?))
        }
        _ => Err(Defect::Undecodable),
    }
}

/// Format 1 (v0.1.0): the entry's 19 fields in order, `kind` by name. Frozen: never change.
#[derive(Deserialize)]
struct EntryV1 {
    ts_ms: i64,
    kind: RecordKind,
    decision_id: Option<String>,
    tenant_id: Option<String>,
    capability_id: Option<String>,
    env: Option<String>,
    data_label: Option<String>,
    allowed: Option<bool>,
    dry_run: bool,
    worker_id: Option<String>,
    deny_reason: Option<String>,
    rule_id: Option<String>,
    policy_version: Option<String>,
    correlation_id: Option<String>,
    context: Option<String>,
    tenant_risk: Option<String>,
    qos_class: Option<String>,
    token_id: Option<String>,
    detail: Option<String>,
}

impl From<EntryV1> for AuditEntry {
    fn from(e: EntryV1) -> AuditEntry {
        AuditEntry {
            ts_ms: e.ts_ms,
            kind: e.kind,
            decision_id: e.decision_id,
            tenant_id: e.tenant_id,
            capability_id: e.capability_id,
            env: e.env,
            data_label: e.data_label,
            allowed: e.allowed,
            dry_run: e.dry_run,
            worker_id: e.worker_id,
            deny_reason: e.deny_reason,
            rule_id: e.rule_id,
            policy_version: e.policy_version,
            correlation_id: e.correlation_id,
            context: e.context,
            tenant_risk: e.tenant_risk,
            qos_class: e.qos_class,
            token_id: e.token_id,
            detail: e.detail,
        }
    }
}

/// Format 2, as read: a positional array in this field order. Every field after `kind` has
/// `#[serde(default)]`, so a record that ends early (empty trailing fields are not written)
/// or that was written before a field existed reads with that field empty.
///
/// **To add a field:** append it at the end, with `#[serde(default)]`, and write it in
/// [`StoredOut`] at the same place. Never reorder, remove or retype a field: that needs a new
/// format version, and the old one must stay readable.
#[derive(Deserialize)]
pub(crate) struct StoredEntry {
    ts_ms: i64,
    kind: u8,
    #[serde(default)]
    decision_id: Option<Packed<UuidBytes>>,
    #[serde(default)]
    tenant_id: Option<String>,
    #[serde(default)]
    capability_id: Option<String>,
    #[serde(default)]
    env: Option<String>,
    #[serde(default)]
    data_label: Option<String>,
    #[serde(default)]
    allowed: Option<bool>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    worker_id: Option<String>,
    #[serde(default)]
    deny_reason: Option<String>,
    #[serde(default)]
    rule_id: Option<String>,
    #[serde(default)]
    policy_version: Option<Packed<Blake3Bytes>>,
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    context: Option<String>,
    #[serde(default)]
    tenant_risk: Option<String>,
    #[serde(default)]
    qos_class: Option<String>,
    #[serde(default)]
    token_id: Option<Packed<TokenIdBytes>>,
    #[serde(default)]
    detail: Option<String>,
}

impl StoredEntry {
    fn into_entry(self) -> Option<AuditEntry> {
        Some(AuditEntry {
            ts_ms: self.ts_ms,
            kind: RecordKind::from_code(self.kind)?,
            decision_id: self.decision_id.map(|p| p.0),
            tenant_id: self.tenant_id,
            capability_id: self.capability_id,
            env: self.env,
            data_label: self.data_label,
            allowed: self.allowed,
            dry_run: self.dry_run,
            worker_id: self.worker_id,
            deny_reason: self.deny_reason,
            rule_id: self.rule_id,
            policy_version: self.policy_version.map(|p| p.0),
            correlation_id: self.correlation_id,
            context: self.context,
            tenant_risk: self.tenant_risk,
            qos_class: self.qos_class,
            token_id: self.token_id.map(|p| p.0),
            detail: self.detail,
        })
    }
}

/// One field of a stored entry, as written (format 2).
enum Field<'a> {
    Text(&'a Option<String>),
    Uuid(&'a Option<String>),
    Blake3(&'a Option<String>),
    TokenId(&'a Option<String>),
    Outcome(Option<bool>),
    Flag(bool),
}

/// The fields after `ts_ms` and `kind`, in [`StoredEntry`]'s order.
fn stored_fields(entry: &AuditEntry) -> [Field<'_>; 17] {
    // Destructured without `..`: a new AuditEntry field does not compile until it is given a
    // place here (and in StoredEntry).
    let AuditEntry {
        ts_ms: _,
        kind: _,
        decision_id,
        tenant_id,
        capability_id,
        env,
        data_label,
        allowed,
        dry_run,
        worker_id,
        deny_reason,
        rule_id,
        policy_version,
        correlation_id,
        context,
        tenant_risk,
        qos_class,
        token_id,
        detail,
    } = entry;
    [
        Field::Uuid(decision_id),
        Field::Text(tenant_id),
        Field::Text(capability_id),
        Field::Text(env),
        Field::Text(data_label),
        Field::Outcome(*allowed),
        Field::Flag(*dry_run),
        Field::Text(worker_id),
        Field::Text(deny_reason),
        Field::Text(rule_id),
        Field::Blake3(policy_version),
        Field::Text(correlation_id),
        Field::Text(context),
        Field::Text(tenant_risk),
        Field::Text(qos_class),
        Field::TokenId(token_id),
        Field::Text(detail),
    ]
}

/// How many of `fields` are written: up to the last one that is not empty.
fn used_fields(fields: &[Field<'_>]) -> usize {
    fields
        .iter()
        .rposition(|f| !f.is_empty())
        .map_or(0, |i| i + 1)
}

impl Field<'_> {
    fn is_empty(&self) -> bool {
        match self {
            Field::Text(v) | Field::Uuid(v) | Field::Blake3(v) | Field::TokenId(v) => v.is_none(),
            Field::Outcome(v) => v.is_none(),
            Field::Flag(v) => !v,
        }
    }

    /// As rmp-serde writes an `Option<&str>`, an `Option<bool>` or a `bool`; a packed text
    /// as `bin` when it has its usual shape, else as `str`.
    fn write(&self, buf: &mut Vec<u8>) -> Result<(), rmp::encode::ValueWriteError> {
        use rmp::encode as mp;
        fn nil(buf: &mut Vec<u8>) -> Result<(), mp::ValueWriteError> {
            mp::write_nil(buf).map_err(mp::ValueWriteError::InvalidMarkerWrite)
        }
        fn packed<P: Packing>(
            buf: &mut Vec<u8>,
            v: &Option<String>,
        ) -> Result<(), rmp::encode::ValueWriteError> {
            match v.as_deref().map(|t| (t, P::pack(t))) {
                None => nil(buf),
                Some((_, Some(bytes))) => mp::write_bin(buf, bytes.as_ref()),
                Some((t, None)) => mp::write_str(buf, t),
            }
        }
        match self {
            Field::Text(None) | Field::Outcome(None) => nil(buf),
            Field::Text(Some(t)) => mp::write_str(buf, t),
            Field::Uuid(v) => packed::<UuidBytes>(buf, v),
            Field::Blake3(v) => packed::<Blake3Bytes>(buf, v),
            Field::TokenId(v) => packed::<TokenIdBytes>(buf, v),
            Field::Outcome(Some(b)) | Field::Flag(b) => {
                mp::write_bool(buf, *b).map_err(mp::ValueWriteError::InvalidMarkerWrite)
            }
        }
    }
}

/// How a [`Packed`] text is stored as bytes when it has its usual shape.
pub(crate) trait Packing {
    type Bytes: AsRef<[u8]>;
    /// Bytes for `text`, if it has the shape that turns back into exactly `text`.
    fn pack(text: &str) -> Option<Self::Bytes>;
    /// The text for bytes made by `pack`.
    fn unpack(bytes: &[u8]) -> Option<String>;
}

/// A decision id: a UUID in its canonical lowercase form is stored as its 16 bytes.
pub(crate) enum UuidBytes {}
/// A policy version: `blake3:` and 64 lowercase hex digits is stored as the 32 hash bytes.
pub(crate) enum Blake3Bytes {}

/// A token id: `tok_` and 12 lowercase hex digits is stored as the 6 bytes.
pub(crate) enum TokenIdBytes {}

/// `digits` decoded, if it is exactly `2 * N` lowercase hex digits (upper case would not
/// turn back into the same text). By table, not `hex::decode`: this runs for three fields of
/// every decision record.
fn lower_hex<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    /// A lowercase hex digit's value; 0xff for every other byte.
    const VALUE: [u8; 256] = {
        let mut t = [0xff; 256];
        let mut i = 0;
        while i < 10 {
            t[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            t[b'a' as usize + i] = 10 + i as u8;
            i += 1;
        }
        t
    };
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    let mut bad = 0;
    for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let (hi, lo) = (VALUE[pair[0] as usize], VALUE[pair[1] as usize]);
        bad |= hi | lo;
        *o = (hi << 4) | lo;
    }
    (bad & 0xf0 == 0).then_some(out)
}

impl Packing for TokenIdBytes {
    type Bytes = [u8; 6];
    fn pack(text: &str) -> Option<[u8; 6]> {
        lower_hex(text.strip_prefix("tok_")?.as_bytes())
    }
    fn unpack(bytes: &[u8]) -> Option<String> {
        (bytes.len() == 6).then(|| format!("tok_{}", hex::encode(bytes)))
    }
}

impl Packing for UuidBytes {
    type Bytes = [u8; 16];
    fn pack(text: &str) -> Option<[u8; 16]> {
        // The canonical form only: 8-4-4-4-12 lowercase hex digits.
        let t = text.as_bytes();
        if t.len() != 36 || [8, 13, 18, 23].iter().any(|&i| t[i] != b'-') {
            return None;
        }
        let mut digits = [0u8; 32];
        digits[..8].copy_from_slice(&t[..8]);
        digits[8..12].copy_from_slice(&t[9..13]);
        digits[12..16].copy_from_slice(&t[14..18]);
        digits[16..20].copy_from_slice(&t[19..23]);
        digits[20..].copy_from_slice(&t[24..]);
        lower_hex(&digits)
    }
    fn unpack(bytes: &[u8]) -> Option<String> {
        uuid::Uuid::from_slice(bytes)
            .ok()
            .map(|u| u.hyphenated().to_string())
    }
}

impl Packing for Blake3Bytes {
    type Bytes = [u8; HASH_LEN];
    fn pack(text: &str) -> Option<[u8; HASH_LEN]> {
        lower_hex(text.strip_prefix("blake3:")?.as_bytes())
    }
    fn unpack(bytes: &[u8]) -> Option<String> {
        Hash32::from_slice(bytes).map(|h| format!("blake3:{h}"))
    }
}

/// Text stored as MessagePack bytes when it has `P`'s usual shape, else as a string; reads
/// either back as the same text.
pub(crate) struct Packed<P>(String, PhantomData<P>);

impl<'de, P: Packing> Deserialize<'de> for Packed<P> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<P>(PhantomData<P>);
        impl<P: Packing> serde::de::Visitor<'_> for V<P> {
            type Value = Packed<P>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("text, or the bytes of a packed id or hash")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Packed(v.to_string(), PhantomData))
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                P::unpack(v)
                    .map(|t| Packed(t, PhantomData))
                    .ok_or_else(|| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// Why a stored value is not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Defect {
    Truncated,
    HashMismatch,
    Undecodable,
    WrongSeq,
}

impl Defect {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Defect::Truncated => "record is truncated",
            Defect::HashMismatch => "hash does not match the record's contents",
            Defect::Undecodable => "record cannot be decoded",
            Defect::WrongSeq => "record's seq does not match its key",
        }
    }
}

/// Split a stored value into (prev, body, hash) without checking anything but the length.
pub(crate) fn split_value(value: &[u8]) -> Result<(Hash32, &[u8], Hash32), Defect> {
    if value.len() < 2 * HASH_LEN + 1 {
        return Err(Defect::Truncated);
    }
    let (prev, rest) = value.split_at(HASH_LEN);
    let (body, hash) = rest.split_at(rest.len() - HASH_LEN);
    Ok((
        Hash32::from_slice(prev).ok_or(Defect::Truncated)?,
        body,
        Hash32::from_slice(hash).ok_or(Defect::Truncated)?,
    ))
}

/// Decode a stored value into a record. With `check_hash`, also recompute the hash.
pub(crate) fn decode_value(
    seq: u64,
    value: &[u8],
    check_hash: bool,
) -> Result<AuditRecord, Defect> {
    let (prev_hash, body, hash) = split_value(value)?;
    if check_hash && blake3::hash(&value[..value.len() - HASH_LEN]).as_bytes() != &hash.0 {
        return Err(Defect::HashMismatch);
    }
    let (body_seq, entry) = decode_body(body)?;
    if body_seq != seq {
        return Err(Defect::WrongSeq);
    }
    Ok(AuditRecord {
        seq,
        entry,
        prev_hash,
        hash,
    })
}

#[cfg(test)]
mod golden {
    //! Golden bytes: one stored record of each kind, as this release writes it and as the
    //! release that wrote format 1 wrote it. If one of these fails, the encoding changed: a
    //! log on someone's disk would no longer read back as it was written. Read
    //! docs/audit-format.md before changing anything here.

    use super::*;

    /// One entry of each kind, with the fields the daemon fills for it.
    pub(super) fn samples() -> Vec<AuditEntry> {
        let ts = 1_764_460_800_123;
        let version = "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";
        let s = |v: &str| Some(v.to_string());
        vec![
            AuditEntry {
                decision_id: s("019ad2a4-b37b-7c4e-a6f0-2d3c0000f00d"),
                tenant_id: s("org.acme"),
                capability_id: s("cap.doc.summarize"),
                env: s("prod"),
                data_label: s("INTERNAL"),
                allowed: Some(true),
                worker_id: s("worker.doc.summarize"),
                rule_id: s("docs-prod"),
                policy_version: s(version),
                token_id: s("tok_0123456789ab"),
                ..AuditEntry::new(RecordKind::Decision, ts)
            },
            AuditEntry {
                decision_id: s("019ad2a4-b37b-7c4e-a6f0-2d3c0000beef"),
                tenant_id: s("org.beta.eu"),
                capability_id: s("cap.code.deploy"),
                env: s("dev"),
                data_label: s("SECRET"),
                allowed: Some(false),
                dry_run: true,
                deny_reason: s("change_freeze"),
                rule_id: s("beta-prod-freeze"),
                policy_version: s(version),
                correlation_id: s("req-42"),
                context: s(r#"{"ticket":"T-1","n":[1,2.5,null]}"#),
                tenant_risk: s("high"),
                qos_class: s("batch"),
                token_id: s("tok_0123456789ab"),
                ..AuditEntry::new(RecordKind::Decision, ts)
            },
            AuditEntry {
                allowed: Some(true),
                policy_version: s(version),
                ..AuditEntry::new(RecordKind::Reload, ts)
            },
            AuditEntry {
                allowed: Some(false),
                detail: s("policies/99.toml:1:6: error: expected `=`"),
                ..AuditEntry::new(RecordKind::Reload, ts)
            },
            AuditEntry {
                token_id: s("tok_0123456789ab"),
                detail: s("ci-router"),
                tenant_id: s("org.acme"),
                ..AuditEntry::new(RecordKind::TokenIssue, ts)
            },
            AuditEntry {
                token_id: s("tok_0123456789ab"),
                detail: s("tok_ba9876543210"),
                ..AuditEntry::new(RecordKind::TokenRevoke, ts)
            },
            AuditEntry {
                token_id: s("tok_0123456789ab"),
                detail: s("openai_api_key"),
                ..AuditEntry::new(RecordKind::SecretStore, ts)
            },
            AuditEntry {
                token_id: s("tok_0123456789ab"),
                detail: s("openai_api_key"),
                ..AuditEntry::new(RecordKind::SecretDelete, ts)
            },
            AuditEntry {
                decision_id: s("019ad2a4-b37b-7c4e-a6f0-2d3c0000f00d"),
                tenant_id: s("org.acme"),
                worker_id: s("worker.doc.summarize"),
                token_id: s("tok_0123456789ab"),
                detail: s("openai_api_key"),
                ..AuditEntry::new(RecordKind::SecretRelease, ts)
            },
            AuditEntry {
                decision_id: s("not-a-uuid"),
                tenant_id: s("org.acme"),
                token_id: s("tok_0123456789ab"),
                detail: s("openai_api_key: decision_not_allowed"),
                ..AuditEntry::new(RecordKind::SecretRefusal, ts)
            },
        ]
    }

    /// The bodies v0.1.0 wrote for [`samples`] at seqs 1, 2, …: format 1.
    const V1: [&str; 10] = [
        // Decision
        "930101dc0013cf0000019ad20f287ba86465636973696f6ed92430313961643261342d623337622d376334652d613666302d326433633030303066303064a86f72672e61636d65b16361702e646f632e73756d6d6172697a65a470726f64a8494e5445524e414cc3c2b4776f726b65722e646f632e73756d6d6172697a65c0a9646f63732d70726f64d947626c616b65333a61663133343962396635663961316136613034303464656133366463633934393962636232356339616463313132623763633961393363616534316633323632c0c0c0c0b0746f6b5f303132333435363738396162c0",
        // Decision
        "930102dc0013cf0000019ad20f287ba86465636973696f6ed92430313961643261342d623337622d376334652d613666302d326433633030303062656566ab6f72672e626574612e6575af6361702e636f64652e6465706c6f79a3646576a6534543524554c2c3c0ad6368616e67655f667265657a65b0626574612d70726f642d667265657a65d947626c616b65333a61663133343962396635663961316136613034303464656133366463633934393962636232356339616463313132623763633961393363616534316633323632a67265712d3432d9217b227469636b6574223a22542d31222c226e223a5b312c322e352c6e756c6c5d7da468696768a56261746368b0746f6b5f303132333435363738396162c0",
        // Reload
        "930103dc0013cf0000019ad20f287ba672656c6f6164c0c0c0c0c0c3c2c0c0c0d947626c616b65333a61663133343962396635663961316136613034303464656133366463633934393962636232356339616463313132623763633961393363616534316633323632c0c0c0c0c0c0",
        // Reload
        "930104dc0013cf0000019ad20f287ba672656c6f6164c0c0c0c0c0c2c2c0c0c0c0c0c0c0c0c0d929706f6c69636965732f39392e746f6d6c3a313a363a206572726f723a20657870656374656420603d60",
        // TokenIssue
        "930105dc0013cf0000019ad20f287bab746f6b656e5f6973737565c0a86f72672e61636d65c0c0c0c0c2c0c0c0c0c0c0c0c0b0746f6b5f303132333435363738396162a963692d726f75746572",
        // TokenRevoke
        "930106dc0013cf0000019ad20f287bac746f6b656e5f7265766f6b65c0c0c0c0c0c0c2c0c0c0c0c0c0c0c0b0746f6b5f303132333435363738396162b0746f6b5f626139383736353433323130",
        // SecretStore
        "930107dc0013cf0000019ad20f287bac7365637265745f73746f7265c0c0c0c0c0c0c2c0c0c0c0c0c0c0c0b0746f6b5f303132333435363738396162ae6f70656e61695f6170695f6b6579",
        // SecretDelete
        "930108dc0013cf0000019ad20f287bad7365637265745f64656c657465c0c0c0c0c0c0c2c0c0c0c0c0c0c0c0b0746f6b5f303132333435363738396162ae6f70656e61695f6170695f6b6579",
        // SecretRelease
        "930109dc0013cf0000019ad20f287bae7365637265745f72656c65617365d92430313961643261342d623337622d376334652d613666302d326433633030303066303064a86f72672e61636d65c0c0c0c0c2b4776f726b65722e646f632e73756d6d6172697a65c0c0c0c0c0c0c0b0746f6b5f303132333435363738396162ae6f70656e61695f6170695f6b6579",
        // SecretRefusal
        "93010adc0013cf0000019ad20f287bae7365637265745f7265667573616caa6e6f742d612d75756964a86f72672e61636d65c0c0c0c0c2c0c0c0c0c0c0c0c0b0746f6b5f303132333435363738396162d9246f70656e61695f6170695f6b65793a206465636973696f6e5f6e6f745f616c6c6f776564",
    ];

    /// The bodies this release writes for [`samples`] at seqs 1, 2, …: format 2.
    const V2: [&str; 10] = [
        // Decision
        "930201dc0012cf0000019ad20f287b00c410019ad2a4b37b7c4ea6f02d3c0000f00da86f72672e61636d65b16361702e646f632e73756d6d6172697a65a470726f64a8494e5445524e414cc3c2b4776f726b65722e646f632e73756d6d6172697a65c0a9646f63732d70726f64c420af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262c0c0c0c0c4060123456789ab",
        // Decision
        "930202dc0012cf0000019ad20f287b00c410019ad2a4b37b7c4ea6f02d3c0000beefab6f72672e626574612e6575af6361702e636f64652e6465706c6f79a3646576a6534543524554c2c3c0ad6368616e67655f667265657a65b0626574612d70726f642d667265657a65c420af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262a67265712d3432d9217b227469636b6574223a22542d31222c226e223a5b312c322e352c6e756c6c5d7da468696768a56261746368c4060123456789ab",
        // Reload
        "9302039dcf0000019ad20f287b01c0c0c0c0c0c3c2c0c0c0c420af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
        // Reload
        "930204dc0013cf0000019ad20f287b01c0c0c0c0c0c2c2c0c0c0c0c0c0c0c0c0d929706f6c69636965732f39392e746f6d6c3a313a363a206572726f723a20657870656374656420603d60",
        // TokenIssue
        "930205dc0013cf0000019ad20f287b02c0a86f72672e61636d65c0c0c0c0c2c0c0c0c0c0c0c0c0c4060123456789aba963692d726f75746572",
        // TokenRevoke
        "930206dc0013cf0000019ad20f287b03c0c0c0c0c0c0c2c0c0c0c0c0c0c0c0c4060123456789abb0746f6b5f626139383736353433323130",
        // SecretStore
        "930207dc0013cf0000019ad20f287b04c0c0c0c0c0c0c2c0c0c0c0c0c0c0c0c4060123456789abae6f70656e61695f6170695f6b6579",
        // SecretDelete
        "930208dc0013cf0000019ad20f287b05c0c0c0c0c0c0c2c0c0c0c0c0c0c0c0c4060123456789abae6f70656e61695f6170695f6b6579",
        // SecretRelease
        "930209dc0013cf0000019ad20f287b06c410019ad2a4b37b7c4ea6f02d3c0000f00da86f72672e61636d65c0c0c0c0c2b4776f726b65722e646f632e73756d6d6172697a65c0c0c0c0c0c0c0c4060123456789abae6f70656e61695f6170695f6b6579",
        // SecretRefusal
        "93020adc0013cf0000019ad20f287b07aa6e6f742d612d75756964a86f72672e61636d65c0c0c0c0c2c0c0c0c0c0c0c0c0c4060123456789abd9246f70656e61695f6170695f6b65793a206465636973696f6e5f6e6f745f616c6c6f776564",
    ];

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn body_hex(seq: u64, e: &AuditEntry) -> String {
        let mut buf = Vec::new();
        encode_value(&mut buf, &Hash32::ZERO, seq, e).unwrap();
        hex(&buf[HASH_LEN..buf.len() - HASH_LEN])
    }

    /// A stored value around `body`, hashed as the writer would.
    fn value_of(body: &[u8]) -> Vec<u8> {
        let mut v = Hash32::ZERO.0.to_vec();
        v.extend_from_slice(body);
        let h = blake3::hash(&v);
        v.extend_from_slice(h.as_bytes());
        v
    }

    #[test]
    fn format_1_bodies_written_by_v0_1_0_still_decode() {
        for (i, (body, want)) in V1.iter().zip(samples()).enumerate() {
            let seq = i as u64 + 1;
            let r = decode_value(seq, &value_of(&unhex(body)), true).unwrap();
            assert_eq!(r.entry, want, "{:?}", want.kind);
            assert_eq!(r.seq, seq);
        }
    }

    #[test]
    fn format_2_bodies_are_byte_for_byte_as_written() {
        let got: Vec<String> = (1..)
            .zip(samples())
            .map(|(seq, e)| body_hex(seq, &e))
            .collect();
        for (e, g) in samples().iter().zip(&got) {
            println!("{:?} {g}", e.kind);
        }
        for (i, e) in samples().iter().enumerate() {
            let seq = i as u64 + 1;
            assert_eq!(got[i], V2[i], "{:?}: the stored encoding changed", e.kind);
            let r = decode_value(seq, &value_of(&unhex(V2[i])), true).unwrap();
            assert_eq!(&r.entry, e);
        }
    }

    #[test]
    fn a_typical_route_record_is_smaller_than_in_format_1() {
        let e = &samples()[0];
        let v1 = unhex(V1[0]).len() + 2 * HASH_LEN;
        let mut buf = Vec::new();
        encode_value(&mut buf, &Hash32::ZERO, 1, e).unwrap();
        println!(
            "typical route record: format 1 {v1} bytes, format 2 {} bytes",
            buf.len()
        );
        assert!(buf.len() * 4 <= v1 * 3, "{} vs {v1}", buf.len());
    }

    #[test]
    fn fields_missing_from_the_end_read_as_empty() {
        // [2, 7, [ts, kind]]: a record from before every optional field existed.
        let body = rmp_serde::to_vec(&(2u8, 7u64, (1_000i64, 5u8))).unwrap();
        let r = decode_value(7, &value_of(&body), true).unwrap();
        assert_eq!(r.entry, AuditEntry::new(RecordKind::SecretDelete, 1_000));
    }

    #[test]
    fn what_is_not_a_known_format_is_undecodable() {
        let undecodable = |body: Vec<u8>| decode_value(1, &value_of(&body), true).err();
        // Unknown version, unknown kind code, a field of the wrong type, one field too many.
        let cases = [
            rmp_serde::to_vec(&(3u8, 1u64, (1i64, 0u8))).unwrap(),
            rmp_serde::to_vec(&(2u8, 1u64, (1i64, 200u8))).unwrap(),
            rmp_serde::to_vec(&(2u8, 1u64, (1i64, 0u8, 5u8))).unwrap(),
            [&[0x93, 2, 1, 0xdc, 0, 20, 1, 0][..], &[0xc0; 18]].concat(),
            b"\xc1".to_vec(),
        ];
        for body in cases {
            assert_eq!(
                undecodable(body.clone()),
                Some(Defect::Undecodable),
                "{}",
                hex(&body)
            );
        }
    }

    #[test]
    fn ids_and_versions_of_another_shape_are_kept_as_text() {
        for (id, version) in [
            (
                "019AD2A4-B37B-7C4E-A6F0-2D3C0000F00D",
                "blake3:AF1349B9F5F9A1A6A0404DEA36DCC9499BCB25C9ADC112B7CC9A93CAE41F3262",
            ),
            ("019ad2a4b37b7c4ea6f02d3c0000f00d", "blake3:af13"),
            (
                "",
                "sha256:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
            ),
        ] {
            let e = AuditEntry {
                decision_id: Some(id.into()),
                policy_version: Some(version.into()),
                ..AuditEntry::new(RecordKind::Decision, 1)
            };
            let mut buf = Vec::new();
            encode_value(&mut buf, &Hash32::ZERO, 1, &e).unwrap();
            assert_eq!(decode_value(1, &buf, true).unwrap().entry, e);
        }
    }

    /// The oracle for [`write_body`]: the writer as it was before it, rmp-serde over a serde
    /// view of `(FORMAT_VERSION, seq, entry)`, with the packing rules written out again
    /// the long way (parse, then check that the text is the canonical form).
    fn serde_body(seq: u64, e: &AuditEntry) -> Vec<u8> {
        struct Entry<'a>(&'a AuditEntry);
        struct Out<'a, 'b>(&'b Field<'a>);
        fn uuid_bytes(t: &str) -> Option<Vec<u8>> {
            let u = uuid::Uuid::try_parse(t).ok()?;
            (u.hyphenated().to_string() == t).then(|| u.as_bytes().to_vec())
        }
        fn hex_bytes(t: &str, prefix: &str, len: usize) -> Option<Vec<u8>> {
            let digits = t.strip_prefix(prefix)?;
            let lower = digits
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            (lower && digits.len() == 2 * len).then(|| hex::decode(digits).unwrap())
        }
        fn packed<S: Serializer>(
            s: S,
            v: &Option<String>,
            pack: impl Fn(&str) -> Option<Vec<u8>>,
        ) -> Result<S::Ok, S::Error> {
            match v.as_deref() {
                None => s.serialize_none(),
                Some(t) => match pack(t) {
                    Some(b) => s.serialize_some(serde_bytes::Bytes::new(&b)),
                    None => s.serialize_some(t),
                },
            }
        }
        impl Serialize for Out<'_, '_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self.0 {
                    Field::Text(v) => v.serialize(s),
                    Field::Uuid(v) => packed(s, v, uuid_bytes),
                    Field::Blake3(v) => packed(s, v, |t| hex_bytes(t, "blake3:", 32)),
                    Field::TokenId(v) => packed(s, v, |t| hex_bytes(t, "tok_", 6)),
                    Field::Outcome(v) => v.serialize(s),
                    Field::Flag(v) => v.serialize(s),
                }
            }
        }
        impl Serialize for Entry<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeSeq;
                let fields = stored_fields(self.0);
                let used = used_fields(&fields);
                let mut seq = s.serialize_seq(Some(2 + used))?;
                seq.serialize_element(&self.0.ts_ms)?;
                seq.serialize_element(&self.0.kind.code())?;
                for f in &fields[..used] {
                    seq.serialize_element(&Out(f))?;
                }
                seq.end()
            }
        }
        rmp_serde::to_vec(&(FORMAT_VERSION, seq, Entry(e))).unwrap()
    }

    #[test]
    fn lower_hex_takes_exactly_the_lowercase_digits() {
        for a in 0..=255u8 {
            for b in [b'0', b'7', b'f', b'F', b'g', a] {
                let want = [a, b]
                    .iter()
                    .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
                    .then(|| hex::decode([a, b]).unwrap()[0]);
                assert_eq!(lower_hex::<1>(&[a, b]).map(|[v]| v), want, "{a:#x} {b:#x}");
                assert_eq!(
                    lower_hex::<1>(&[b, a]).map(|[v]| v),
                    want.map(|_| hex::decode([b, a]).unwrap()[0])
                );
            }
        }
        assert_eq!(lower_hex::<2>(b"0a1"), None);
        assert_eq!(lower_hex::<1>(b"0a1"), None);
        assert_eq!(lower_hex::<2>(b"0aff"), Some([0x0a, 0xff]));
    }

    #[test]
    fn the_oracle_makes_the_golden_bytes() {
        for (i, e) in samples().iter().enumerate() {
            assert_eq!(hex(&serde_body(i as u64 + 1, e)), V2[i], "{:?}", e.kind);
        }
    }

    fn opt(re: &'static str) -> impl proptest::strategy::Strategy<Value = Option<String>> {
        proptest::option::of(re)
    }

    proptest::proptest! {
        #[test]
        fn every_entry_reads_back_as_written(
            ts in proptest::num::i64::ANY,
            kind in 0u8..8,
            ids in (opt("[0-9a-f-]{0,40}|019ad2a4-b37b-7c4e-a6f0-2d3c0000f00[0-9a-f]"), opt(".{0,12}"), opt(".{0,12}"), opt(".{0,12}"), opt(".{0,12}")),
            outcome in (proptest::option::of(proptest::bool::ANY), proptest::bool::ANY, opt(".{0,12}"), opt(".{0,12}"), opt(".{0,12}")),
            more in (opt("blake3:[0-9a-f]{64}|blake3:[0-9a-fA-F]{0,64}"), opt(".{0,12}"), opt(".{0,30}"), opt(".{0,6}"), opt(".{0,6}"), opt(".{0,16}"), opt(".{0,20}")),
        ) {
            let e = AuditEntry {
                ts_ms: ts,
                kind: RecordKind::from_code(kind).unwrap(),
                decision_id: ids.0,
                tenant_id: ids.1,
                capability_id: ids.2,
                env: ids.3,
                data_label: ids.4,
                allowed: outcome.0,
                dry_run: outcome.1,
                worker_id: outcome.2,
                deny_reason: outcome.3,
                rule_id: outcome.4,
                policy_version: more.0,
                correlation_id: more.1,
                context: more.2,
                tenant_risk: more.3,
                qos_class: more.4,
                token_id: more.5,
                detail: more.6,
            };
            let mut buf = Vec::new();
            encode_value(&mut buf, &Hash32([9; 32]), 42, &e).unwrap();
            let r = decode_value(42, &buf, true).unwrap();
            proptest::prop_assert_eq!(r.entry, e);
        }

        #[test]
        fn the_writer_makes_the_bytes_serde_makes(
            seq in proptest::num::u64::ANY,
            ts in proptest::num::i64::ANY,
            kind in 0u8..8,
            decision_id in opt("[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-fA-F-]{36}|[0-9a-f]{32}|\\{[0-9a-f-]{36}\\}|urn:uuid:[0-9a-f-]{36}|.{0,40}"),
            policy_version in opt("blake3:[0-9a-f]{64}|blake3:[0-9a-fA-F]{62,66}|sha256:[0-9a-f]{64}|.{0,12}"),
            token_id in opt("tok_[0-9a-f]{12}|tok_[0-9a-fA-F]{10,14}|tok_.{12}|.{0,16}"),
            // Lengths across fixstr/str8 (31/32) and str8/str16 (255/256).
            texts in proptest::collection::vec(opt(".{0,40}|[a-z]{250,260}"), 12),
            outcome in (proptest::option::of(proptest::bool::ANY), proptest::bool::ANY),
            trailing_empty in 0usize..=12,
        ) {
            // The last `trailing_empty` text fields empty, so that records end early.
            let t = |i: usize| if i + trailing_empty < 12 { texts[i].clone() } else { None };
            let e = AuditEntry {
                ts_ms: ts,
                kind: RecordKind::from_code(kind).unwrap(),
                decision_id,
                tenant_id: t(0),
                capability_id: t(1),
                env: t(2),
                data_label: t(3),
                allowed: outcome.0,
                dry_run: outcome.1,
                worker_id: t(4),
                deny_reason: t(5),
                rule_id: t(6),
                policy_version,
                correlation_id: t(7),
                context: t(8),
                tenant_risk: t(9),
                qos_class: t(10),
                token_id,
                detail: t(11),
            };
            let mut buf = Vec::new();
            write_body(&mut buf, seq, &e).unwrap();
            proptest::prop_assert_eq!(hex(&buf), hex(&serde_body(seq, &e)));
        }
    }
}
