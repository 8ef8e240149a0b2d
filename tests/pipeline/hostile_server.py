"""A loopback HTTP server that misbehaves on purpose, for the fetch and build tests.

Routes (all on 127.0.0.1):
  /img/<name>                 a registered body (images, HTML, ...) with its content type
  /status/<code>              an HTTP error
  /redirect/self              302 to itself (a loop)
  /redirect/a, /redirect/b    302 to each other (a loop)
  /redirect/chain/<n>         n hops, then /img/ok.jpg
  /redirect/to?location=X     302 to X (another scheme, another host, a relative path)
  /redirect/nolocation        302 without a Location header
  /robots/<directive>/<name>  a registered body with `X-Robots-Tag: <directive>`
  /empty                      200 with an empty body
  /short-body                 announces 1000 bytes, sends 100, closes
  /endless-fast               an endless body at full speed (hits the byte cap)
  /endless-slow               an endless body, one byte every 0.2 s (hits the deadline)
  /slow-headers               a status line, then header bytes dripped forever (hits the deadline)
  /not-http                   a banner that is not HTTP
  /hang-up                    closes the connection without a word
Plus `silent_url` (a socket that accepts and never answers) and `refused_url` (nothing listens).
"""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from testkit import free_port


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format, *args):  # the tests read statuses, not access logs
        pass

    def do_GET(self):  # noqa: N802 (http.server's naming)
        parts = urlsplit(self.path)
        segments = [s for s in parts.path.split("/") if s]
        self.server.hits.append(parts.path)
        route = segments[0] if segments else ""
        handler = getattr(self, f"route_{route.replace('-', '_')}", None)
        if handler is None:
            self.send_error(404)
            return
        try:
            handler(segments[1:], parse_qs(parts.query))
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass

    def _send_body(self, body: bytes, content_type: str, extra: dict | None = None):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str | None):
        self.send_response(302)
        if location is not None:
            self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_img(self, rest, _):
        body, content_type = self.server.bodies.get("/".join(rest), (None, None))
        if body is None:
            self.send_error(404)
        else:
            self._send_body(body, content_type)

    def route_status(self, rest, _):
        self.send_error(int(rest[0]))

    def route_redirect(self, rest, query):
        kind = rest[0]
        if kind == "self":
            self._redirect("/redirect/self")
        elif kind in ("a", "b"):
            self._redirect("/redirect/b" if kind == "a" else "/redirect/a")
        elif kind == "chain":
            hops = int(rest[1])
            self._redirect(f"/redirect/chain/{hops - 1}" if hops > 1 else "/img/ok.jpg")
        elif kind == "to":
            self._redirect(query["location"][0])
        elif kind == "nolocation":
            self._redirect(None)

    def route_robots(self, rest, _):
        body, content_type = self.server.bodies["/".join(rest[1:])]
        self._send_body(body, content_type, {"X-Robots-Tag": rest[0]})

    def route_empty(self, rest, _):
        self._send_body(b"", "image/jpeg")

    def route_short_body(self, rest, _):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"\xff\xd8" + b"\0" * 98)
        self.close_connection = True

    def route_endless_fast(self, rest, _):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        block = b"\0" * 65536
        while not self.server.stopping.is_set():
            self.wfile.write(block)

    def route_endless_slow(self, rest, _):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        while not self.server.stopping.wait(0.2):
            self.wfile.write(b"\0")
            self.wfile.flush()

    def route_slow_headers(self, rest, _):
        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not self.server.stopping.wait(0.2):
            self.wfile.write(b"a")
            self.wfile.flush()

    def route_not_http(self, rest, _):
        self.wfile.write(b"SSH-2.0-OpenSSH_9.0\r\n")
        self.close_connection = True

    def route_hang_up(self, rest, _):
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request, client_address):  # clients that hang up are the point here
        pass


class _SilentListener:
    """Accepts connections and never reads or writes: a server that never answers."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.sock.settimeout(0.2)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
                self.held.append(conn)
            except OSError:
                continue

    def close(self):
        self.stopping.set()
        self.thread.join()
        for conn in self.held:
            conn.close()
        self.sock.close()


class HostileServer:
    """Context manager: `with HostileServer() as server: server.url("/img/ok.jpg")`."""

    def __init__(self):
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.bodies = {}
        self.server.hits = []
        self.server.stopping = threading.Event()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.silent = _SilentListener()
        self.silent_url = f"http://127.0.0.1:{self.silent.port}/never"
        self.refused_url = f"http://127.0.0.1:{free_port()}/nothing-listens"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, name: str, body: bytes, content_type: str = "image/jpeg") -> str:
        self.server.bodies[name] = (body, content_type)
        return self.url(f"/img/{name}")

    def url(self, path: str) -> str:
        return self.base + path

    @property
    def hits(self) -> list[str]:
        return self.server.hits

    def __enter__(self) -> "HostileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()
        self.silent.close()
        time.sleep(0.3)  # let dripping handlers notice `stopping` and return
