"""pipeline.fetch against the hostile loopback server: every bad answer is a status, none a hang."""
from __future__ import annotations

import inspect
import socket
import threading
import time
from http.client import HTTPMessage

import pytest

from testkit import image_bytes
from hostile_server import HostileServer
from pipeline import statuses
from pipeline.addresses import is_public
from pipeline.deadline import DeadlineWatchdog
from pipeline.fetch import FetchPolicy, Fetcher, parse_url
from pipeline.robots import DEFAULT_DISALLOWED_DIRECTIVES, is_disallowed
from pipeline.statuses import RowFailure

TIMEOUT_S = 1.5
OK_BYTES = image_bytes(64, 48, seed=1)


@pytest.fixture(scope="module")
def server():
    with HostileServer() as hostile:
        hostile.add("ok.jpg", OK_BYTES)
        yield hostile


@pytest.fixture
def fetch():
    """fetch(url, **policy) -> bytes, with a live watchdog; private addresses allowed by default."""
    with DeadlineWatchdog() as watchdog:
        def run(url, **policy):
            policy = {"timeout_s": TIMEOUT_S, "allow_private_addresses": True, **policy}
            return Fetcher(FetchPolicy(**policy), watchdog).fetch(url)
        yield run


def failure(fetch, url, **policy) -> RowFailure:
    with pytest.raises(RowFailure) as caught:
        fetch(url, **policy)
    return caught.value


def test_good_image_and_redirects(server, fetch):
    assert fetch(server.url("/img/ok.jpg")) == OK_BYTES
    assert fetch(server.url("/redirect/chain/3")) == OK_BYTES
    assert fetch(server.url("/redirect/to?location=../img/ok.jpg")) == OK_BYTES  # relative Location
    assert fetch(server.url("/robots/nofollow/ok.jpg")) == OK_BYTES              # not an opt-out directive
    assert fetch(server.url("/robots/otherbot:%20noai/ok.jpg")) == OK_BYTES     # aimed at another agent
    assert fetch(server.url("/empty")) == b""                                   # the image step names it


@pytest.mark.parametrize("path,status,words", [
    ("/status/404", statuses.HTTP_ERROR, "http 404"),
    ("/status/503", statuses.HTTP_ERROR, "http 503"),
    ("/redirect/self", statuses.REDIRECT_LOOP, "redirect loop"),
    ("/redirect/a", statuses.REDIRECT_LOOP, "redirect loop"),
    ("/redirect/chain/12", statuses.TOO_MANY_REDIRECTS, "more than 10 redirects"),
    ("/redirect/nolocation", statuses.HTTP_ERROR, "without a location"),
    ("/redirect/to?location=file:///etc/passwd", statuses.UNSUPPORTED_SCHEME, "redirect hop 1"),
    ("/robots/noai/ok.jpg", statuses.DISALLOWED, "x-robots-tag"),
    ("/robots/noindex,%20nofollow/ok.jpg", statuses.DISALLOWED, "x-robots-tag"),
    ("/short-body", statuses.TRUNCATED, "100 of 1000"),
    ("/not-http", statuses.PROTOCOL_ERROR, "valid http"),
    ("/hang-up", statuses.CONNECTION_ERROR, "closed the connection"),
])
def test_bad_answers(server, fetch, path, status, words):
    caught = failure(fetch, server.url(path))
    assert caught.status == status, caught
    assert words in caught.message.lower()


def test_refused_connection(server, fetch):
    caught = failure(fetch, server.refused_url)
    assert caught.status == statuses.CONNECTION_ERROR and "refused" in caught.message


def test_endless_fast_body_hits_byte_cap(server, fetch):
    caught = failure(fetch, server.url("/endless-fast"), max_bytes=1 << 20)
    assert caught.status == statuses.TOO_LARGE and "cap" in caught.message


@pytest.mark.parametrize("which", ["/endless-slow", "/slow-headers", "silent"])
def test_deadline_bounds_the_whole_fetch(server, fetch, which):
    url = server.silent_url if which == "silent" else server.url(which)
    started = time.monotonic()
    caught = failure(fetch, url)
    elapsed = time.monotonic() - started
    assert caught.status == statuses.TIMEOUT and "deadline" in caught.message
    assert TIMEOUT_S - 0.1 <= elapsed < TIMEOUT_S + 1.0


