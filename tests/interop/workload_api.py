"""Independent clients against meshid's Unix sockets, run by tests/tests/e2e/interop.rs.

py-spiffe (PyPI `spiffe`, on gRPC C-core) as a workload would use it, the raw gRPC C-core
stubs for what py-spiffe hides (hints, several SVIDs, status codes), `cryptography`'s X.509
path validation and PyJWT as independent verifiers.

Each mode prints one line per check, `ok NAME` or `FAIL NAME: DETAIL`, and exits 1 if any
check failed, so the Rust test shows every result at once.

    workload_api.py check     SOCKET SPEC_JSON   the caller's whole contract
    workload_api.py denied    SOCKET JWT ID      a caller with no entry gets PermissionDenied,
                                                 and may still validate JWT (for ID)
    workload_api.py withdraw  SOCKET             a stream ends with PermissionDenied once the
                                                 caller's entries are deleted (waits for a
                                                 line on stdin after `streaming`)
    workload_api.py authority SOCKET KIND        C-core with each :authority form, on the
                                                 agent's socket (KIND agent) or the CA's admin
                                                 socket (KIND admin)
    workload_api.py raw       SOCKET KIND        an independent HTTP/2 stack (hyper-h2 and its
                                                 HPACK encoder, with Huffman coding and indexing)
                                                 sending each :authority form, several requests
                                                 per connection, and malformed requests that
                                                 must still be refused
    workload_api.py crl       SOCKET SPEC_JSON   after a revocation: the crl fields of
                                                 FetchX509SVID and FetchX509Bundles (through
                                                 py-spiffe's own generated stubs: its client API
                                                 does not surface them) hold a CRL that
                                                 `cryptography` verifies against the SVID's
                                                 issuer and that lists the revoked serial; the
                                                 SVID served now is not revoked
    workload_api.py latency   SOCKET N           first FetchX509SVID message through py-spiffe,
                                                 N samples, one new client each; prints µs
"""

import base64
import json
import os
import sys
import threading
import time
import traceback

import grpc

RESULTS = []


def check(name, fn):
    try:
        fn()
        RESULTS.append(True)
        print(f"ok {name}", flush=True)
    except Exception as e:  # noqa: BLE001 - every failure is reported, not raised
        RESULTS.append(False)
        detail = f"{type(e).__name__}: {e}".replace("\n", " | ")
        print(f"FAIL {name}: {detail}", flush=True)
        traceback.print_exc(file=sys.stderr)


def finish():
    sys.exit(0 if RESULTS and all(RESULTS) else 1)


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def raw_stub(socket, authority=None, header=True):
    """The Workload API stub straight on C-core: no py-spiffe interceptor unless `header`."""
    from spiffe._proto import workload_pb2_grpc

    options = [] if authority is None else [("grpc.default_authority", authority)]
    channel = grpc.insecure_channel(f"unix:{socket}", options=options)
    metadata = (("workload.spiffe.io", "true"),) if header else ()
    return workload_pb2_grpc.SpiffeWorkloadAPIStub(channel), metadata, channel


def first_message(call):
    try:
        return next(call)
    finally:
        call.cancel()


def rpc_code(fn):
    """The status code of a call expected to fail, and its details."""
    try:
        result = fn()
        if hasattr(result, "__next__"):
            first_message(result)
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError("the call succeeded")


def verify_chain(leaf_der, intermediates_der, roots_der, spiffe_id):
    """X.509 path validation by `cryptography` (its own Rust verifier, not ours)."""
    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store

    store = Store([x509.load_der_x509_certificate(r) for r in roots_der])
    leaf = x509.load_der_x509_certificate(leaf_der)
    inter = [x509.load_der_x509_certificate(c) for c in intermediates_der]
    verifier = PolicyBuilder().store(store).build_client_verifier()
    verified = verifier.verify(leaf, inter)
    uris = [
        n.value
        for n in verified.subjects or []
        if isinstance(n, x509.UniformResourceIdentifier)
    ]
    expect(uris == [spiffe_id], f"URI SANs {uris}, expected [{spiffe_id}]")


