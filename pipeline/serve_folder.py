"""Serve a local folder over HTTP on 127.0.0.1 only, to build a URL source from local files.

    python -m pipeline.serve_folder DIR --port P [--url-list OUT.txt]

For demos and benchmarks (a URL list that exercises the real fetch path without the internet).
Builds that read it need --allow-private-addresses, since the URLs point at loopback.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

LOOPBACK = "127.0.0.1"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # one line per request would drown the build's output
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # a build opens hundreds of connections at once; the default 5 drops SYNs


def make_server(directory: Path, port: int = 0) -> ThreadingHTTPServer:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    return _Server((LOOPBACK, port), handler)


@contextlib.contextmanager
def serve_folder(directory: Path, port: int = 0) -> Iterator[str]:
    """Serve `directory` on 127.0.0.1 in a background thread; yields the base URL (no trailing slash)."""
    server = make_server(Path(directory), port)
    thread = threading.Thread(target=server.serve_forever, name="serve-folder", daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def url_list(directory: Path, base_url: str, relative_paths: list[str] | None = None) -> list[str]:
    """URLs of `relative_paths` (default: every file under `directory`, sorted) on the server."""
    if relative_paths is None:
        relative_paths = sorted(
            os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            for root, _, files in os.walk(directory) for name in files
        )
    return [f"{base_url}/{quote(path)}" for path in relative_paths]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.serve_folder", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--url-list", type=Path, default=None, help="also write the URL of every file here")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        parser.error(f"{args.directory} is not a directory")
    server = make_server(args.directory, args.port)
    base_url = f"http://{LOOPBACK}:{server.server_address[1]}"
    if args.url_list is not None:
        args.url_list.write_text("".join(f"{url}\n" for url in url_list(args.directory, base_url)))
    print(f"serving {args.directory} at {base_url} (127.0.0.1 only); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
