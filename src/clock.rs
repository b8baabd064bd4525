//! The wall clock, read and shown in one place: milliseconds since the Unix epoch, and
//! RFC 3339 UTC text with milliseconds (`2026-11-23T09:30:00.123Z`), the form every time in
//! the API and the audit log takes.
//!
//! The engine never reads the clock: callers pass the time in (ARCHITECTURE: a pure core).

/// Milliseconds since the Unix epoch (0 if the system clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `ts_ms` as RFC 3339 UTC with milliseconds, e.g. `2026-11-23T09:30:00.123Z`; `None` if the
/// timestamp is outside what a calendar date can show.
pub fn rfc3339_ms(ts_ms: i64) -> Option<String> {
    const FMT: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_ms) * 1_000_000).ok()?;
    t.format(FMT).ok()
}

/// `<n><unit>` with unit `s`, `m`, `h` or `d` (e.g. `"15m"`), in seconds; at most 9 digits,
/// one unit, no spaces. The one duration syntax of Hall: rule keys (`approval_ttl`) take
/// exactly this; the CLI's `--expires-in` and `hall replay --since/--until` rewrite the
/// spellings they have always taken into it first (`crate::cli::flag_duration`).
pub fn parse_duration(s: &str) -> Option<u64> {
    let unit = match s.as_bytes().last()? {
        b's' => 1,
        b'm' => 60,
        b'h' => 3600,
        b'd' => 86_400,
        _ => return None,
    };
    let n = &s[..s.len() - 1];
    if n.is_empty() || n.len() > 9 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse::<u64>().ok()?.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_with_milliseconds_in_utc() {
        assert_eq!(rfc3339_ms(0).as_deref(), Some("1970-01-01T00:00:00.000Z"));
        assert_eq!(
            rfc3339_ms(1_764_460_800_123).as_deref(),
            Some("2025-11-30T00:00:00.123Z")
        );
        assert_eq!(rfc3339_ms(-1).as_deref(), Some("1969-12-31T23:59:59.999Z"));
        assert_eq!(rfc3339_ms(i64::MAX), None);
    }

    #[test]
    fn now_is_now() {
        let a = now_ms();
        let parsed = time::OffsetDateTime::parse(
            &rfc3339_ms(a).unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        assert_eq!(parsed.unix_timestamp_nanos() / 1_000_000, i128::from(a));
        assert!(a > 1_700_000_000_000, "{a}");
    }
}