def mode_check(socket, spec):
    import jwt as pyjwt
    from cryptography.hazmat.primitives import serialization
    from spiffe import JwtSource, SpiffeId, WorkloadApiClient, X509Source
    from spiffe._proto import workload_pb2

    ids = spec["ids"]  # in the order the agent must list them; the first is the default
    hints = spec["hints"]
    td = spec["trust_domain"]
    client = WorkloadApiClient(socket_path=f"unix:{socket}", default_timeout=15)

    def fetch_x509_svid():
        svid = client.fetch_x509_svid()
        expect(str(svid.spiffe_id) == ids[0], f"default SVID {svid.spiffe_id}, expected {ids[0]}")
        bundle = client.fetch_x509_bundles().get_bundle_for_trust_domain(
            svid.spiffe_id.trust_domain
        )
        expect(bundle is not None, f"no bundle for {svid.spiffe_id.trust_domain}")
        chain = [c.public_bytes(serialization.Encoding.DER) for c in svid.cert_chain]
        roots = [a.public_bytes(serialization.Encoding.DER) for a in bundle.x509_authorities]
        verify_chain(chain[0], chain[1:], roots, ids[0])
        # The private key matches the leaf.
        pub = svid.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        leaf_pub = svid.leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        expect(pub == leaf_pub, "private key does not match the leaf")

    check("py-spiffe fetch_x509_svid: default SVID, verified by cryptography", fetch_x509_svid)

    def fetch_x509_svids():
        svids = client.fetch_x509_svids()
        expect([str(s.spiffe_id) for s in svids] == ids, f"{[str(s.spiffe_id) for s in svids]}")
        ctx = client.fetch_x509_context()
        expect(str(ctx.default_svid.spiffe_id) == ids[0], "default of the context")

    check("py-spiffe fetch_x509_svids: every SVID, the default first", fetch_x509_svids)

    def hints_on_the_wire():
        stub, md, ch = raw_stub(socket)
        resp = first_message(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=md, timeout=15))
        got = [(s.spiffe_id, s.hint) for s in resp.svids]
        expect(got == list(zip(ids, hints)), f"(id, hint) {got}")
        expect(all(s.bundle for s in resp.svids), "every SVID carries the bundle")
        jwt_resp = stub.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=["billing"]), metadata=md, timeout=15
        )
        got = [(s.spiffe_id, s.hint) for s in jwt_resp.svids]
        expect(got == list(zip(ids, hints)), f"JWT-SVIDs (id, hint) {got}")
        ch.close()

    check("X509SVID and JWTSVID hints, one SVID per entry, in order", hints_on_the_wire)

    def fetch_x509_bundles():
        bundles = client.fetch_x509_bundles()
        b = bundles.get_bundle_for_trust_domain(SpiffeId(ids[0]).trust_domain)
        expect(b is not None and len(b.x509_authorities) >= 1, "local trust domain bundle")

    check("py-spiffe fetch_x509_bundles", fetch_x509_bundles)

    token_holder = {}

    def fetch_jwt_svid():
        svid = client.fetch_jwt_svid(audience={"billing"})
        expect(str(svid.spiffe_id) == ids[0], f"JWT-SVID for {svid.spiffe_id}")
        token_holder["token"] = svid.token
        # PyJWT verifies it with the key the JWT bundle publishes.
        bundles = client.fetch_jwt_bundles()
        bundle = bundles.get_bundle_for_trust_domain(SpiffeId(ids[0]).trust_domain)
        expect(bundle is not None, "JWT bundle for the trust domain")
        header = pyjwt.get_unverified_header(svid.token)
        expect(header.get("alg") == "ES256", f"alg {header.get('alg')}")
        key = bundle.get_jwt_authority(header["kid"])
        expect(key is not None, f"kid {header['kid']} in the bundle")
        claims = pyjwt.decode(svid.token, key=key, algorithms=["ES256"], audience="billing")
        expect(claims["sub"] == ids[0], f"sub {claims['sub']}")
        expect(claims["exp"] > time.time(), "not expired")
        # The subject may be chosen among the caller's identities.
        other = client.fetch_jwt_svid(audience={"billing"}, subject=SpiffeId(ids[-1]))
        expect(str(other.spiffe_id) == ids[-1], f"JWT-SVID for the chosen {other.spiffe_id}")

    check("py-spiffe fetch_jwt_svid, verified by PyJWT against the JWT bundle", fetch_jwt_svid)

    def validate_right_audience():
        svid = client.validate_jwt_svid(token_holder["token"], "billing")
        expect(str(svid.spiffe_id) == ids[0], f"validated {svid.spiffe_id}")

    check("py-spiffe validate_jwt_svid, right audience", validate_right_audience)

    def validate_wrong_audience():
        from spiffe.workloadapi.errors import ValidateJwtSvidError

        try:
            client.validate_jwt_svid(token_holder["token"], "not-billing")
        except ValidateJwtSvidError as e:
            expect("INVALID_ARGUMENT" in str(e), f"error {e}")
            return
        raise AssertionError("a token for another audience validated")

    check("py-spiffe validate_jwt_svid, wrong audience: InvalidArgument", validate_wrong_audience)

    def no_header():
        stub, _, ch = raw_stub(socket, header=False)
        for name, call in [
            ("FetchX509SVID", lambda: stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=15)),
            ("FetchX509Bundles", lambda: stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), timeout=15)),
            ("FetchJWTBundles", lambda: stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), timeout=15)),
            ("FetchJWTSVID", lambda: stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), timeout=15)),
            ("ValidateJWTSVID", lambda: stub.ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience="a", svid="x"), timeout=15)),
        ]:
            code, details = rpc_code(call)
            expect(code == grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {code} {details}")
        ch.close()

    check("no security header: InvalidArgument on every RPC", no_header)

    def bad_requests():
        stub, md, ch = raw_stub(socket)
        code, _ = rpc_code(lambda: stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(), metadata=md, timeout=15))
        expect(code == grpc.StatusCode.INVALID_ARGUMENT, f"no audience: {code}")
        code, _ = rpc_code(lambda: stub.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=["a"], spiffe_id=f"spiffe://{td}/not-mine"),
            metadata=md, timeout=15))
        expect(code == grpc.StatusCode.PERMISSION_DENIED, f"another identity: {code}")
        code, _ = rpc_code(lambda: stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="a", svid="not.a.jwt"), metadata=md, timeout=15))
        expect(code == grpc.StatusCode.INVALID_ARGUMENT, f"garbage token: {code}")
        code, _ = rpc_code(lambda: stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(svid=token_holder["token"]), metadata=md, timeout=15))
        expect(code == grpc.StatusCode.INVALID_ARGUMENT, f"no audience: {code}")
        ch.close()

    check("malformed requests: InvalidArgument, another identity: PermissionDenied", bad_requests)

    def x509_source_rotates():
        source = X509Source(socket_path=f"unix:{socket}", timeout_in_seconds=15)
        try:
            first = source.svid.leaf.serial_number
            expect(str(source.svid.spiffe_id) == ids[0], f"source SVID {source.svid.spiffe_id}")
            deadline = time.time() + spec["rotation_within_s"]
            while time.time() < deadline:
                if source.svid.leaf.serial_number != first:
                    return
                time.sleep(0.2)
            raise AssertionError(f"serial {first:x} unchanged after {spec['rotation_within_s']} s")
        finally:
            source.close()

    check("py-spiffe X509Source follows a rotation (new serial)", x509_source_rotates)

    def jwt_source():
        source = JwtSource(socket_path=f"unix:{socket}", timeout_in_seconds=15)
        try:
            bundle = source.get_bundle_for_trust_domain(SpiffeId(ids[0]).trust_domain)
            expect(bundle is not None and bundle.jwt_authorities, "JWT authorities")
            first = source.fetch_svid(audience={"billing"})
            deadline = time.time() + spec["rotation_within_s"]
            while time.time() < deadline:
                again = source.fetch_svid(audience={"billing"})
                if again.token != first.token:
                    expect(again.expiry >= first.expiry, "a later token")
                    return
                time.sleep(0.5)
            raise AssertionError("the JWT-SVID was never renewed")
        finally:
            source.close()

    check("py-spiffe JwtSource: bundle, and a renewed JWT-SVID past half its life", jwt_source)
    client.close()
    finish()


