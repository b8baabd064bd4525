//! Host and Origin checks that keep web pages away from the daemon (SPEC 4, "Browser and
//! local-network safety"). Pure functions: the middleware passes header values in and answers
//! 403 `bad_host` / `bad_origin` when they return `false`.
//!
//! **Host** defeats DNS rebinding: a page on `evil.example` whose name is re-pointed at
//! 127.0.0.1 still sends `Host: evil.example:8765`. We accept only names that cannot be
//! re-pointed by anyone outside this machine:
//! - `localhost` exactly (any case). *Not* `*.localhost` and not `localhost.` (trailing dot):
//!   browsers map those to loopback internally, but the system resolver may ask upstream DNS
//!   for them, so an attacker could serve a page from such a name first and rebind it later.
//! - IPv4 `127.0.0.0/8` in plain dotted-quad form (std's strict parser: no `127.1`, no hex,
//!   octal or leading zeros; browsers normalize those forms before sending them anyway).
//! - IPv6 `[::1]` and IPv4-mapped loopback (`[::ffff:127.0.0.1]`), bracketed; no zone ids.
//!
//! A port, when present, must be the listening port. A missing port is accepted: a browser
//! leaves it out only for the scheme's default port, and the name check alone already stops
//! rebinding. A missing or empty `Host` is refused (HTTP/1.1 requires it, and only hand-made
//! clients leave it out). Anything with userinfo (`@`), a path, whitespace, percent-encoding
//! or non-ASCII is refused outright rather than parsed.
//!
//! With `--allow-non-loopback` the daemon also accepts, as `Host`, an IP literal naming its
//! listener ([`ip_host_allowed`]); host *names* other than `localhost` are still refused, so
//! remote clients must use `http://<ip>:<port>`.
//!
//! **Origin** stops cross-site requests from pages that *are* on a loopback origin (another
//! local web app) and, belt and braces, from any page at all: no `Origin` (curl, the CLI,
//! agents) passes; any `Origin` passes only when listed in `allowed_origins` (default: none).
//! `null` (sandboxed iframes, `file:` pages, redirects) is always refused, even if listed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub use crate::origin::normalize_origin;
use crate::origin::{split_authority, Name};

/// Whether `host_header` (the `Host` header, or the `:authority` of an HTTP/2 request) names
/// this machine's loopback interface on `listen_port`. See the module docs for exactly what
/// passes.
pub fn host_allowed(host_header: Option<&str>, listen_port: u16) -> bool {
    if host_header.is_some_and(|h| usual_host(h, listen_port)) {
        return true;
    }
    let Some((name, port)) = host_header.and_then(split_authority) else {
        return false;
    };
    if port.is_some_and(|p| p != listen_port) {
        return false;
    }
    match name {
        Name::Ipv6(inner) => inner.parse::<Ipv6Addr>().is_ok_and(|ip| {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }),
        Name::Reg(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
        }
    }
}

/// `127.0.0.1:PORT` or `localhost:PORT` byte for byte, with the listening port as digits
/// without leading zeros: what clients send, accepted without parsing (the full check takes
/// ten times as long, on every request). Everything else takes the full check.
fn usual_host(host: &str, listen_port: u16) -> bool {
    let Some(port) = host
        .strip_prefix("127.0.0.1:")
        .or_else(|| host.strip_prefix("localhost:"))
    else {
        return false;
    };
    let mut digits = [0u8; 5];
    let mut start = digits.len();
    let mut p = listen_port;
    loop {
        start -= 1;
        digits[start] = b'0' + (p % 10) as u8;
        p /= 10;
        if p == 0 {
            break;
        }
    }
    port.as_bytes() == &digits[start..]
}

