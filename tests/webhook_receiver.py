"""A real local HTTP server that records webhook POSTs, for tests."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """/ok answers 200; /flaky answers 500 twice per job then 200; /hang never answers in time."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any], float]] = []
        self.attempts: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver._lock:
                    receiver.posts.append((self.path, body, time.monotonic()))
                    receiver.attempts[body["unique_id"]] += 1
                    attempt = receiver.attempts[body["unique_id"]]
                if self.path == "/hang":
                    time.sleep(5)
                status = 500 if self.path == "/flaky" and attempt <= 2 else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Receiver":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def received(self, path: str) -> list[dict[str, Any]]:
        with self._lock:
            return [body for p, body, _ in self.posts if p == path]

    def wait_for(self, path: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.received(path)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.received(path))} of {count} webhooks on {path}: {self.posts}")
            time.sleep(0.02)
        return self.received(path)
