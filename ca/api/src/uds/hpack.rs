//! The one HPACK question the Unix-socket servers ask: where in a header block is a
//! `:authority` that h2 would refuse, and what same-sized value can stand in for it.
//!
//! This is not an HPACK decoder that hands headers to anyone. It walks a client's header block
//! (RFC 7541), keeping a mirror of the client encoder's dynamic table (the sizes of its
//! entries and which of them are `:authority`), and returns the block with only the values of
//! refused `:authority` fields replaced. Every other byte is copied as it came, so h2 decodes
//! and validates everything else itself, exactly as it would have.
//!
//! A replacement keeps the decoded length of the value it replaces (see [`stand_in`]), so an
//! entry the client inserts into its dynamic table has the same size in h2's table: the two
//! tables evict alike and every later index means the same field on both sides. An empty
//! value inserted into the table cannot be replaced without changing its size; it is left
//! alone (h2 refuses that one request) and references to it are replaced by a literal, which
//! leaves the table untouched.

use std::collections::VecDeque;

/// h2's `SETTINGS_HEADER_TABLE_SIZE` (the protocol default; tonic does not change it): the
/// largest dynamic table the client may use.
pub(crate) const TABLE_LIMIT: usize = 4096;

/// What a replaced empty value becomes.
const EMPTY_STAND_IN: &[u8] = b"localhost";

/// The static table's names (RFC 7541 Appendix A), index 1 first; only their lengths and
/// index 1 (`:authority`) matter here.
const STATIC_NAMES: [&str; 61] = [
    ":authority",
    ":method",
    ":method",
    ":path",
    ":path",
    ":scheme",
    ":scheme",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "accept",
    "access-control-allow-origin",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "cookie",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "link",
    "location",
    "max-forwards",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "refresh",
    "retry-after",
    "server",
    "set-cookie",
    "strict-transport-security",
    "transfer-encoding",
    "user-agent",
    "vary",
    "via",
    "www-authenticate",
];

/// Why a header block could not be walked. The block is then passed on untouched, h2 reports
/// the error to the client, and the connection is no longer rewritten (the mirror of the
/// table may be wrong from here on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum HpackError {
    /// The block ends inside a representation.
    #[error("header block truncated")]
    Truncated,
    /// An integer does not fit the bounds this walker accepts.
    #[error("integer too large")]
    IntegerOverflow,
    /// Index 0, or past the end of the static and dynamic tables.
    #[error("header index out of range")]
    BadIndex,
    /// A dynamic table size update after a field, or above the limit.
    #[error("invalid dynamic table size update")]
    BadSizeUpdate,
    /// A Huffman-coded string that is not a valid encoding.
    #[error("invalid Huffman code")]
    BadHuffman,
}

/// One entry of the mirrored dynamic table.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Its size in the table: name and value lengths plus 32.
    size: usize,
    /// The length of its name, for literals that reuse it.
    name_len: usize,
    /// Its name is `:authority`.
    authority: bool,
    /// Its value is one h2 refuses and that could not be replaced (an empty value).
    refused: bool,
}

/// The mirror of a client encoder's dynamic table, one per connection.
#[derive(Debug)]
pub(crate) struct Walker {
    /// Newest first, as HPACK indexes it.
    entries: VecDeque<Entry>,
    size: usize,
    max_size: usize,
}

impl Default for Walker {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max_size: TABLE_LIMIT,
        }
    }
}

/// A decoded string literal.
struct Literal {
    /// The decoded octets (only materialized when asked for, see [`Walker::string`]).
    value: Vec<u8>,
    /// Its decoded length.
    len: usize,
}

