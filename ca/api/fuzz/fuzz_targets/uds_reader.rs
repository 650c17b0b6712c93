//! The Unix-socket frame layer (`meshid_api::uds::Reader`), two ways:
//!
//! - Any bytes, cut anywhere: no panic, the same output however the input is cut, and when
//!   nothing was rewritten the output is the input, byte for byte.
//! - Requests a client could send (header lists encoded by httlib-hpack with Huffman coding,
//!   indexing and indexed references, one encoder per connection, blocks cut into CONTINUATION
//!   frames): what h2 decodes from the output (loona-hpack, one table per connection) is
//!   exactly what was sent, except that each `:authority` h2 refuses is now one it accepts, of
//!   the same length (`localhost` for an empty one that was not indexed).
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use meshid_api::uds::Reader;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn feed(input: &[u8], cuts: &[usize]) -> (Vec<u8>, u64) {
    let mut reader = Reader::default();
    let mut out = Vec::new();
    let mut start = 0;
    // As `UdsConnection::poll_read` does: what passes in place, then what was held back.
    for &cut in cuts {
        let end = (start + cut).min(input.len());
        let kept = reader.accept(&input[start..end]);
        out.extend_from_slice(&input[start..start + kept]);
        out.extend(reader.take_output());
        start = end;
    }
    let kept = reader.accept(&input[start..]);
    out.extend_from_slice(&input[start..start + kept]);
    out.extend(reader.take_output());
    reader.finish();
    out.extend(reader.take_output());
    (out, reader.rewritten())
}

fn accepted(v: &[u8]) -> bool {
    std::str::from_utf8(v).is_ok()
        && http::uri::Authority::from_maybe_shared(bytes::Bytes::copy_from_slice(v)).is_ok()
}

fn any_bytes(u: &mut Unstructured<'_>) -> Result<()> {
    let with_preface: bool = u.arbitrary()?;
    let cuts: Vec<u8> = u.arbitrary()?;
    let mut input = if with_preface { PREFACE.to_vec() } else { Vec::new() };
    let len = u.len();
    input.extend_from_slice(u.bytes(len)?);
    let cuts: Vec<usize> = cuts.iter().map(|&c| usize::from(c) + 1).collect();
    let (whole, rewritten) = feed(&input, &[]);
    let (pieces, _) = feed(&input, &cuts);
    assert_eq!(whole, pieces, "the output depends on how the input was cut");
    if rewritten == 0 {
        assert_eq!(whole, input);
    }
    Ok(())
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

fn requests(u: &mut Unstructured<'_>) -> Result<()> {
    const NAMES: [&str; 6] = [":authority", "content-type", "x-a", "x-bb", "te", "user-agent"];
    let mut encoder = httlib_hpack::Encoder::default();
    let mut input = PREFACE.to_vec();
    frame(&mut input, 0x4, 0, 0, &[]);
    let mut sent = Vec::new();
    let n = u.int_in_range(1..=8)?;
    for i in 0..n {
        let mut headers = vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (b":path".to_vec(), b"/SpiffeWorkloadAPI/FetchX509SVID".to_vec()),
        ];
        for _ in 0..u.int_in_range(0..=6)? {
            let name = NAMES[u.choose_index(NAMES.len())?];
            let value: Vec<u8> = if u.arbitrary()? {
                b"/run/meshid/agent/api.sock".to_vec()
            } else {
                let len = u.int_in_range(0..=40)?;
                u.bytes(len)?.to_vec()
            };
            headers.push((name.as_bytes().to_vec(), value));
        }
        let mut block = Vec::new();
        for (name, value) in &headers {
            let flags = u.int_in_range(0..=0x1f)?;
            if encoder
                .encode((name.clone(), value.clone(), flags), &mut block)
                .is_err()
            {
                return Ok(());
            }
        }
        // Cut the block into a HEADERS frame and CONTINUATIONs.
        let stream = 1 + 2 * i as u32;
        let first = u.int_in_range(0..=block.len())?;
        let (head, mut rest) = block.split_at(first);
        frame(&mut input, 0x1, if rest.is_empty() { 0x4 } else { 0 }, stream, head);
        while !rest.is_empty() {
            let n = u.int_in_range(1..=rest.len())?;
            let (chunk, tail) = rest.split_at(n);
            frame(&mut input, 0x9, if tail.is_empty() { 0x4 } else { 0 }, stream, chunk);
            rest = tail;
        }
        sent.push(headers);
    }
    let (out, _) = feed(&input, &[]);
    // Decode what h2 would read.
    assert!(out.starts_with(PREFACE));
    let mut rest = &out[PREFACE.len()..];
    let mut decoder = loona_hpack::Decoder::new();
    let mut block = Vec::new();
    let mut received = Vec::new();
    while !rest.is_empty() {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        assert!(len <= 16_384, "a frame above the minimum maximum frame size");
        if kind == 0x1 || kind == 0x9 {
            block.extend_from_slice(&rest[9..9 + len]);
            if flags & 0x4 != 0 {
                received.push(decoder.decode(&block).expect("h2 decodes what the layer passes"));
                block.clear();
            }
        }
        rest = &rest[9 + len..];
    }
    assert_eq!(received.len(), sent.len());
    for (got, want) in received.iter().zip(&sent) {
        assert_eq!(got.len(), want.len());
        for ((gn, gv), (wn, wv)) in got.iter().zip(want) {
            assert_eq!(gn, wn);
            if wn == b":authority" && !accepted(wv) {
                assert!(accepted(gv) || wv.is_empty(), "{gv:?} from {wv:?}");
                if !wv.is_empty() {
                    assert_eq!(gv.len(), wv.len());
                }
            } else {
                assert_eq!(gv, wv);
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = match u.arbitrary::<bool>() {
        Ok(true) => requests(&mut u),
        _ => any_bytes(&mut u),
    };
});
