//! Hop-by-hop header removal and upgrade offers (`meshid_proxy::http::strip_hop_by_hop`) on
//! any header list: no panic; afterwards no `Connection`, `Upgrade`, `Keep-Alive`, `TE` (but
//! `TE: trailers` on HTTP/2), `HTTP2-Settings`, `Transfer-Encoding`, `Proxy-*` or header that
//! `Connection` named is left; HTTP/2 is never offered; and a second pass changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_proxy::http::strip_hop_by_hop;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let h2 = flags & 1 == 1;
    let mut headers = http::HeaderMap::new();
    let mut connection_named = Vec::new();
    for line in rest.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(&line[..colon]),
            http::HeaderValue::from_bytes(&line[colon + 1..]),
        ) else {
            continue;
        };
        if name == http::header::CONNECTION {
            for token in value.to_str().unwrap_or_default().split(',') {
                if let Ok(n) = http::HeaderName::from_bytes(token.trim().as_bytes()) {
                    connection_named.push(n);
                }
            }
        }
        headers.append(name, value);
    }
    let offers = strip_hop_by_hop(&mut headers, h2);
    for o in &offers {
        assert!(!matches!(o.name.as_str(), "h2c" | "h2" | "http"), "{o:?}");
        assert_eq!(o.name, o.name.to_ascii_lowercase());
        assert!(!o.token.is_empty());
    }
    assert!(!h2 || offers.is_empty());
    for name in ["connection", "upgrade", "keep-alive", "http2-settings", "transfer-encoding"] {
        assert!(!headers.contains_key(name), "{name} left");
    }
    if let Some(te) = headers.get("te") {
        assert!(h2 && te == "trailers");
    }
    assert!(headers.keys().all(|k| !k.as_str().starts_with("proxy-")));
    for n in &connection_named {
        assert!(!headers.contains_key(n) || (n == "te" && h2), "{n} left");
    }
    let once = headers.clone();
    assert!(strip_hop_by_hop(&mut headers, h2).is_empty());
    assert_eq!(once, headers);
});
