"""Fetch one image URL with a hard total deadline, a byte cap and an address policy.

Departure from img2dataset's downloader (`img2dataset.downloader.download_image`, urllib): its
timeout bounds each socket operation, not the response, so a body that never ends or a server
that drips bytes holds a thread forever (img2dataset issue #437), and urllib follows redirects to
any address, including loopback and private networks (server-side request forgery). Here:
- http and https only; malformed URLs are caught before any traffic;
- each hop's host is resolved (within the deadline) and checked (`pipeline.addresses`), and the
  connection goes to the checked address;
- redirects are followed by hand, at most `max_redirects` hops, each hop checked again; a URL
  seen twice is a redirect loop;
- the body is read in chunks against one deadline for the whole fetch (all hops included) and a
  byte cap; a watchdog (`pipeline.deadline`) cuts the phases a chunk loop cannot reach;
- the X-Robots-Tag opt-out is img2dataset's `is_disallowed` rule and defaults (`pipeline.robots`).
"""
from __future__ import annotations

import http.client
import re
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

from pipeline import statuses
from pipeline.addresses import LookupTimeout, resolve_host
from pipeline.deadline import DeadlineWatchdog, Watch
from pipeline.robots import DEFAULT_DISALLOWED_DIRECTIVES, is_disallowed
from pipeline.statuses import RowFailure

# img2dataset's user agent, so sites treat both tools alike.
BASE_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 1 << 16
_HOST_RE = re.compile(r"^[A-Za-z0-9._:-]+$")
_UNSAFE_IN_TARGET = re.compile(r"[^\x21-\x7e]")


@dataclass(frozen=True)
class FetchPolicy:
    timeout_s: float = 10.0
    max_bytes: int = 50 * 1024 * 1024
    allow_private_addresses: bool = False
    max_redirects: int = 10
    user_agent_token: str | None = None
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DISALLOWED_DIRECTIVES


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str            # ASCII (IDNA) host name or IP literal
    port: int
    request_target: str  # path and query, ASCII


def parse_url(url: object) -> Target:
    """Check a URL before any traffic: http(s), a valid host and port, a sendable path."""
    if not isinstance(url, str) or not url.strip():
        raise RowFailure(statuses.MALFORMED_URL, "empty URL")
    text = url.strip()
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise RowFailure(statuses.MALFORMED_URL, f"URL {text!r} contains control characters")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as error:
        raise RowFailure(statuses.MALFORMED_URL, f"URL {text!r} does not parse ({error})") from error
    scheme = parts.scheme.lower()
    if not scheme:
        raise RowFailure(statuses.MALFORMED_URL, f"URL {text!r} has no scheme (expected http:// or https://)")
    if scheme not in ("http", "https"):
        raise RowFailure(statuses.UNSUPPORTED_SCHEME, f"scheme {scheme!r} is not http or https ({text[:200]!r})")
    host = parts.hostname
    if not host:
        raise RowFailure(statuses.MALFORMED_URL, f"URL {text!r} has no host")
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError as error:
        raise RowFailure(statuses.MALFORMED_URL, f"host {host!r} is not a valid domain name ({error})") from error
    if not _HOST_RE.match(ascii_host):
        raise RowFailure(statuses.MALFORMED_URL, f"host {host!r} is not a valid domain name")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    target = _UNSAFE_IN_TARGET.sub(lambda m: quote(m.group(), safe=""), target)  # as browsers send them
    return Target(text, scheme, ascii_host, port or (443 if scheme == "https" else 80), target)