def test_deadline_bounds_a_host_name_lookup_that_never_answers(fetch, monkeypatch):
    # A DNS server that never answers: getaddrinfo blocks until the resolver gives up (tens of
    # seconds); the fetch must still end at its deadline, without any traffic.
    release = threading.Event()

    def silent_resolver(*args, **kwargs):
        release.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", silent_resolver)
    started = time.monotonic()
    try:
        caught = failure(fetch, "http://images.example/a.jpg")
    finally:
        release.set()
    assert caught.status == statuses.TIMEOUT and "deadline" in caught.message
    assert time.monotonic() - started < TIMEOUT_S + 1.0


@pytest.mark.parametrize("url,status", [
    ("ftp://example.com/a.jpg", statuses.UNSUPPORTED_SCHEME),
    ("file:///etc/passwd", statuses.UNSUPPORTED_SCHEME),
    ("data:image/png;base64,iVBORw0KGgo=", statuses.UNSUPPORTED_SCHEME),
    ("javascript:alert(1)", statuses.UNSUPPORTED_SCHEME),
    ("", statuses.MALFORMED_URL),
    (None, statuses.MALFORMED_URL),
    ("not a url", statuses.MALFORMED_URL),
    ("http://", statuses.MALFORMED_URL),
    ("http://[::1/x.jpg", statuses.MALFORMED_URL),
    ("http://exa mple.com/x.jpg", statuses.MALFORMED_URL),
    ("http://example.com:99999/x.jpg", statuses.MALFORMED_URL),
    ("http://example.com/a\nb.jpg", statuses.MALFORMED_URL),
])
def test_urls_refused_before_any_traffic(url, status):
    with pytest.raises(RowFailure) as caught:
        parse_url(url)
    assert caught.value.status == status and caught.value.message


def test_non_ascii_paths_are_percent_encoded():
    target = parse_url("http://example.com/caf\u00e9 1.jpg?q=\u00e9")
    assert target.request_target == "/caf%C3%A9%201.jpg?q=%C3%A9"
    assert parse_url("http://b\u00fccher.example/x").host == "xn--bcher-kva.example"


def test_private_addresses_are_refused_by_default(server, fetch):
    hits_before = len(server.hits)
    port = server.base.rsplit(":", 1)[1]
    for url in (server.url("/img/ok.jpg"), f"http://localhost:{port}/img/ok.jpg"):
        caught = failure(fetch, url, allow_private_addresses=False)
        assert caught.status == statuses.FORBIDDEN_ADDRESS and "--allow-private-addresses" in caught.message
    assert len(server.hits) == hits_before  # refused before connecting


def test_every_redirect_hop_is_checked(server, fetch, monkeypatch):
    # Treat 127.0.0.1 as public for this test only; a redirect to 127.0.0.2 must still be refused.
    monkeypatch.setattr("pipeline.addresses.is_public", lambda address: address == "127.0.0.1")
    port = server.base.rsplit(":", 1)[1]
    assert fetch(server.url("/img/ok.jpg"), allow_private_addresses=False) == OK_BYTES
    caught = failure(fetch, server.url(f"/redirect/to?location=http://127.0.0.2:{port}/img/ok.jpg"),
                     allow_private_addresses=False)
    assert caught.status == statuses.FORBIDDEN_ADDRESS and "127.0.0.2" in caught.message


@pytest.mark.parametrize("address,public", [
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("::1", False), ("fe80::1%eth0", False), ("fc00::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:10.0.0.1", False), ("8.8.8.8", True), ("2001:4860:4860::8888", True), ("::ffff:8.8.8.8", True),
])
def test_address_policy(address, public):
    assert is_public(address) is public


@pytest.mark.parametrize("values", [
    [], ["noai"], ["NoImageAI"], ["noindex, nofollow"], ["nofollow"], ["none"], ["otherbot: noai"],
    ["img2dataset: noai"], ["img2dataset:nofollow", "noimageindex"], ["otherbot: noindex", "all"],
    ["unavailable_after: 25 Jun 2010 15:00:00 PST"], ["IMG2DATASET: NOAI"],
])
@pytest.mark.parametrize("token", [None, "img2dataset"])
def test_robots_rule_matches_img2dataset(values, token):
    import pipeline.img2dataset_parts  # noqa: F401  (imports img2dataset without its network side effect)
    from img2dataset import download
    from img2dataset.downloader import is_disallowed as img2dataset_is_disallowed

    defaults = inspect.getsource(download)
    assert all(f'"{d}"' in defaults for d in DEFAULT_DISALLOWED_DIRECTIVES)  # the same default list
    headers = HTTPMessage()
    for value in values:
        headers["X-Robots-Tag"] = value
    directives = set(DEFAULT_DISALLOWED_DIRECTIVES)
    assert is_disallowed(headers, token, directives) == img2dataset_is_disallowed(headers, token, directives)
