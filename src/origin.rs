//! Origins and `Host` authorities, parsed strictly: what the config's `allowed_origins`
//! must look like and what the daemon's Host and Origin checks (`server::guard`) compare.
//! A leaf: both `config` and `server` use it.

use std::net::Ipv6Addr;

/// The canonical form of a serialized origin (`scheme://host[:port]`): scheme and host
/// lowercased, default port dropped. `None` when `s` is not such an origin: `null`, anything
/// with a path (even `/`), query, fragment, userinfo, whitespace or non-ASCII.
/// Config loading uses it to reject bad `allowed_origins` entries with a clear message.
pub fn normalize_origin(s: &str) -> Option<String> {
    if s.eq_ignore_ascii_case("null") {
        return None;
    }
    let (scheme, authority) = s.split_once("://")?;
    let mut chars = scheme.bytes();
    if !chars.next()?.is_ascii_alphabetic()
        || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
    {
        return None;
    }
    let scheme = scheme.to_ascii_lowercase();
    let (name, port) = split_authority(authority)?;
    let host = match name {
        Name::Ipv6(inner) => format!("[{}]", inner.parse::<Ipv6Addr>().ok()?),
        Name::Reg(name) => {
            if !name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
            {
                return None;
            }
            name.to_ascii_lowercase()
        }
    };
    let default_port = match scheme.as_str() {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    };
    Some(match port {
        Some(p) if Some(p) != default_port => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// The host part of an authority: a bracketed IPv6 literal (brackets removed) or anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Name<'a> {
    Ipv6(&'a str),
    Reg(&'a str),
}

/// Split `host[:port]` strictly. Refuses empty input, any byte outside visible ASCII, and
/// the characters that would make it more than an authority (`@ / \ ? # %`), an unbracketed
/// IPv6 address (more than one `:`), an empty or non-numeric port, a port with a leading zero,
/// or a port above 65535.
pub(crate) fn split_authority(s: &str) -> Option<(Name<'_>, Option<u16>)> {
    if s.is_empty()
        || !s
            .bytes()
            .all(|c| c.is_ascii_graphic() && !b"@/\\?#%".contains(&c))
    {
        return None;
    }
    let (name, port) = if let Some(rest) = s.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':')?),
        };
        (Name::Ipv6(inner), port)
    } else {
        match s.split_once(':') {
            Some((_, port)) if port.contains(':') => return None,
            Some((name, port)) => (Name::Reg(name), Some(port)),
            None => (Name::Reg(s), None),
        }
    };
    let (Name::Reg(n) | Name::Ipv6(n)) = name;
    if n.is_empty() || n.contains(['[', ']']) {
        return None;
    }
    let port = match port {
        None => None,
        // Digits only, no leading zero: the form browsers send, and nothing to normalize.
        Some(p)
            if !p.is_empty()
                && p.len() <= 5
                && !(p.len() > 1 && p.starts_with('0'))
                && p.bytes().all(|c| c.is_ascii_digit()) =>
        {
            Some(p.parse::<u16>().ok()?)
        }
        Some(_) => return None,
    };
    Some((name, port))
}
