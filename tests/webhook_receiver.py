"""A real local HTTP server that records webhook POSTs, for tests."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from standardwebhooks import Webhook, WebhookVerificationError

HUGE_REPLY_BYTES = 200 * 1024 * 1024
# the receiver listens on loopback, which webhooks may reach only where the operator allows it
ALLOW_LOCAL = ("--webhook-allow-private",)
ALLOW_LOCAL_ENV = {"FASTDEPLOY_WEBHOOK_ALLOW_PRIVATE": "true"}


class Delivery:
    """One POST exactly as it arrived: path, headers and raw body, and whether its signature verified."""

    def __init__(self, path: str, headers: dict[str, str], raw: bytes, verified: Optional[bool]) -> None:
        self.path, self.headers, self.raw, self.verified = path, headers, raw, verified


class Receiver:
    """/ok answers 200; /flaky answers 500 twice per job then 200; /hang never answers in time;
    /redirect answers 302 to /ok; /huge answers 200 with a 200 MB body, streamed until the client hangs up.

    With ``secret``, every delivery is checked with the standardwebhooks package (``verified``);
    with ``tls``, it serves https with that server context."""

    def __init__(self, secret: Optional[str] = None, tls: Optional[ssl.SSLContext] = None) -> None:
        self.posts: list[tuple[str, dict[str, Any], float]] = []
        self.deliveries: list[Delivery] = []
        self.attempts: dict[str, int] = defaultdict(int)
        self.huge_bytes_sent = 0
        self._lock = threading.Lock()
        self._verifier = Webhook(secret) if secret else None
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                attempt = receiver._record(self.path, dict(self.headers.items()), raw)
                route = self.path.split("?", 1)[0]  # recorded with its query; answered by its path
                if route == "/hang":
                    time.sleep(5)
                if route == "/huge":
                    return self._huge()
                status = 500 if route == "/flaky" and attempt <= 2 else 200
                self.send_response(302 if route == "/redirect" else status)
                if route == "/redirect":
                    self.send_header("Location", "/ok")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _huge(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(HUGE_REPLY_BYTES))
                self.end_headers()
                chunk = b"x" * (1024 * 1024)
                try:
                    for _ in range(HUGE_REPLY_BYTES // len(chunk)):
                        self.wfile.write(chunk)
                        receiver.huge_bytes_sent += len(chunk)
                except OSError:  # the sender hung up: what it should do
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _record(self, path: str, headers: dict[str, str], raw: bytes) -> int:
        verified: Optional[bool] = None
        if self._verifier is not None:
            try:
                self._verifier.verify(raw, headers)
                verified = True
            except WebhookVerificationError:
                verified = False
        body = json.loads(raw)
        with self._lock:
            self.posts.append((path, body, time.monotonic()))
            self.deliveries.append(Delivery(path, headers, raw, verified))
            self.attempts[body["unique_id"]] += 1
            return self.attempts[body["unique_id"]]

    def __enter__(self) -> "Receiver":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def received(self, path: str) -> list[dict[str, Any]]:
        with self._lock:
            return [body for p, body, _ in self.posts if p == path]

    def delivered(self, path: str) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.path == path]

    def wait_for(self, path: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.received(path)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.received(path))} of {count} webhooks on {path}: {self.posts}")
            time.sleep(0.02)
        return self.received(path)
