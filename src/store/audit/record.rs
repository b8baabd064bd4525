//! What one audit record is, how it is encoded in sled, and how it looks as JSON.
//!
//! Stored value of record `seq` (key: `seq` as big-endian u64):
//!
//! ```text
//! prev_hash (32 bytes) ‖ body (rmp-serde of (FORMAT_VERSION, seq, AuditEntry)) ‖ hash (32 bytes)
//! hash = blake3(prev_hash ‖ body)
//! ```
//!
//! Keeping `prev_hash` in front of the body means the hash input is literally the first
//! `len - 32` bytes of the value: verifying a record is one blake3 call and two compares.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Version of the body encoding, stored first in every body so a later format can coexist.
pub(crate) const FORMAT_VERSION: u8 = 1;
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
        let b = s.as_bytes();
        if b.len() != HASH_LEN * 2 {
            return None;
        }
        let mut out = [0u8; HASH_LEN];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Hash32(out))
    }

    pub(crate) fn from_slice(s: &[u8]) -> Option<Hash32> {
        <[u8; HASH_LEN]>::try_from(s).ok().map(Hash32)
    }
}

impl fmt::Display for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
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

/// What a caller hands to `AuditLog::append`: everything but `seq`, `prev_hash` and `hash`,
/// which the writer assigns.
///
/// Build one with struct update syntax:
/// `AuditEntry { tenant_id: Some(t), ..AuditEntry::new(RecordKind::Decision, now_ms) }`.
///
/// The writer keeps the log time-ordered: if `ts_ms` is older than the previous record's
/// (clock stepped back, or two requests raced to the writer), it is raised to that time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

pub(crate) fn format_time(ts_ms: i64) -> Option<String> {
    const FMT: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_ms) * 1_000_000).ok()?;
    t.format(FMT).ok()
}

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
) -> Result<Hash32, rmp_serde::encode::Error> {
    buf.clear();
    buf.extend_from_slice(&prev.0);
    rmp_serde::encode::write(buf, &(FORMAT_VERSION, seq, entry))?;
    let hash = blake3::hash(buf);
    buf.extend_from_slice(hash.as_bytes());
    Ok(Hash32(*hash.as_bytes()))
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
    let (version, body_seq, entry): (u8, u64, AuditEntry) =
        rmp_serde::from_slice(body).map_err(|_| Defect::Undecodable)?;
    if version != FORMAT_VERSION {
        return Err(Defect::Undecodable);
    }
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
