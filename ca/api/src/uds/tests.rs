//! The frame layer: what reaches h2 for each way a client can frame a header block, and a real
//! tonic server on a Unix socket behind [`incoming`].

use super::*;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A literal without indexing, new name, raw strings.
fn literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack::push_integer(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack::push_integer(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

fn block(authority: Option<&[u8]>) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
    literal(&mut b, ":path", b"/SpiffeWorkloadAPI/FetchX509SVID");
    if let Some(a) = authority {
        literal(&mut b, ":authority", a);
    }
    literal(&mut b, "content-type", b"application/grpc");
    literal(&mut b, "workload.spiffe.io", b"true");
    b
}

const SETTINGS: u8 = 0x4;
const DATA: u8 = 0x0;

fn connection(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    for f in frames {
        out.extend_from_slice(f);
    }
    out
}

/// Feeds `input` to a reader in pieces of `step` octets; returns what h2 would read.
fn feed(input: &[u8], step: usize) -> (Vec<u8>, Reader) {
    let mut reader = Reader::default();
    let mut out = Vec::new();
    for piece in input.chunks(step) {
        let kept = reader.accept(piece);
        out.extend_from_slice(&piece[..kept]);
        out.extend(reader.take_output());
    }
    reader.finish();
    out.extend(reader.take_output());
    (out, reader)
}

/// Parses the frames after the preface: (type, flags, stream, payload).
fn frames_of(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    assert!(bytes.starts_with(PREFACE));
    let mut rest = &bytes[PREFACE.len()..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
        out.push((rest[3], rest[4], stream, rest[9..9 + len].to_vec()));
        rest = &rest[9 + len..];
    }
    out
}

fn authority_in(fragment: &[u8]) -> Option<Vec<u8>> {
    loona_hpack::Decoder::new()
        .decode(fragment)
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == b":authority")
        .map(|(_, v)| v)
}

const EVERY_STEP: [usize; 5] = [1, 2, 7, 100, 1 << 20];

#[test]
fn a_refused_authority_is_replaced_and_nothing_else_changes() {
    let data = frame(DATA, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]);
    let input = connection(&[
        frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &block(Some(b"/run/x/api.sock")),
        ),
        data.clone(),
    ]);
    for step in EVERY_STEP {
        let (out, reader) = feed(&input, step);
        assert_eq!(reader.rewritten(), 1);
        let frames = frames_of(&out);
        assert_eq!(frames.len(), 3, "settings, headers, data");
        let (kind, flags, stream, payload) = &frames[1];
        assert_eq!(
            (*kind, *flags, *stream),
            (TYPE_HEADERS, FLAG_END_HEADERS, 1)
        );
        assert_eq!(authority_in(payload).unwrap(), b"-run-x-api.sock");
        assert!(out.ends_with(&data));
    }
}

#[test]
fn an_accepted_authority_passes_byte_for_byte() {
    for authority in [Some(&b"localhost"[..]), None] {
        let input = connection(&[
            frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS | FLAG_END_STREAM,
                1,
                &block(authority),
            ),
            frame(0x8, 0, 0, &[0, 0, 1, 0]), // WINDOW_UPDATE
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &block(authority)),
        ]);
        for step in EVERY_STEP {
            let (out, reader) = feed(&input, step);
            assert_eq!(out, input);
            assert_eq!(reader.rewritten(), 0);
        }
    }
}

