"""Which addresses a URL list may make us connect to (server-side request forgery guard).

URL lists are untrusted: a row pointing at 127.0.0.1, 10.x, 169.254.169.254 (cloud metadata) or
a host name that resolves there would make the crawler probe the cluster's own network. The host
is resolved once, every address is checked, and the connection goes to the checked address (no
second lookup that DNS rebinding could answer differently). The lookup runs in a thread of its
own so that a slow or silent DNS server cannot hold a fetch past its deadline (getaddrinfo
cannot be interrupted; the abandoned lookup ends when the resolver gives up).
"""
from __future__ import annotations

import ipaddress
import socket
import threading

from pipeline import statuses
from pipeline.statuses import RowFailure


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class LookupTimeout(Exception):
    """The host name was not resolved within the time left to the fetch."""


def lookup(host: str, port: int, timeout_s: float) -> list:
    """socket.getaddrinfo, or LookupTimeout after `timeout_s`."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        literal = True
    except ValueError:
        literal = False
    if literal:  # no DNS to wait for
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    outcome: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error
        finally:
            done.set()

    threading.Thread(target=run, name="dns-lookup", daemon=True).start()
    if not done.wait(max(timeout_s, 0.0)):
        raise LookupTimeout(f"looking up {host!r} took more than {timeout_s:.3g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["infos"]


def resolve_host(host: str, port: int, allow_private: bool, timeout_s: float) -> str:
    """The address to connect to; refuses a host with any non-public address unless allowed.
    Raises LookupTimeout when the lookup takes longer than `timeout_s`."""
    try:
        infos = lookup(host, port, timeout_s)
    except (socket.gaierror, UnicodeError) as error:
        raise RowFailure(statuses.CONNECTION_ERROR, f"cannot resolve host {host!r} ({error})") from error
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise RowFailure(statuses.CONNECTION_ERROR, f"host {host!r} has no address")
    if not allow_private:
        refused = [a for a in addresses if not is_public(a)]
        if refused:
            raise RowFailure(
                statuses.FORBIDDEN_ADDRESS,
                f"host {host!r} resolves to non-public address {refused[0]} (loopback, private, link-local "
                "or reserved); refused unless --allow-private-addresses",
            )
    return addresses[0]