impl Walker {
    /// Walks one complete header block. `Ok(None)`: nothing to replace, pass the block on as it
    /// is. `Ok(Some(block))`: the same block with refused `:authority` values replaced.
    pub(crate) fn rewrite(&mut self, block: &[u8]) -> Result<Option<Vec<u8>>, HpackError> {
        let mut out: Option<Vec<u8>> = None;
        let mut pos = 0;
        let mut fields = 0usize;
        while pos < block.len() {
            let start = pos;
            let first = block[pos];
            if first & 0x80 != 0 {
                // Indexed field.
                let (index, n) = integer(&block[pos..], 7)?;
                pos += n;
                fields += 1;
                let refused = match self.lookup(index)? {
                    Name::Static(i) => i == 1, // `:authority` with an empty value
                    Name::Dynamic(e) => e.authority && e.refused,
                };
                if refused {
                    // A literal without indexing: h2's table is not touched.
                    let o = out.get_or_insert_with(|| block[..start].to_vec());
                    o.push(0x01); // literal without indexing, name = static index 1
                    raw_string(o, EMPTY_STAND_IN);
                } else if let Some(o) = &mut out {
                    o.extend_from_slice(&block[start..pos]);
                }
                continue;
            }
            if first & 0xe0 == 0x20 {
                // Dynamic table size update: only before the first field (as h2 requires).
                if fields > 0 {
                    return Err(HpackError::BadSizeUpdate);
                }
                let (size, n) = integer(&block[pos..], 5)?;
                pos += n;
                if size > TABLE_LIMIT {
                    return Err(HpackError::BadSizeUpdate);
                }
                self.max_size = size;
                self.evict(0);
                if let Some(o) = &mut out {
                    o.extend_from_slice(&block[start..pos]);
                }
                continue;
            }
            // A literal: with incremental indexing (01), without (0000) or never indexed (0001).
            let indexing = first & 0xc0 == 0x40;
            let (name_index, n) = integer(&block[pos..], if indexing { 6 } else { 4 })?;
            pos += n;
            fields += 1;
            let (name_len, authority) = if name_index == 0 {
                let (name, n) = string(&block[pos..], true)?;
                pos += n;
                (name.len, name.value == b":authority")
            } else {
                match self.lookup(name_index)? {
                    Name::Static(i) => (STATIC_NAMES[i - 1].len(), i == 1),
                    Name::Dynamic(e) => (e.name_len, e.authority),
                }
            };
            let value_start = pos;
            let (value, n) = string(&block[pos..], authority)?;
            pos += n;
            let mut refused = false;
            if authority && !accepted(&value.value) {
                let replacement = if value.value.is_empty() {
                    if indexing {
                        // No same-sized stand-in exists: leave it for h2 to refuse.
                        refused = true;
                        None
                    } else {
                        Some(EMPTY_STAND_IN.to_vec())
                    }
                } else {
                    Some(stand_in(&value.value))
                };
                if let Some(replacement) = replacement {
                    let o = out.get_or_insert_with(|| block[..start].to_vec());
                    o.extend_from_slice(&block[start..value_start]);
                    raw_string(o, &replacement);
                } else if let Some(o) = &mut out {
                    o.extend_from_slice(&block[start..pos]);
                }
            } else if let Some(o) = &mut out {
                o.extend_from_slice(&block[start..pos]);
            }
            if indexing {
                self.insert(Entry {
                    size: name_len + value.len + 32,
                    name_len,
                    authority,
                    refused,
                });
            }
        }
        Ok(out)
    }

    fn lookup(&self, index: usize) -> Result<Name<'_>, HpackError> {
        match index {
            0 => Err(HpackError::BadIndex),
            1..=61 => Ok(Name::Static(index)),
            _ => self
                .entries
                .get(index - 62)
                .map(Name::Dynamic)
                .ok_or(HpackError::BadIndex),
        }
    }

    fn insert(&mut self, entry: Entry) {
        if entry.size > self.max_size {
            // RFC 7541 4.4: an entry larger than the table empties it and is not added.
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict(entry.size);
        self.size += entry.size;
        self.entries.push_front(entry);
    }

    /// Evicts the oldest entries until `room` more octets fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            match self.entries.pop_back() {
                Some(e) => self.size -= e.size,
                None => break,
            }
        }
    }
}

