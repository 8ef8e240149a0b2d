"""Which addresses a URL list may make us connect to (server-side request forgery guard).

URL lists are untrusted: a row pointing at 127.0.0.1, 10.x, 169.254.169.254 (cloud metadata) or
a host name that resolves there would make the crawler probe the cluster's own network. The host
is resolved once, every address is checked, and the connection goes to the checked address (no
second lookup that DNS rebinding could answer differently).
"""
from __future__ import annotations

import ipaddress
import socket

from pipeline import statuses
from pipeline.statuses import RowFailure


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve_host(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to; refuses a host with any non-public address unless allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
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
