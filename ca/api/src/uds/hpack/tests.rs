//! The walker against two independent HPACK implementations: httlib-hpack encodes as a client
//! would (Huffman, incremental indexing, indexed references), loona-hpack decodes as h2 does,
//! with one table per connection.

use super::*;

type Header = (Vec<u8>, Vec<u8>);

fn h(name: &str, value: &str) -> Header {
    (name.as_bytes().to_vec(), value.as_bytes().to_vec())
}

/// A request's header list with `authority` (if any) where clients put it.
fn request(authority: Option<&str>) -> Vec<Header> {
    let mut headers = vec![
        h(":method", "POST"),
        h(":scheme", "http"),
        h(":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
    ];
    if let Some(a) = authority {
        headers.push(h(":authority", a));
    }
    headers.extend([
        h("content-type", "application/grpc"),
        h("te", "trailers"),
        h("workload.spiffe.io", "true"),
        h(
            "user-agent",
            "grpc-python/1.85.3 grpc-c/51.0.0 (linux; chttp2)",
        ),
    ]);
    headers
}

/// Client flags: every combination a real encoder uses.
const FLAG_SETS: [u8; 6] = [
    0,
    httlib_hpack::Encoder::HUFFMAN_NAME | httlib_hpack::Encoder::HUFFMAN_VALUE,
    httlib_hpack::Encoder::WITH_INDEXING,
    httlib_hpack::Encoder::WITH_INDEXING
        | httlib_hpack::Encoder::HUFFMAN_VALUE
        | httlib_hpack::Encoder::BEST_FORMAT,
    httlib_hpack::Encoder::NEVER_INDEXED | httlib_hpack::Encoder::HUFFMAN_VALUE,
    httlib_hpack::Encoder::BEST_FORMAT | httlib_hpack::Encoder::HUFFMAN_VALUE,
];

fn encode(encoder: &mut httlib_hpack::Encoder<'_>, headers: &[Header], flags: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, v) in headers {
        encoder
            .encode((n.clone(), v.clone(), flags), &mut out)
            .unwrap();
    }
    out
}

/// What h2 would see: each block decoded by one loona-hpack decoder (the connection's table).
fn decode(decoder: &mut loona_hpack::Decoder<'_>, block: &[u8]) -> Vec<Header> {
    decoder.decode(block).unwrap()
}

/// Sends `requests` over one connection through the walker; returns what h2 decodes.
fn through_walker(requests: &[Vec<Header>], flags: u8) -> (Vec<Vec<Header>>, usize) {
    let mut encoder = httlib_hpack::Encoder::default();
    let mut walker = Walker::default();
    let mut decoder = loona_hpack::Decoder::new();
    let mut rewritten = 0;
    let decoded = requests
        .iter()
        .map(|r| {
            let block = encode(&mut encoder, r, flags);
            let out = match walker.rewrite(&block).unwrap() {
                Some(b) => {
                    rewritten += 1;
                    b
                }
                None => block,
            };
            decode(&mut decoder, &out)
        })
        .collect();
    (decoded, rewritten)
}

fn authority_of(headers: &[Header]) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n == b":authority")
        .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
}

#[test]
fn static_names_agree_with_an_independent_decoder() {
    let mut decoder = loona_hpack::Decoder::new();
    for (i, name) in STATIC_NAMES.iter().enumerate() {
        let headers = decoder.decode(&[0x80 | (i as u8 + 1)]).unwrap();
        assert_eq!(headers[0].0, name.as_bytes(), "static index {}", i + 1);
    }
}

#[test]
fn integers_round_trip_at_every_prefix() {
    for prefix in 1..=8u8 {
        for value in (0..300).chain([4095, 4096, 16_383, 65_535, 1 << 20, (1 << 28) - 1]) {
            let mut buf = Vec::new();
            push_integer(&mut buf, 0, prefix, value);
            assert_eq!(
                integer(&buf, prefix),
                Ok((value, buf.len())),
                "{value}/{prefix}"
            );
            assert_eq!(
                integer(&buf[..buf.len() - 1], prefix),
                Err(HpackError::Truncated)
            );
        }
    }
    // Five continuation octets exceed what any header block here needs.
    assert_eq!(
        integer(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0x01], 7),
        Err(HpackError::IntegerOverflow)
    );
}

#[test]
fn refused_authorities_become_valid_and_keep_their_length() {
    let forms = [
        "/run/meshid/agent/api.sock",
        "%2Frun%2Fmeshid%2Fagent%2Fapi.sock",
        "unix:/run/meshid/agent/api.sock",
        "a b",
        "caf\u{e9}",
        "x@",
        "[::1",
    ];
    for form in forms {
        assert!(
            !accepted(form.as_bytes()),
            "{form} should be one h2 refuses"
        );
        for flags in FLAG_SETS {
            let (decoded, rewritten) = through_walker(&[request(Some(form))], flags);
            let authority = authority_of(&decoded[0]).unwrap();
            assert!(accepted(authority.as_bytes()), "{form}: {authority}");
            assert_eq!(authority.len(), form.len(), "{form}");
            assert_eq!(rewritten, 1);
            // Everything else is exactly what the client sent.
            let mut expected = request(Some(form));
            expected.retain(|(n, _)| n != b":authority");
            let mut got = decoded[0].clone();
            got.retain(|(n, _)| n != b":authority");
            assert_eq!(got, expected, "{form} with flags {flags}");
        }
    }
    assert_eq!(
        stand_in(b"/run/meshid/agent/api.sock"),
        b"-run-meshid-agent-api.sock"
    );
    assert_eq!(stand_in(b"%2Frun%2Fapi.sock"), b"-2Frun-2Fapi.sock");
}

