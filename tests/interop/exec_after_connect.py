"""Exec after connect (tests/tests/e2e/security.rs, issue 10 item 5).

`call FD`: FetchX509SVID over descriptor FD, inherited from a process that connected and then
exec'd this Python (the test does that in perl); `call-socket SOCKET`: the same on a new
connection. With hyper-h2; prints `status <grpc-status>` and, when an SVID came,
`svid <bytes>`.
"""

import socket
import sys


def fetch(sock):
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("workload.spiffe.io", "true"),
        ],
    )
    conn.send_data(sid, b"\x00\x00\x00\x00\x00", end_stream=True)
    sock.sendall(conn.data_to_send())
    body, status = b"", None
    sock.settimeout(10)
    while status is None:
        data = sock.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, sid)
                if body:
                    # The first message of a stream that stays open: enough.
                    status = "0"
            elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                for k, v in event.headers:
                    if k in (b"grpc-status", "grpc-status"):
                        status = v.decode() if isinstance(v, bytes) else v
            elif isinstance(event, h2.events.StreamReset):
                status = "reset"
        sock.sendall(conn.data_to_send())
    print(f"status {status}", flush=True)
    if body:
        print(f"svid {len(body)}", flush=True)


def main():
    mode = sys.argv[1]
    if mode == "call":
        fetch(socket.socket(fileno=int(sys.argv[2])))
    elif mode == "call-socket":
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[2])
        fetch(s)


main()
