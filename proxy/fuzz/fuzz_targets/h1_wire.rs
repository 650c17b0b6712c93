//! The HTTP/1 fast path's wire pieces (`meshid_proxy::h1::wire`) on any bytes: no panic, and
//! what they let through is sound.
//! - A request head the fast path takes is rewritten into a head that parses again as
//!   HTTP/1.1, with the same method, the normalized path, no hop-by-hop header (but
//!   `Transfer-Encoding: chunked` when the body is chunked) and the same framing; taking the
//!   rewritten head again gives the same rewrite.
//! - A response head is rewritten into one that parses again with the same status.
//! - The chunked scanner, fed the same bytes in pieces of any size, agrees with itself fed
//!   them at once: same end, same payload, same verdict.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_proxy::h1::wire::{parse_request, parse_response, Chunked, Framing, Parsed};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    if let Parsed::Head(h) = parse_request(rest, 64) {
        assert!(h.len <= rest.len());
        let mut again = h.out.clone();
        again.extend_from_slice(b"\r\n");
        let Parsed::Head(h2) = parse_request(&again, 64) else {
            panic!("rewritten head not taken: {:?}", String::from_utf8_lossy(&again));
        };
        assert_eq!(h2.len, again.len());
        assert_eq!((h2.method(), h2.path(), &h2.body), (h.method(), h.path(), &h.body));
        assert_eq!(h2.out, h.out);
        assert!(!h2.close);
        let text = String::from_utf8_lossy(&h.out).to_ascii_lowercase();
        for name in ["\r\nconnection:", "\r\nkeep-alive:", "\r\nte:", "\r\nupgrade:", "\r\nproxy-"] {
            assert!(!text.contains(name), "{name} left in {text:?}");
        }
        assert_eq!(
            text.contains("\r\ntransfer-encoding:"),
            matches!(h.body, Framing::Chunked(_))
        );
    }
    if let Ok(Some(r)) = parse_response(rest, flags & 1 == 1) {
        let mut again = r.out.clone();
        again.extend_from_slice(b"\r\n");
        let r2 = parse_response(&again, flags & 1 == 1)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&again)))
            .expect("complete");
        assert_eq!(r2.status, r.status);
        assert_eq!(r2.out, r.out);
    }
    let whole = {
        let mut c = Chunked::default();
        c.scan(rest).map(|n| (n, c.data, c.done()))
    };
    let step = usize::from(flags % 16) + 1;
    let mut c = Chunked::default();
    let mut at = 0;
    let pieces = loop {
        if at >= rest.len() || c.done() {
            break Ok((at, c.data, c.done()));
        }
        let end = (at + step).min(rest.len());
        match c.scan(&rest[at..end]) {
            Ok(n) => {
                at += n;
                if at < end {
                    break Ok((at, c.data, c.done()));
                }
            }
            Err(e) => break Err(e),
        }
    };
    assert_eq!(whole.is_ok(), pieces.is_ok(), "{whole:?} {pieces:?}");
    if let (Ok(w), Ok(p)) = (whole, pieces) {
        assert_eq!(w, p);
    }
});