/// With `--allow-non-loopback` (a listener that is not loopback): whether `host_header` is an
/// IP literal that names this listener, with the listening port or none.
///
/// Why IP literals are safe: DNS rebinding needs a *name* the attacker controls; a browser
/// sends an IP literal as `Host` only when it connected to that very address. So the listen
/// address itself passes, and for a wildcard listen (`0.0.0.0`, `::`) any unicast IP literal
/// does (the daemon cannot know which of its addresses a client used). Names other than
/// `localhost` (`myhost.lan`) still fail: a name can be rebound, and allowing one would need a
/// configured list.
pub fn ip_host_allowed(host_header: Option<&str>, listen_ip: IpAddr, listen_port: u16) -> bool {
    let Some((name, port)) = host_header.and_then(split_authority) else {
        return false;
    };
    if port.is_some_and(|p| p != listen_port) {
        return false;
    }
    let ip: IpAddr = match name {
        Name::Ipv6(inner) => match inner.parse::<Ipv6Addr>() {
            Ok(ip) => ip.into(),
            Err(_) => return false,
        },
        Name::Reg(name) => match name.parse::<Ipv4Addr>() {
            Ok(ip) => ip.into(),
            Err(_) => return false,
        },
    };
    let ip = ip.to_canonical();
    let listen_ip = listen_ip.to_canonical();
    if listen_ip.is_unspecified() {
        !ip.is_unspecified() && !ip.is_multicast() && ip != IpAddr::V4(Ipv4Addr::BROADCAST)
    } else {
        ip == listen_ip
    }
}

/// Whether a request carrying `origin` (the `Origin` header) may proceed.
///
/// No header: yes (not a browser, or a same-origin GET a browser did not label). Otherwise only
/// an exact match with an entry of `allowed_origins`, comparing scheme and host
/// case-insensitively and treating an explicit default port (`:80` for http, `:443` for https)
/// as absent. Entries that are not valid origins never match; validate them at startup with
/// [`normalize_origin`].
pub fn origin_allowed(origin: Option<&str>, allowed_origins: &[String]) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    let Some(origin) = normalize_origin(origin) else {
        return false;
    };
    allowed_origins
        .iter()
        .filter_map(|a| normalize_origin(a))
        .any(|a| a == origin)
}