def mode_denied(socket, token, spiffe_id):
    from spiffe import WorkloadApiClient
    from spiffe._proto import workload_pb2

    def denied():
        client = WorkloadApiClient(socket_path=f"unix:{socket}", default_timeout=15)
        try:
            client.fetch_x509_svid()
        except Exception as e:  # noqa: BLE001
            expect("PERMISSION_DENIED" in str(e), f"error {e}")
        else:
            raise AssertionError("a caller with no entry got an SVID")
        client.close()

    check("py-spiffe, caller with no entry: PermissionDenied", denied)

    def every_rpc():
        stub, md, ch = raw_stub(socket)
        for name, call in [
            ("FetchX509SVID", lambda: stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=md, timeout=15)),
            ("FetchX509Bundles", lambda: stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=md, timeout=15)),
            ("FetchJWTBundles", lambda: stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=md, timeout=15)),
            ("FetchJWTSVID", lambda: stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=md, timeout=15)),
        ]:
            code, details = rpc_code(call)
            expect(code == grpc.StatusCode.PERMISSION_DENIED, f"{name}: {code} {details}")
            expect(details == "no identity issued", f"{name}: details {details!r}")
        ch.close()

    check("no entry: PermissionDenied 'no identity issued' on every RPC", every_rpc)

    def validates_anyway():
        # As with SPIRE, a verifier needs no identity of its own.
        client = WorkloadApiClient(socket_path=f"unix:{socket}", default_timeout=15)
        svid = client.validate_jwt_svid(token, "billing")
        expect(str(svid.spiffe_id) == spiffe_id, f"validated {svid.spiffe_id}")
        client.close()

    check("no entry: validate_jwt_svid still answers", validates_anyway)
    finish()


