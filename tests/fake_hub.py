"""A local HTTP server that answers like the Hugging Face hub's file endpoints (127.0.0.1 only)."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubState:
    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.mode = "ok"  # ok | 500 | 404 (every path) | cut (weights body cut short) | slow
        self.delay = 5.0  # seconds the "slow" server waits before answering
        self.requests: list[str] = []


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def _route(self):
            # /{org}/{name}/resolve/{revision}/{filename}
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return None, None, None
            return "/".join(parts[:2]), "/".join(parts[4:]), parts[3]

        def _answer(self, with_body: bool):
            state.requests.append(f"{self.command} {self.path}")
            repo, filename, _ = self._route()
            if state.mode == "500":
                return self._error(500, "Internal Error")
            if state.mode == "404":
                return self._error(404, "")
            if state.mode == "slow":
                time.sleep(state.delay)
            if repo not in state.repos:
                return self._error(404, "RepoNotFound")
            files = state.repos[repo]
            if filename not in files:
                return self._error(404, "EntryNotFound")
            body = files[filename]
            etag = hashlib.sha256(body).hexdigest()
            start = 0
            rng = self.headers.get("Range", "")
            if with_body and rng.startswith("bytes=") and rng[6:].split("-")[0].isdigit():
                start = min(int(rng[6:].split("-")[0]), len(body))  # a resumed download, as a CDN serves it
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Content-Length", str(len(body) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if with_body:
                if state.mode == "cut" and filename.endswith((".safetensors", ".bin")):
                    # the connection always drops at the same byte: resuming cannot get past it
                    self.wfile.write(body[start : max(start, len(body) // 2)])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # close() alone leaves the client waiting
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        def _error(self, code: int, kind: str):
            msg = kind.encode()
            self.send_response(code)
            if kind:  # the hub names its errors; a plain web server does not
                self.send_header("X-Error-Code", kind)
                self.send_header("X-Error-Message", kind)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(msg)

        def do_HEAD(self):
            self._answer(False)

        def do_GET(self):
            self._answer(True)

    return Handler


@contextmanager
def serve(repos: dict[str, dict[str, bytes]]):
    state = HubState(repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