#[test]
fn continuation_padding_and_priority_are_followed() {
    let fragment = block(Some(b"%2Frun%2Fx%2Fapi.sock"));
    let (a, b) = fragment.split_at(10);
    let (b, c) = b.split_at(20);
    let mut padded = vec![3u8];
    padded.extend_from_slice(&[0x80, 0, 0, 5, 200]); // priority: exclusive, depends on 5
    padded.extend_from_slice(a);
    padded.extend_from_slice(&[0, 0, 0]);
    let input = connection(&[
        frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            1,
            &padded,
        ),
        frame(TYPE_CONTINUATION, 0, 1, b),
        frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, c),
    ]);
    for step in EVERY_STEP {
        let (out, reader) = feed(&input, step);
        assert_eq!(reader.rewritten(), 1);
        let frames = frames_of(&out);
        assert_eq!(frames.len(), 2, "one HEADERS frame replaces the three");
        let (kind, flags, stream, payload) = &frames[1];
        assert_eq!(*kind, TYPE_HEADERS);
        assert_eq!(*flags, FLAG_PRIORITY | FLAG_END_STREAM | FLAG_END_HEADERS);
        assert_eq!(*stream, 1);
        assert_eq!(&payload[..5], &[0x80, 0, 0, 5, 200]);
        assert_eq!(
            authority_in(&payload[5..]).unwrap(),
            b"-2Frun-2Fx-2Fapi.sock"
        );
    }
}

#[test]
fn a_long_rewritten_block_is_cut_into_continuations() {
    let mut fragment = block(Some(b"/run/x/api.sock"));
    for i in 0..40 {
        literal(&mut fragment, &format!("x-pad-{i}"), &[b'p'; 1000]);
    }
    let chunks: Vec<&[u8]> = fragment.chunks(MAX_FRAME).collect();
    let mut frames = vec![];
    for (i, chunk) in chunks.iter().enumerate() {
        let (kind, end) = if i == 0 {
            (TYPE_HEADERS, 0)
        } else {
            (TYPE_CONTINUATION, 0)
        };
        let end = if i == chunks.len() - 1 {
            FLAG_END_HEADERS
        } else {
            end
        };
        frames.push(frame(kind, end, 1, chunk));
    }
    let (out, reader) = feed(&connection(&frames), 4096);
    assert_eq!(reader.rewritten(), 1);
    let frames = frames_of(&out);
    let mut joined = Vec::new();
    for (i, (kind, flags, _, payload)) in frames[1..].iter().enumerate() {
        assert!(payload.len() <= MAX_FRAME);
        assert_eq!(
            *kind,
            if i == 0 {
                TYPE_HEADERS
            } else {
                TYPE_CONTINUATION
            }
        );
        assert_eq!(flags & FLAG_END_HEADERS != 0, i == frames.len() - 2);
        joined.extend_from_slice(payload);
    }
    assert_eq!(authority_in(&joined).unwrap(), b"-run-x-api.sock");
}

#[test]
fn what_h2_must_refuse_reaches_it_untouched() {
    let refused = block(Some(b"/run/x/api.sock"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a frame between HEADERS and CONTINUATION",
            connection(&[
                frame(TYPE_HEADERS, 0, 1, &refused[..5]),
                frame(0x8, 0, 0, &[0, 0, 1, 0]),
                frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &refused[5..]),
            ]),
        ),
        (
            "a CONTINUATION on another stream",
            connection(&[
                frame(TYPE_HEADERS, 0, 1, &refused[..5]),
                frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &refused[5..]),
            ]),
        ),
        (
            "a CONTINUATION after a complete block",
            connection(&[
                frame(
                    TYPE_HEADERS,
                    FLAG_END_HEADERS,
                    1,
                    &block(Some(b"localhost")),
                ),
                frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &refused),
            ]),
        ),
        (
            "a CONTINUATION on a new stream",
            connection(&[frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &refused)]),
        ),
        (
            "a CONTINUATION with no HEADERS",
            connection(&[frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &refused)]),
        ),
        (
            "padding longer than the frame",
            connection(&[frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS | FLAG_PADDED,
                1,
                &[200, 0x82],
            )]),
        ),
        (
            "a HEADERS frame above the minimum maximum frame size",
            connection(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &{
                let mut b = refused.clone();
                literal(&mut b, "x-big", &vec![b'a'; MAX_FRAME]);
                b
            })]),
        ),
        (
            "an HPACK error (index 0)",
            connection(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &{
                let mut b = refused.clone();
                b.push(0x80);
                b
            })]),
        ),
        (
            "not HTTP/2",
            b"GET / HTTP/1.1\r\nHost: /run/x/api.sock\r\n\r\n".to_vec(),
        ),
        (
            "a header block cut off by the end of the connection",
            connection(&[frame(TYPE_HEADERS, 0, 1, &refused)]),
        ),
    ];
    for (name, input) in cases {
        for step in EVERY_STEP {
            let (out, reader) = feed(&input, step);
            assert_eq!(out, input, "{name}, in pieces of {step}");
            assert_eq!(reader.rewritten(), 0, "{name}");
        }
    }
}

