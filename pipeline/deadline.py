"""A watchdog that enforces total per-fetch deadlines by shutting sockets down.

Socket timeouts bound each recv, not a whole response: a server that drips one header byte per
second keeps `http.client` busy forever (img2dataset issue #437 is the body-read case). The fetch
code checks its deadline between body chunks; this thread covers the places it cannot reach
(status line and headers, TLS handshake) by shutting the connection down, which wakes any
blocked recv.
"""
from __future__ import annotations

import socket
import threading
import time


class Watch:
    """One fetch's deadline; `fired` tells the fetch that a closed connection was the watchdog."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.fired = False
        self._socket: socket.socket | None = None

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class DeadlineWatchdog:
    """One polling thread per shard task; `watch`/`attach`/`release` from the fetch threads."""

    def __init__(self, poll_s: float = 0.05):
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._watches: set[Watch] = set()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fetch-deadline-watchdog", daemon=True)

    def __enter__(self) -> "DeadlineWatchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        self._thread.join()

    def watch(self, timeout_s: float) -> Watch:
        watch = Watch(time.monotonic() + timeout_s)
        with self._lock:
            self._watches.add(watch)
        return watch

    def attach(self, watch: Watch, sock: socket.socket) -> None:
        """Let the watchdog shut `sock` down at the deadline.

        The watchdog keeps its own duplicate of the descriptor: a TLS wrap detaches the original
        socket object, and the duplicate stays valid (and cannot be reused by another connection)
        until `release` closes it.
        """
        duplicate = sock.dup()
        with self._lock:
            previous, watch._socket = watch._socket, duplicate
            expired = watch.fired
        if previous is not None:
            previous.close()
        if expired:
            _shutdown(duplicate)

    def release(self, watch: Watch) -> None:
        with self._lock:
            self._watches.discard(watch)
            sock, watch._socket = watch._socket, None
        if sock is not None:
            sock.close()

    def _run(self) -> None:
        while not self._stopped.wait(self._poll_s):
            now = time.monotonic()
            with self._lock:
                for watch in self._watches:
                    if not watch.fired and now >= watch.deadline:
                        watch.fired = True
                        if watch._socket is not None:
                            _shutdown(watch._socket)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by the peer
        pass
