"""An application behind the inbound proxy in the proxy's upgrade test (tests/tests/e2e/proxy.rs).

Served by hypercorn, which, like Go's h2c handler, Tomcat, Jetty and Apache with H2Upgrade,
switches a cleartext HTTP/1.1 connection to HTTP/2 when a request offers `Upgrade: h2c`. Every
HTTP request is answered with what arrived (method, path, HTTP version, headers) as JSON, and
/admin/... with a secret; each is written to stderr as `served <version> <method> <path>`.
A WebSocket connection echoes each message.
"""

import json
import sys


def log(line):
    print(line, file=sys.stderr, flush=True)


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "http":
        log(f"served {scope['http_version']} {scope['method']} {scope['path']}")
        body = json.dumps(
            {
                "method": scope["method"],
                "path": scope["path"],
                "http_version": scope["http_version"],
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
                "secret": "admin secrets" if scope["path"].startswith("/admin") else None,
            }
        ).encode()
        while (await receive()).get("more_body"):
            pass
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
    elif scope["type"] == "websocket":
        log(f"websocket {scope['path']}")
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            elif message.get("bytes") is not None:
                await send({"type": "websocket.send", "bytes": message["bytes"]})