#[test]
fn a_large_data_frame_streams_through_without_being_held() {
    let payload = vec![7u8; 100_000];
    let input = connection(&[frame(DATA, 0, 1, &payload)]);
    let mut reader = Reader::default();
    // Everything passes in place: nothing is held or copied, however it is cut.
    let cut = PREFACE.len() + 9 + 9 + 10;
    assert_eq!(reader.accept(&input[..cut]), cut);
    assert_eq!(reader.accept(&input[cut..]), input.len() - cut);
    assert!(reader.take_output().is_empty());
    // Through the buffered path too, the payload is not held until the frame is complete.
    let mut reader = Reader::default();
    reader.push(&input[..cut]);
    assert_eq!(reader.take_output().len(), cut);
}

/// A gRPC service for the end-to-end test: the Workload API, answering every call with
/// `Unimplemented` except `FetchJWTBundles`, which reports the `:authority` it was given.
mod service {
    use crate::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
    use crate::workload::*;
    use tonic::{Request, Response, Status};

    type Stream<T> = futures::stream::BoxStream<'static, Result<T, Status>>;

    pub struct Echo;

    #[tonic::async_trait]
    impl SpiffeWorkloadApi for Echo {
        type FetchX509SVIDStream = Stream<X509svidResponse>;
        type FetchX509BundlesStream = Stream<X509BundlesResponse>;
        type FetchJWTBundlesStream = Stream<JwtBundlesResponse>;

        async fn fetch_x509svid(
            &self,
            _: Request<X509svidRequest>,
        ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
            Err(Status::unimplemented("x509"))
        }
        async fn fetch_x509_bundles(
            &self,
            _: Request<X509BundlesRequest>,
        ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
            Err(Status::unimplemented("bundles"))
        }
        async fn fetch_jwtsvid(
            &self,
            _: Request<JwtsvidRequest>,
        ) -> Result<Response<JwtsvidResponse>, Status> {
            Err(Status::unimplemented("jwt"))
        }
        async fn fetch_jwt_bundles(
            &self,
            request: Request<JwtBundlesRequest>,
        ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
            let peer = request
                .extensions()
                .get::<crate::uds::UdsPeer>()
                .and_then(|p| p.info.peer_cred)
                .map(|c| c.uid());
            Err(Status::permission_denied(format!(
                "uid={}",
                peer.unwrap_or(u32::MAX)
            )))
        }
        async fn validate_jwtsvid(
            &self,
            _: Request<ValidateJwtsvidRequest>,
        ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
            Err(Status::unimplemented("validate"))
        }
    }
}