class Fetcher:
    """Fetches URLs for one shard task; thread-safe (one connection per call)."""

    def __init__(self, policy: FetchPolicy, watchdog: DeadlineWatchdog):
        self.policy = policy
        self.watchdog = watchdog
        token = policy.user_agent_token.strip().lower() if policy.user_agent_token else None
        self._token = token
        self._user_agent = BASE_USER_AGENT + (
            f" (compatible; {token}; +https://github.com/rom1504/img2dataset)" if token else "")
        self._directives = {d.strip().lower() for d in policy.disallowed_header_directives}
        self._tls = ssl.create_default_context()

    def fetch(self, url: object) -> bytes:
        """The body of `url`, or RowFailure with the reason; never longer than the deadline."""
        current = parse_url(url)
        watch = self.watchdog.watch(self.policy.timeout_s)
        try:
            visited = {current.url}
            for hop in range(self.policy.max_redirects + 1):
                location = self._get(current, watch)
                if isinstance(location, bytes):
                    return location
                following = urljoin(current.url, location)
                if following in visited:
                    raise RowFailure(statuses.REDIRECT_LOOP, f"redirect loop: {following} was already visited "
                                                             f"(hop {hop + 1} from {url})")
                visited.add(following)
                try:
                    current = parse_url(following)
                except RowFailure as failure:
                    raise RowFailure(failure.status, f"redirect hop {hop + 1}: {failure.message}") from None
            raise RowFailure(statuses.TOO_MANY_REDIRECTS, f"more than {self.policy.max_redirects} redirects from {url}")
        finally:
            self.watchdog.release(watch)

    def _timeout(self) -> RowFailure:
        return RowFailure(statuses.TIMEOUT, f"no complete response within the {self.policy.timeout_s:g} s "
                                            "per-image deadline")

    def _get(self, target: Target, watch: Watch) -> bytes | str:
        """One request: the body (bytes) or a redirect's Location (str)."""
        try:
            address = resolve_host(target.host, target.port, self.policy.allow_private_addresses, watch.remaining())
        except LookupTimeout as error:
            raise self._timeout() from error
        if watch.remaining() <= 0:
            raise self._timeout()
        if target.scheme == "https":
            connection = http.client.HTTPSConnection(target.host, target.port, timeout=watch.remaining(),
                                                     context=self._tls)
        else:
            connection = http.client.HTTPConnection(target.host, target.port, timeout=watch.remaining())

        def connect_to_checked_address(_address, timeout=None, source_address=None):
            sock = socket.create_connection((address, target.port), timeout, source_address)
            self.watchdog.attach(watch, sock)
            return sock

        # Connect to the address that passed the policy; Host header and TLS SNI keep the name.
        connection._create_connection = connect_to_checked_address
        try:
            connection.putrequest("GET", target.request_target, skip_accept_encoding=True)
            connection.putheader("User-Agent", self._user_agent)
            connection.endheaders()
            sock = connection.sock  # kept: http.client drops it from the connection on Connection: close
            sock.settimeout(max(watch.remaining(), 0.001))
            response = connection.getresponse()
            if response.status in REDIRECT_STATUSES:
                location = response.getheader("Location")
                if not location:
                    raise RowFailure(statuses.HTTP_ERROR, f"HTTP {response.status} redirect without a Location header")
                return location.strip()
            if not 200 <= response.status < 300:
                raise RowFailure(statuses.HTTP_ERROR, f"HTTP {response.status} {response.reason}".strip())
            if self._directives and is_disallowed(response.msg, self._token, self._directives):
                raise RowFailure(statuses.DISALLOWED, "use of image disallowed by X-Robots-Tag directive "
                                 f"{response.msg.get_all('X-Robots-Tag')}")
            return self._read_body(response, sock, watch)
        except RowFailure:
            raise
        except Exception as error:  # every other failure of the exchange becomes a row status
            if watch.fired or watch.remaining() <= 0:
                raise self._timeout() from error
            raise _classify(error, target) from error
        finally:
            connection.close()

    def _read_body(self, response: http.client.HTTPResponse, sock: socket.socket, watch: Watch) -> bytes:
        announced = response.getheader("Content-Length", "")
        if announced.strip().isdigit() and int(announced) > self.policy.max_bytes:
            raise RowFailure(statuses.TOO_LARGE, f"Content-Length {int(announced)} exceeds the "
                                                 f"{self.policy.max_bytes}-byte cap")
        chunks, size = [], 0
        while True:
            remaining = watch.remaining()
            if remaining <= 0:
                raise self._timeout()
            sock.settimeout(remaining)
            chunk = response.read1(CHUNK_BYTES)
            if not chunk:
                break
            size += len(chunk)
            if size > self.policy.max_bytes:
                raise RowFailure(statuses.TOO_LARGE, f"body exceeds the {self.policy.max_bytes}-byte cap")
            chunks.append(chunk)
        if watch.fired:
            raise self._timeout()
        if response.length:  # read1 reports a short body as a plain end of stream
            raise RowFailure(statuses.TRUNCATED, f"connection closed after {size} of {size + response.length} "
                                                 "announced bytes")
        return b"".join(chunks)


def _classify(error: Exception, target: Target) -> RowFailure:
    where = f"{target.host}:{target.port}"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return RowFailure(statuses.TIMEOUT, f"{where} did not answer in time")
    if isinstance(error, ConnectionRefusedError):
        return RowFailure(statuses.CONNECTION_ERROR, f"connection refused by {where}")
    if isinstance(error, http.client.RemoteDisconnected):
        return RowFailure(statuses.CONNECTION_ERROR, f"{where} closed the connection without a response")
    if isinstance(error, http.client.IncompleteRead):
        return RowFailure(statuses.TRUNCATED, f"body ended early ({error})")
    if isinstance(error, ssl.SSLError):
        return RowFailure(statuses.CONNECTION_ERROR, f"TLS failure with {where} ({error})")
    if isinstance(error, http.client.InvalidURL):
        return RowFailure(statuses.MALFORMED_URL, str(error))
    if isinstance(error, http.client.HTTPException):
        return RowFailure(statuses.PROTOCOL_ERROR, f"{where} did not answer with valid HTTP "
                                                   f"({type(error).__name__}: {str(error)[:200]})")
    if isinstance(error, OSError):
        return RowFailure(statuses.CONNECTION_ERROR, f"{where}: {error.strerror or error}")
    if isinstance(error, (ValueError, UnicodeError)):
        return RowFailure(statuses.MALFORMED_URL, f"{type(error).__name__}: {error}")
    return RowFailure(statuses.INTERNAL_ERROR, f"{type(error).__name__}: {error}")
