"""A fault-injecting HTTP proxy on loopback, in front of a real model server, for tests.

Each POST .../infer takes the next action from `schedule` (then "ok" once it is empty):

    ok          forward, and relay the answer
    500         forward (the server evaluates), then answer 500
    503:S       answer 503 with Retry-After: S, without forwarding
    429:S       answer 429 with Retry-After: S, without forwarding
    hang:S      read the request, forward nothing, answer nothing for S seconds, then close
    drop        forward (the server evaluates), then close the connection without an answer
    garbage     forward, then answer 200 with a body that is not JSON
    413         answer 413 (batch too large), without forwarding

`evaluated` counts the images forwarded to the server's infer endpoint, `requests` logs
(action, images) for each infer request. With `token` set, every request must carry
`Authorization: Bearer <token>` or gets 401. With `ready=False`, GET /v2/health/ready answers 503.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RELAYED_HEADERS = ("content-type", "inference-header-content-length", "retry-after")


def _images_in(body: bytes, header_length: str | None) -> int:
    try:
        head = body[: int(header_length)] if header_length else body
        return int(json.loads(head)["inputs"][0]["shape"][0])
    except (ValueError, KeyError, IndexError, TypeError):
        return 0


class FaultProxy:
    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.schedule: deque[str] = deque()
        self.token: str | None = None
        self.ready = True
        self.evaluated = 0
        self.requests: list[tuple[str, int]] = []
        self.auth_seen: list[str | None] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                proxy._handle(self, "GET")

            def do_POST(self):
                proxy._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False  # never wait for clients' idle keep-alive connections
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, model: str) -> str:
        return f"http://127.0.0.1:{self.port}/v2/models/{model}"

    def set_schedule(self, actions) -> None:
        with self._lock:
            self.schedule = deque(actions)
            self.evaluated = 0
            self.requests = []

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ handling

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        auth = h.headers.get("Authorization")
        with self._lock:
            self.auth_seen.append(auth)
        if self.token is not None and auth != f"Bearer {self.token}":
            return self._reply(h, 401, b'{"error": "unauthorized"}')
        if method == "GET" and h.path == "/v2/health/ready" and not self.ready:
            return self._reply(h, 503, b'{"error": "not ready"}')
        if not (method == "POST" and h.path.endswith("/infer")):
            return self._forward_and_relay(h, method, body)
        n = _images_in(body or b"", h.headers.get("Inference-Header-Content-Length"))
        with self._lock:
            action = self.schedule.popleft() if self.schedule else "ok"
            self.requests.append((action, n))
        kind, _, arg = action.partition(":")
        if kind in ("429", "503"):
            return self._reply(h, int(kind), b'{"error": "injected"}', {"Retry-After": arg or "0"})
        if kind == "413":
            return self._reply(h, 413, b'{"error": "batch too large"}')
        if kind == "hang":
            self._stop.wait(float(arg or 5))
            h.close_connection = True
            return None
        status, headers, data = self._forward(h, method, body)
        if status == 200 and h.path.endswith("/infer"):
            with self._lock:
                self.evaluated += n
        if kind == "500":
            return self._reply(h, 500, b'{"error": "injected failure"}')
        if kind == "drop":
            h.close_connection = True
            return None
        if kind == "garbage":
            return self._reply(h, 200, b"{this is not json", {"Content-Type": "application/json"})
        return self._reply(h, status, data, headers)

    def _forward(self, h, method: str, body: bytes | None):
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection", "authorization")}
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            conn.request(method, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            relayed = {k: v for k, v in resp.getheaders() if k.lower() in RELAYED_HEADERS}
            return resp.status, relayed, data
        except OSError as exc:
            return 502, {"Content-Type": "application/json"}, json.dumps({"error": f"upstream: {exc}"}).encode()
        finally:
            conn.close()

    def _forward_and_relay(self, h, method, body):
        status, headers, data = self._forward(h, method, body)
        self._reply(h, status, data, headers)

    @staticmethod
    def _reply(h, status: int, data: bytes, headers: dict | None = None) -> None:
        try:
            h.send_response(status)
            for k, v in (headers or {"Content-Type": "application/json"}).items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except OSError:  # the client gave up (timeout) meanwhile
            h.close_connection = True