def mode_withdraw(socket):
    from spiffe import WorkloadApiClient

    client = WorkloadApiClient(socket_path=f"unix:{socket}")
    updates, errors = [], []
    got_first, got_error = threading.Event(), threading.Event()

    def on_success(ctx):
        updates.append(ctx)
        got_first.set()

    def on_error(err):
        errors.append(err)
        got_error.set()

    handle = client.stream_x509_contexts(on_success, on_error, retry_connect=False)

    def first():
        expect(got_first.wait(15), "no first update")

    check("stream opened", first)
    print("streaming", flush=True)
    sys.stdin.readline()

    def ended():
        expect(got_error.wait(15), "the stream did not end after the entries were deleted")
        expect("PERMISSION_DENIED" in str(errors[0]), f"ended with {errors[0]}")

    check("stream ends with PermissionDenied when the identity goes away", ended)
    handle.cancel()
    client.close()
    finish()


def mode_authority(socket, kind):
    from spiffe._proto import workload_pb2

    forms = {
        "C-core's default (the percent-encoded socket path)": None,
        "localhost": "localhost",
        "the raw socket path": socket,
        "the percent-encoded socket path, set explicitly": socket.replace("/", "%2F"),
    }
    for form, authority in forms.items():
        def call():
            if kind == "agent":
                stub, md, ch = raw_stub(socket, authority=authority)
                resp = first_message(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=md, timeout=15))
                expect(len(resp.svids) >= 1, "an SVID")
            else:
                options = [] if authority is None else [("grpc.default_authority", authority)]
                ch = grpc.insecure_channel(f"unix:{socket}", options=options)
                status = ch.unary_unary("/meshid.admin.v1.Authority/Status")
                resp = status(b"", timeout=15)
                expect(len(resp) > 0, "a status response")
            ch.close()

        check(f"{kind} socket, :authority = {form}", call)
    finish()


GRPC_EMPTY = b"\x00\x00\x00\x00\x00"  # one gRPC message frame with an empty message
# A JWTSVIDRequest with audience ["x"] (field 1, length 1, "x") in a gRPC message frame.
GRPC_JWT_REQUEST = b"\x00\x00\x00\x00\x03\x0a\x01x"