/// A raw HTTP/2 exchange with a real tonic server: the response headers of stream 1, or the
/// reset or GOAWAY code.
async fn exchange(
    socket: &std::path::Path,
    fragment: &[u8],
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = UnixStream::connect(socket).await.unwrap();
    let input = connection(&[
        frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, fragment),
        frame(DATA, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]),
    ]);
    s.write_all(&input).await.unwrap();
    let mut decoder = loona_hpack::Decoder::new();
    let mut headers = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut head = [0u8; 9];
        tokio::time::timeout_at(deadline, s.read_exact(&mut head))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| format!("closed: {e}"))?;
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0; len];
        s.read_exact(&mut payload).await.unwrap();
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
        match head[3] {
            0x1 if stream == 1 => {
                headers.extend(decoder.decode(&payload).unwrap());
                if head[4] & FLAG_END_STREAM != 0 {
                    return Ok(headers);
                }
            }
            0x3 => {
                return Err(format!(
                    "RST_STREAM {}",
                    u32::from_be_bytes(payload[..4].try_into().unwrap())
                ))
            }
            0x7 => {
                return Err(format!(
                    "GOAWAY {}",
                    u32::from_be_bytes(payload[4..8].try_into().unwrap())
                ))
            }
            _ => {}
        }
    }
}

fn grpc_status(headers: &[(Vec<u8>, Vec<u8>)]) -> (String, String) {
    let get = |name: &[u8]| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    (get(b"grpc-status"), get(b"grpc-message"))
}

/// Serves the test service on a socket in `dir`, through [`incoming`] or (`plain`) straight
/// from the listener as tonic does by default.
fn serve(
    dir: &std::path::Path,
    plain: bool,
) -> (
    std::path::PathBuf,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let socket = dir.join(if plain { "plain.sock" } else { "api.sock" });
    let listener = UnixListener::bind(&socket).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async {
        let _ = stopped.await;
    };
    let server = tonic::transport::Server::builder().add_service(
        crate::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(service::Echo),
    );
    let task = tokio::spawn(async move {
        if plain {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            server
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
                .unwrap();
        } else {
            server
                .serve_with_incoming_shutdown(incoming(listener), shutdown)
                .await
                .unwrap();
        }
    });
    (socket, stop, task)
}

fn request(path: &str, authority: Option<&[u8]>) -> Vec<u8> {
    let mut b = vec![0x83, 0x86];
    literal(&mut b, ":path", path.as_bytes());
    if let Some(a) = authority {
        literal(&mut b, ":authority", a);
    }
    literal(&mut b, "content-type", b"application/grpc");
    b
}

/// Builds a header block around a given `:authority`.
type Build = fn(&[u8]) -> Vec<u8>;

const ECHO: &str = "/SpiffeWorkloadAPI/FetchJWTBundles";

#[tokio::test]
async fn a_tonic_server_answers_every_authority() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, stop, task) = serve(dir.path(), false);
    let (plain, plain_stop, plain_task) = serve(dir.path(), true);
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    let path = socket.to_str().unwrap().as_bytes().to_vec();
    for (authority, plain_answers) in [
        (None, true),
        (Some(&b"localhost"[..]), true),
        (Some(&path[..]), false),
        (Some(b"%2Ftmp%2Fapi.sock"), false),
        (Some(b""), false),
    ] {
        let headers = exchange(&socket, &request(ECHO, authority)).await;
        let headers = headers.unwrap_or_else(|e| panic!("{authority:?}: {e}"));
        assert_eq!(
            grpc_status(&headers),
            ("7".to_owned(), format!("uid={uid}")),
            "{authority:?}: the service answered, with the caller's credentials"
        );
        // Without this layer, h2 resets the stream before the service sees it.
        let without = exchange(&plain, &request(ECHO, authority)).await;
        assert_eq!(without.is_ok(), plain_answers, "{authority:?}: {without:?}");
        if !plain_answers {
            assert_eq!(without, Err("RST_STREAM 1".to_owned()));
        }
    }
    let _ = (stop.send(()), plain_stop.send(()));
    task.await.unwrap();
    plain_task.await.unwrap();
}