/// Whether the daemon would listen only on this machine (127.0.0.0/8, `::1`, or an
/// IPv4-mapped loopback). `0.0.0.0` and `::` are *not* loopback: they listen everywhere.
pub fn is_loopback_listen(addr: &SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: u16 = 8765;

    fn host(h: &str) -> bool {
        host_allowed(Some(h), PORT)
    }

    /// The full check of a registered name, without the shortcut.
    fn full(h: &str, port: u16) -> bool {
        let Some((name, p)) = split_authority(h) else {
            return false;
        };
        p.is_none_or(|p| p == port)
            && matches!(name, Name::Reg(n) if n.eq_ignore_ascii_case("localhost")
                || n.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback()))
    }

    /// The fast path is a shortcut, never a widening: what it takes, the full check takes
    /// too; and it takes the two usual forms for every port.
    #[test]
    fn the_usual_host_shortcut_takes_nothing_the_full_check_refuses() {
        for port in [0, 1, 9, 10, 80, 8765, 9999, 10000, 65535] {
            for h in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
                assert!(usual_host(&h, port), "{h}");
                assert!(full(&h, port), "{h}");
            }
            for h in [
                format!("127.0.0.1:0{port}"),
                format!("127.0.0.1:+{port}"),
                format!("127.0.0.1:{port} "),
                format!("127.0.0.1:{}", u32::from(port) + 1),
                format!("127.0.0.1.:{port}"),
                format!("localhost.:{port}"),
                format!("evil@127.0.0.1:{port}"),
                format!("127.0.0.1:{port}/x"),
                "127.0.0.1:".to_string(),
                "127.0.0.1".to_string(),
            ] {
                assert!(!usual_host(&h, port), "{h}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn what_the_shortcut_takes_the_full_check_takes(
            h in "(127\\.0\\.0\\.1|localhost|LOCALHOST|127\\.1)?:?[0-9+ ]{0,7}|\\PC{0,20}",
            port in proptest::prop_oneof![proptest::num::u16::ANY, proptest::strategy::Just(8765u16)],
        ) {
            if usual_host(&h, port) {
                proptest::prop_assert!(full(&h, port));
            }
        }
    }

    #[test]
    fn loopback_hosts_pass() {
        for h in [
            "localhost",
            "localhost:8765",
            "LOCALHOST:8765",
            "LocalHost",
            "127.0.0.1",
            "127.0.0.1:8765",
            "127.1.2.3:8765",
            "127.255.255.254",
            "[::1]",
            "[::1]:8765",
            "[0:0:0:0:0:0:0:1]:8765",
            "[::ffff:127.0.0.1]:8765",
            "[::ffff:7f00:1]:8765",
        ] {
            assert!(host(h), "{h} should pass");
        }
    }

    #[test]
    fn rebinding_and_lookalike_names_fail() {
        for h in [
            "evil.example",
            "evil.example:8765",
            "127.0.0.1.evil.example",
            "127.0.0.1.evil.example:8765",
            "localhost.evil.example:8765",
            "evil-localhost:8765",
            "localhostx:8765",
            "xlocalhost",
            "foo.localhost:8765",
            "a.b.localhost",
            "localhost.",
            "localhost.:8765",
            "127.0.0.1.:8765",
            "[::1].evil.example",
            "0.0.0.0:8765",
            "0.0.0.0",
            "0:8765",
            "192.168.1.10:8765",
            "10.0.0.1:8765",
            "169.254.0.1",
            "128.0.0.1",
            "[::]:8765",
            "[::2]:8765",
            "[fe80::1]:8765",
            "[::ffff:192.168.0.1]:8765",
            "[::ffff:0.0.0.0]:8765",
            "[::127.0.0.1]:8765",
        ] {
            assert!(!host(h), "{h} should fail");
        }
    }

    #[test]
    fn wrong_or_broken_ports_fail() {
        for h in [
            "localhost:80",
            "localhost:8766",
            "127.0.0.1:1",
            "[::1]:80",
            "localhost:",
            "[::1]:",
            "localhost:+8765",
            "localhost:-1",
            "localhost:8765a",
            "localhost:0x223d",
            "localhost:74301", // 8765 + 65536
            "localhost:008765",
            "localhost:08765",
            "localhost:8765:8765",
            "[::1]8765",
            "[::1]:8765:1",
        ] {
            assert!(!host(h), "{h} should fail");
        }
        // The listening port is what matters, whatever it is.
        assert!(host_allowed(Some("localhost:80"), 80));
        assert!(host_allowed(Some("127.0.0.1:1"), 1));
    }

    #[test]
    fn odd_ipv4_spellings_fail() {
        for h in [
            "127.1",
            "127.0.1",
            "2130706433",
            "0x7f000001",
            "0x7f.0.0.1",
            "0177.0.0.1",
            "127.0.0.01",
            "127.000.000.001",
            "127.0.0.1.1",
            "127.0.0.256",
        ] {
            assert!(!host(h), "{h} should fail");
        }
    }

    #[test]
    fn userinfo_paths_and_junk_fail() {
        for h in [
            "",
            " ",
            "localhost :8765",
            " localhost",
            "localhost\t",
            "evil.example@localhost:8765",
            "localhost@evil.example",
            "user:pass@127.0.0.1:8765",
            "localhost/",
            "localhost:8765/",
            "localhost\\@evil.example",
            "localhost?x",
            "localhost#x",
            "127.0.0.1%2eevil.example",
            "[::1%25lo]:8765",
            "[::1%lo]:8765",
            "::1",
            "::1:8765",
            "[::1",
            "::1]",
            "[[::1]]",
            "[]:8765",
            ":8765",
            "[localhost]:8765",
            "[127.0.0.1]:8765",
            "localhost\u{0}",
            "lоcalhost", // Cyrillic o
            "localhost\r\nX-Evil: 1",
        ] {
            assert!(!host(h), "{h:?} should fail");
        }
        assert!(!host_allowed(None, PORT), "missing Host is refused");
    }

    fn allowed(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_origin_passes_and_unlisted_origins_fail() {
        assert!(origin_allowed(None, &[]));
        assert!(origin_allowed(None, &allowed(&["http://localhost:3000"])));
        for o in [
            "http://localhost:8765",
            "http://127.0.0.1:8765",
            "https://evil.example",
        ] {
            assert!(!origin_allowed(Some(o), &[]), "{o} with empty list");
        }
    }

    #[test]
    fn listed_origins_match_exactly_modulo_case_and_default_port() {
        let list = allowed(&[
            "http://localhost:3000",
            "HTTPS://App.Example.com",
            "http://[::1]:4000",
            "http://plain.example:80",
        ]);
        for o in [
            "http://localhost:3000",
            "HTTP://LOCALHOST:3000",
            "https://app.example.com",
            "https://app.example.com:443",
            "http://[::1]:4000",
            "http://[0:0:0:0:0:0:0:1]:4000",
            "http://plain.example",
        ] {
            assert!(origin_allowed(Some(o), &list), "{o} should pass");
        }
        for o in [
            "http://localhost:3001",
            "http://localhost",
            "https://localhost:3000",
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://evil.app.example.com",
            "https://app.example.com.evil.example",
            "https://app.example.com.",
            "http://localhost:3000/",
            "http://localhost:3000/path",
            "http://user@localhost:3000",
            "http://localhost:3000@evil.example",
            "http://localhost:3000 http://evil.example",
            "localhost:3000",
            "//localhost:3000",
            "http://",
            "",
            "null",
            "NULL",
        ] {
            assert!(!origin_allowed(Some(o), &list), "{o:?} should fail");
        }
    }

    #[test]
    fn null_origin_refused_even_when_listed() {
        assert!(!origin_allowed(Some("null"), &allowed(&["null"])));
    }

    #[test]
    fn invalid_allowed_entries_match_nothing() {
        let list = allowed(&["http://localhost:3000/", "*", "http://*.example.com"]);
        for o in ["http://localhost:3000", "http://a.example.com", "*"] {
            assert!(!origin_allowed(Some(o), &list), "{o}");
        }
    }

    #[test]
    fn normalize_origin_forms() {
        assert_eq!(
            normalize_origin("HTTP://LocalHost:80").as_deref(),
            Some("http://localhost")
        );
        assert_eq!(
            normalize_origin("https://x.example:443").as_deref(),
            Some("https://x.example")
        );
        assert_eq!(
            normalize_origin("https://x.example:80").as_deref(),
            Some("https://x.example:80")
        );
        assert_eq!(
            normalize_origin("http://[::FFFF:7F00:1]:1").as_deref(),
            Some("http://[::ffff:127.0.0.1]:1")
        );
        assert_eq!(
            normalize_origin("chrome-extension://abcdef").as_deref(),
            Some("chrome-extension://abcdef")
        );
        for bad in [
            "null",
            "http://a/",
            "1http://a",
            "http://a:99999",
            "http://a b",
            "http://é.example",
        ] {
            assert_eq!(normalize_origin(bad), None, "{bad}");
        }
    }

    #[test]
    fn loopback_listen_addresses() {
        for a in [
            "127.0.0.1:8765",
            "127.0.0.2:1",
            "[::1]:8765",
            "[::ffff:127.0.0.1]:8765",
        ] {
            assert!(is_loopback_listen(&a.parse().unwrap()), "{a}");
        }
        for a in [
            "0.0.0.0:8765",
            "[::]:8765",
            "192.168.1.1:8765",
            "[::ffff:10.0.0.1]:8765",
            "[fe80::1]:8765",
        ] {
            assert!(!is_loopback_listen(&a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn non_loopback_listen_accepts_its_own_ip_literal_only() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let lan = ip("192.0.2.2");
        for h in ["192.0.2.2", "192.0.2.2:8765"] {
            assert!(ip_host_allowed(Some(h), lan, PORT), "{h}");
        }
        for h in [
            "192.0.2.3:8765",
            "192.0.2.2:8766",
            "evil.example:8765",
            "myhost.lan:8765",
            "192.0.2.2.evil.example:8765",
            "[::ffff:192.0.2.3]:8765",
            "3221291522:8765",
            "",
        ] {
            assert!(!ip_host_allowed(Some(h), lan, PORT), "{h}");
        }
        assert!(!ip_host_allowed(None, lan, PORT));
        // The IPv4-mapped spelling of the listen address is the same address.
        assert!(ip_host_allowed(Some("[::ffff:192.0.2.2]:8765"), lan, PORT));
        let v6 = ip("fd00::2");
        assert!(ip_host_allowed(Some("[fd00::2]:8765"), v6, PORT));
        assert!(!ip_host_allowed(Some("[fd00::3]:8765"), v6, PORT));
    }

    #[test]
    fn wildcard_listen_accepts_unicast_ip_literals_but_no_names() {
        let any4: IpAddr = Ipv4Addr::UNSPECIFIED.into();
        let any6: IpAddr = Ipv6Addr::UNSPECIFIED.into();
        for h in ["192.0.2.2:8765", "10.1.2.3", "[fd00::2]:8765"] {
            assert!(ip_host_allowed(Some(h), any4, PORT), "{h}");
            assert!(ip_host_allowed(Some(h), any6, PORT), "{h}");
        }
        for h in [
            "0.0.0.0:8765",
            "[::]:8765",
            "255.255.255.255:8765",
            "224.0.0.1:8765",
            "[ff02::1]:8765",
            "192.0.2.2:1",
            "evil.example:8765",
            "localhost.evil.example:8765",
            "127.1:8765",
        ] {
            assert!(!ip_host_allowed(Some(h), any4, PORT), "{h}");
        }
    }
}