def h2_exchange(socket, requests, body=GRPC_EMPTY, timeout=15):
    """Sends `requests` (header lists) on one connection with hyper-h2, validation off so any
    header goes out as given. Returns, per request, ("response", {headers and trailers}) or
    ("reset", code), or for all of them ("goaway", code) if the connection is closed."""
    import socket as so

    import h2.config
    import h2.connection
    import h2.events

    config = h2.config.H2Configuration(
        client_side=True,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )
    conn = h2.connection.H2Connection(config=config)
    s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(socket)
    conn.initiate_connection()
    results = {}
    for i, headers in enumerate(requests):
        sid = 1 + 2 * i
        conn.send_headers(sid, headers)
        conn.send_data(sid, body, end_stream=True)
        results[sid] = None
    try:
        s.sendall(conn.data_to_send())
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server refused early: its GOAWAY, if it sent one, is still to be read
    fields = {sid: {} for sid in results}
    terminated = False
    deadline = time.time() + timeout
    while any(v is None for v in results.values()):
        if time.time() > deadline:
            raise AssertionError(f"timed out: {results}")
        data = s.recv(65536)
        if not data:
            for sid, v in results.items():
                if v is None:
                    results[sid] = ("closed", None)
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                for k, v in ev.headers:
                    fields[ev.stream_id][k.decode() if isinstance(k, bytes) else k] = (
                        v.decode() if isinstance(v, bytes) else v
                    )
            elif isinstance(ev, h2.events.StreamEnded):
                results[ev.stream_id] = ("response", fields[ev.stream_id])
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                results[ev.stream_id] = ("reset", int(ev.error_code))
            elif isinstance(ev, h2.events.ConnectionTerminated):
                terminated = True
                for sid, v in results.items():
                    if v is None:
                        results[sid] = ("goaway", int(ev.error_code))
        out = conn.data_to_send()
        # After a GOAWAY the server may already have closed the socket: what the client would
        # still send (an ACK, a window update) changes no verdict, and writing it could only
        # fail with EPIPE (seen in CI).
        if out and not terminated:
            try:
                s.sendall(out)
            except (BrokenPipeError, ConnectionResetError):
                for sid, v in results.items():
                    if v is None:
                        results[sid] = ("closed", None)
                break
    s.close()
    return [results[sid] for sid in sorted(results)]


def mode_raw(socket, kind):
    # Unary calls, so that each stream ends with its trailers.
    if kind == "agent":
        path, extra = "/SpiffeWorkloadAPI/FetchJWTSVID", [("workload.spiffe.io", "true")]
        body = GRPC_JWT_REQUEST
    else:
        path, extra = "/meshid.admin.v1.Authority/Status", []
        body = GRPC_EMPTY

    def request(authority, drop=(), add=(), first=()):
        h = list(first) + [(":method", "POST"), (":scheme", "http"), (":path", path)]
        if authority is not None:
            h.append((":authority", authority))
        h += [("content-type", "application/grpc"), ("te", "trailers")] + extra + list(add)
        return [x for x in h if x[0] not in drop]

    forms = {
        "absent": None,
        "localhost": "localhost",
        "a raw path": socket,
        "a percent-encoded path": socket.replace("/", "%2F"),
        "empty": "",
    }
    for form, authority in forms.items():
        def answered():
            # Three requests on one connection: the encoder indexes the authority on the
            # first and refers to it on the others.
            results = h2_exchange(socket, [request(authority)] * 3, body)
            for r in results:
                expect(r[0] == "response", f"{r}")
                expect(r[1].get(":status") == "200", f"{r}")
                expect(r[1].get("grpc-status") == "0", f"grpc-status {r[1].get('grpc-status')}: {r[1].get('grpc-message')}")

        check(f"{kind} socket, hyper-h2, :authority {form}: answered", answered)

    malformed = {
        "no :path": (lambda a: request(a, drop=(":path",)), "reset"),
        "no :method": (lambda a: request(a, drop=(":method",)), "reset"),
        "no :scheme": (lambda a: request(a, drop=(":scheme",)), "reset"),
        "an upper-case header name": (lambda a: request(a, add=[("X-Upper", "1")]), None),
        "a connection-specific header": (lambda a: request(a, add=[("connection", "close")]), None),
        "two :authority fields": (lambda a: request(a, add=[(":authority", a)]), None),
        "a pseudo-header after a regular field": (lambda a: request(None, add=[(":authority", a)]), None),
    }
    for name, (build, kind_expected) in malformed.items():
        def refused():
            for authority in ["localhost", socket, socket.replace("/", "%2F")]:
                (r,) = h2_exchange(socket, [build(authority)], body)
                expect(r[0] in ("reset", "goaway"), f"{authority}: {r}")
                expect(r[1] == 1, f"{authority}: {r} (PROTOCOL_ERROR expected)")
                if kind_expected:
                    expect(r[0] == kind_expected, f"{authority}: {r}")

        check(f"{kind} socket, hyper-h2, {name}: refused (PROTOCOL_ERROR)", refused)
    finish()