enum Name<'a> {
    Static(usize),
    Dynamic(&'a Entry),
}

/// Whether h2 accepts `value` as `:authority`: UTF-8 and an `http::uri::Authority`, the two
/// checks h2 makes before refusing a request as malformed.
pub(crate) fn accepted(value: &[u8]) -> bool {
    std::str::from_utf8(value).is_ok()
        && http::uri::Authority::from_maybe_shared(bytes::Bytes::copy_from_slice(value)).is_ok()
}

/// A valid authority of the same length as `value` (not empty): each octet that may not
/// appear in a host name (RFC 3986 unreserved: letters, digits, `-._~`) becomes `-`, so
/// `/run/meshid/agent/api.sock` becomes `-run-meshid-agent-api.sock` and
/// `%2Frun%2Fapi.sock` becomes `-2Frun-2Fapi.sock`.
pub(crate) fn stand_in(value: &[u8]) -> Vec<u8> {
    value
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                b
            } else {
                b'-'
            }
        })
        .collect()
}

/// Decodes an HPACK integer with an `prefix`-bit prefix (RFC 7541 5.1): its value and the
/// octets it takes. Values above 2^28 are refused, as no field of a header block this walker
/// accepts comes near that.
fn integer(buf: &[u8], prefix: u8) -> Result<(usize, usize), HpackError> {
    let mask = (1usize << prefix) - 1;
    let first = usize::from(*buf.first().ok_or(HpackError::Truncated)?) & mask;
    if first < mask {
        return Ok((first, 1));
    }
    let mut value = mask;
    let mut shift = 0u32;
    for (i, &b) in buf.iter().enumerate().skip(1) {
        value += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
        shift += 7;
        if shift > 21 {
            return Err(HpackError::IntegerOverflow);
        }
    }
    Err(HpackError::Truncated)
}

/// Decodes a string literal (RFC 7541 5.2): the literal and the octets it takes. The decoded
/// octets are kept only when `keep` (names, and values of `:authority`); otherwise only the
/// length is known. A Huffman-coded string that is kept must be the one canonical encoding of
/// its octets (at most 7 bits of padding, all ones, and no EOS): a replaced value is never
/// seen by h2, so it must be exactly as valid as h2 would have required.
fn string(buf: &[u8], keep: bool) -> Result<(Literal, usize), HpackError> {
    let huffman = buf.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let (len, n) = integer(buf, 7)?;
    let end = n.checked_add(len).ok_or(HpackError::Truncated)?;
    let raw = buf.get(n..end).ok_or(HpackError::Truncated)?;
    if !huffman {
        let value = if keep { raw.to_vec() } else { Vec::new() };
        return Ok((Literal { value, len }, end));
    }
    let mut value = Vec::with_capacity(raw.len() * 8 / 5);
    httlib_huffman::decode(raw, &mut value, httlib_huffman::DecoderSpeed::FourBits)
        .map_err(|_| HpackError::BadHuffman)?;
    if keep {
        let mut again = Vec::with_capacity(raw.len());
        if httlib_huffman::encode(&value, &mut again).is_err() || again != raw {
            return Err(HpackError::BadHuffman);
        }
    }
    let len = value.len();
    if !keep {
        value = Vec::new();
    }
    Ok((Literal { value, len }, end))
}

/// Appends `value` as a string literal without Huffman coding.
fn raw_string(out: &mut Vec<u8>, value: &[u8]) {
    push_integer(out, 0x00, 7, value.len());
    out.extend_from_slice(value);
}

/// Appends an HPACK integer with a `prefix`-bit prefix, the high bits of the first octet taken
/// from `flags`.
pub(crate) fn push_integer(out: &mut Vec<u8>, flags: u8, prefix: u8, value: usize) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        // `value < mask <= 255`: it fits the octet.
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

#[cfg(test)]
mod tests;