#[test]
fn accepted_authorities_and_absent_ones_pass_untouched() {
    for authority in [
        Some("localhost"),
        Some("[::]:50051"),
        Some("example.org:443"),
        None,
    ] {
        for flags in FLAG_SETS {
            let mut encoder = httlib_hpack::Encoder::default();
            let block = encode(&mut encoder, &request(authority), flags);
            assert_eq!(
                Walker::default().rewrite(&block),
                Ok(None),
                "{authority:?} with flags {flags}"
            );
        }
    }
}

#[test]
fn tables_stay_in_step_across_requests_on_one_connection() {
    // Indexed references to an inserted (and rewritten) authority, interleaved with other
    // insertions, and a table small enough that entries are evicted.
    let path = "/run/meshid/agent/api.sock";
    let requests: Vec<Vec<Header>> = (0..40)
        .map(|i| {
            let mut r = request(Some(if i % 3 == 0 { "localhost" } else { path }));
            r.push(h("x-request", &format!("{i:0>200}")));
            r
        })
        .collect();
    for flags in FLAG_SETS {
        let (decoded, _) = through_walker(&requests, flags);
        for (i, headers) in decoded.iter().enumerate() {
            let want = if i % 3 == 0 {
                "localhost".to_owned()
            } else {
                "-run-meshid-agent-api.sock".to_owned()
            };
            assert_eq!(
                authority_of(headers),
                Some(want),
                "request {i}, flags {flags}"
            );
            assert_eq!(
                headers.last().unwrap(),
                &h("x-request", &format!("{i:0>200}"))
            );
        }
    }
}

#[test]
fn empty_authorities() {
    // Without indexing: replaced by `localhost`.
    let mut block = Vec::new();
    block.extend([0x83, 0x86, 0x84]); // POST, http, /
    block.extend([0x01, 0x00]); // :authority "" without indexing (name = static 1)
    let out = Walker::default().rewrite(&block).unwrap().unwrap();
    let headers = loona_hpack::Decoder::new().decode(&out).unwrap();
    assert_eq!(authority_of(&headers).as_deref(), Some("localhost"));

    // The static entry itself (index 1 is `:authority` with an empty value).
    let out = Walker::default()
        .rewrite(&[0x83, 0x86, 0x84, 0x81])
        .unwrap()
        .unwrap();
    let headers = loona_hpack::Decoder::new().decode(&out).unwrap();
    assert_eq!(authority_of(&headers).as_deref(), Some("localhost"));

    // With incremental indexing no stand-in of the same size exists: the block passes as it
    // is (h2 refuses that request), and later references to the entry become literals, so
    // the tables stay in step.
    let mut walker = Walker::default();
    let mut decoder = loona_hpack::Decoder::new();
    let first = [0x83, 0x86, 0x84, 0x41, 0x00]; // :authority "" with indexing
    assert_eq!(walker.rewrite(&first), Ok(None));
    assert_eq!(
        authority_of(&decoder.decode(&first).unwrap()).as_deref(),
        Some("")
    );
    let second = [0x83, 0x86, 0x84, 0xbe]; // index 62: that entry
    let out = walker.rewrite(&second).unwrap().unwrap();
    let headers = decoder.decode(&out).unwrap();
    assert_eq!(authority_of(&headers).as_deref(), Some("localhost"));
    // The decoder's table still has the empty entry at 62, as the client's does.
    let third = decoder.decode(&[0xbe]).unwrap();
    assert_eq!(third, vec![h(":authority", "")]);
}

#[test]
fn malformed_blocks_are_refused_not_repaired() {
    // `:authority` (literal without indexing, name index 1), Huffman-coded "a" (00011)
    // padded with zeros instead of ones: not a valid encoding.
    let huffman_authority = [0x01, 0x81, 0b0001_1000];
    let cases: [(&str, &[u8], HpackError); 7] = [
        ("index 0", &[0x80], HpackError::BadIndex),
        (
            "dynamic index past the table",
            &[0xbe],
            HpackError::BadIndex,
        ),
        (
            "size update after a field",
            &[0x82, 0x20],
            HpackError::BadSizeUpdate,
        ),
        (
            "size update above the limit",
            &[0x3f, 0xe2, 0x1f],
            HpackError::BadSizeUpdate,
        ),
        (
            "string past the block",
            &[0x01, 0x05, b'a'],
            HpackError::Truncated,
        ),
        (
            "literal name truncated",
            &[0x00, 0x85, 0xff],
            HpackError::Truncated,
        ),
        (
            "huffman padding of zeros",
            &huffman_authority,
            HpackError::BadHuffman,
        ),
    ];
    for (name, block, error) in cases {
        assert_eq!(Walker::default().rewrite(block), Err(error), "{name}");
    }
    // A size update at the start is fine, and shrinks the table.
    let mut walker = Walker::default();
    assert_eq!(walker.rewrite(&[0x20, 0x82]), Ok(None));
    assert_eq!(walker.max_size, 0);
}