def mode_roots(socket, spec):
    """After a root rotation: py-spiffe's bundle holds exactly the expected roots, and its SVID
    verifies (by `cryptography`) against them, and not against the retired ones alone."""
    from cryptography.hazmat.primitives import serialization
    from cryptography import x509
    from spiffe import WorkloadApiClient

    client = WorkloadApiClient(socket_path=f"unix:{socket}", default_timeout=15)
    expected = [base64.b64decode(r) for r in spec["roots"]]
    retired = [base64.b64decode(r) for r in spec["retired"]]

    def bundle_is_the_new_root():
        svid = client.fetch_x509_svid()
        bundle = client.fetch_x509_bundles().get_bundle_for_trust_domain(
            svid.spiffe_id.trust_domain
        )
        roots = sorted(a.public_bytes(serialization.Encoding.DER) for a in bundle.x509_authorities)
        expect(roots == sorted(expected), f"{len(roots)} roots in the bundle, not the expected")
        chain = [c.public_bytes(serialization.Encoding.DER) for c in svid.cert_chain]
        verify_chain(chain[0], chain[1:], roots, spec["id"])
        try:
            verify_chain(chain[0], chain[1:], retired, spec["id"])
        except AssertionError:
            raise
        except Exception:
            return
        raise AssertionError("the SVID still verifies against the retired root alone")

    check("py-spiffe after a root rotation: bundle, SVID verified by cryptography", bundle_is_the_new_root)
    finish()


def mode_crl(socket, spec):
    from cryptography import x509
    from spiffe._proto import workload_pb2
    from spiffe import WorkloadApiClient

    revoked = int(spec["revoked_serial"], 16)
    stub, metadata, channel = raw_stub(socket)

    def crls_of(field_crls):
        return [x509.load_der_x509_crl(bytes(c)) for c in field_crls]

    def listed(crls):
        return [r.serial_number for crl in crls for r in crl]

    def svid_response():
        msg = first_message(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=metadata))
        crls = crls_of(msg.crl)
        expect(crls, "no CRL in X509SVIDResponse.crl")
        expect(revoked in listed(crls), f"serial {revoked:x} not listed")
        # The SVID served now is a fresh one, and the CRL of its issuer verifies with the
        # issuer's key (cryptography's own signature check).
        expect(msg.svids, "no SVID in the response")
        client = WorkloadApiClient(socket_path=f"unix:{socket}", default_timeout=15)
        fresh = client.fetch_x509_svid()
        client.close()
        expect(fresh.leaf.serial_number != revoked, "the revoked SVID is still served")
        issuer = fresh.cert_chain[1]
        by_issuer = [c for c in crls if c.issuer == issuer.subject]
        for crl in by_issuer:
            expect(crl.is_signature_valid(issuer.public_key()), "CRL signature does not verify")

    def bundles_response():
        msg = first_message(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=metadata))
        expect(revoked in listed(crls_of(msg.crl)), "X509BundlesResponse.crl does not list it")

    check("crl field of FetchX509SVID (py-spiffe stubs, cryptography)", svid_response)
    check("crl field of FetchX509Bundles", bundles_response)
    channel.close()
    finish()


def mode_latency(socket, n):
    from spiffe import WorkloadApiClient

    samples = []
    for _ in range(n):
        client = WorkloadApiClient(socket_path=f"unix:{socket}", default_timeout=15)
        t0 = time.perf_counter()
        client.fetch_x509_svid()
        samples.append((time.perf_counter() - t0) * 1e6)
        client.close()
    print(json.dumps(samples), flush=True)


def main():
    mode, socket = sys.argv[1], sys.argv[2]
    os.environ.pop("SPIFFE_ENDPOINT_SOCKET", None)
    if mode == "check":
        mode_check(socket, json.loads(sys.argv[3]))
    elif mode == "denied":
        mode_denied(socket, sys.argv[3], sys.argv[4])
    elif mode == "withdraw":
        mode_withdraw(socket)
    elif mode == "authority":
        mode_authority(socket, sys.argv[3])
    elif mode == "raw":
        mode_raw(socket, sys.argv[3])
    elif mode == "roots":
        mode_roots(socket, json.loads(sys.argv[3]))
    elif mode == "crl":
        mode_crl(socket, json.loads(sys.argv[3]))
    elif mode == "latency":
        mode_latency(socket, int(sys.argv[3]))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