#[tokio::test]
async fn malformed_requests_are_refused_exactly_as_without_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, stop, task) = serve(dir.path(), false);
    let (plain, plain_stop, plain_task) = serve(dir.path(), true);
    // Each case once with an authority h2 accepts (for the server without the layer) and once
    // with a socket path (rewritten by the layer): both must be refused the same way.
    let cases: Vec<(&str, Build)> = vec![
        ("no :path", |a| {
            let mut b = vec![0x83, 0x86];
            literal(&mut b, ":authority", a);
            b
        }),
        ("no :method", |a| {
            let mut b = vec![0x86];
            literal(&mut b, ":path", ECHO.as_bytes());
            literal(&mut b, ":authority", a);
            b
        }),
        ("no :scheme", |a| {
            let mut b = vec![0x83];
            literal(&mut b, ":path", ECHO.as_bytes());
            literal(&mut b, ":authority", a);
            b
        }),
        ("an empty :path", |a| {
            let mut b = vec![0x83, 0x86];
            literal(&mut b, ":path", b"");
            literal(&mut b, ":authority", a);
            b
        }),
        ("an upper-case name", |a| {
            let mut b = request(ECHO, Some(a));
            literal(&mut b, "X-Upper", b"1");
            b
        }),
        ("a connection-specific header", |a| {
            let mut b = request(ECHO, Some(a));
            literal(&mut b, "connection", b"keep-alive");
            b
        }),
        ("a value with a newline", |a| {
            let mut b = request(ECHO, Some(a));
            literal(&mut b, "x-evil", b"a\r\nb");
            b
        }),
        ("two :authority fields", |a| {
            let mut b = request(ECHO, Some(a));
            literal(&mut b, ":authority", a);
            b
        }),
        ("an unknown pseudo-header", |a| {
            let mut b = request(ECHO, Some(a));
            literal(&mut b, ":bogus", b"1");
            b
        }),
        ("a pseudo-header after a regular one", |a| {
            let mut b = vec![0x83, 0x86];
            literal(&mut b, "content-type", b"application/grpc");
            literal(&mut b, ":path", ECHO.as_bytes());
            literal(&mut b, ":authority", a);
            b
        }),
        ("an HPACK error", |a| {
            let mut b = request(ECHO, Some(a));
            b.push(0x80);
            b
        }),
    ];
    let path = socket.to_str().unwrap().as_bytes().to_vec();
    for (name, build) in cases {
        let reference = exchange(&plain, &build(b"localhost")).await;
        assert!(
            reference.is_err(),
            "{name}: h2 itself accepts it: {reference:?}"
        );
        for authority in [&b"localhost"[..], &path[..], b"%2Ftmp%2Fapi.sock"] {
            assert_eq!(
                exchange(&socket, &build(authority)).await,
                reference,
                "{name} with authority {:?}",
                String::from_utf8_lossy(authority)
            );
        }
    }
    let _ = (stop.send(()), plain_stop.send(()));
    task.await.unwrap();
    plain_task.await.unwrap();
}

#[tokio::test]
async fn a_connection_without_a_request_is_closed_and_one_with_a_request_is_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let admission = crate::uds::Admission::new(crate::uds::Limits {
        first_request_timeout: std::time::Duration::from_millis(300),
        ..crate::uds::Limits::default()
    });
    let server = tonic::transport::Server::builder().add_service(
        crate::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(service::Echo),
    );
    let a = admission.clone();
    let task = tokio::spawn(async move {
        let _ = server
            .serve_with_incoming(crate::uds::incoming_with(listener, a))
            .await;
    });
    let timeout = std::time::Duration::from_secs(3);
    // Silent, and with the preface only: closed after the deadline.
    for first in [&b""[..], PREFACE] {
        let mut s = tokio::net::UnixStream::connect(&socket).await.unwrap();
        s.write_all(first).await.unwrap();
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(timeout, s.read_to_end(&mut rest))
            .await
            .expect("closed")
            .ok();
        assert!(started.elapsed() >= std::time::Duration::from_millis(250));
    }
    assert_eq!(admission.closed_idle(), 2);
    // A request in time: the connection stays past the deadline.
    let headers = exchange(&socket, &request(ECHO, Some(b"localhost"))).await;
    assert!(headers.is_ok(), "{headers:?}");
    task.abort();
}
