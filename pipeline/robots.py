"""The X-Robots-Tag opt-out rule: img2dataset's `is_disallowed` and default directives, ported.

The rule and the defaults are img2dataset's (`img2dataset/downloader.py: is_disallowed`, and
`img2dataset/main.py: download(disallowed_header_directives=...)`); tests/pipeline/test_fetch.py
checks that both agree header by header. It is ported rather than imported because importing
img2dataset pulls in its whole stack (albumentations, OpenCV, webdataset and through it torch):
about 10 s and 0.8 GB per shard worker process, for a ten-line function.
"""
from __future__ import annotations

from email.message import Message
from typing import Iterable

DEFAULT_DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")


def is_disallowed(headers: Message, user_agent_token: str | None, disallowed_directives: Iterable[str]) -> bool:
    """True when an X-Robots-Tag header, for every agent or for `user_agent_token`, lists a
    disallowed directive. Header form: `[agent:] directive[, directive...]`."""
    directives_set = set(disallowed_directives)
    for value in headers.get_all("X-Robots-Tag", []):
        agent_and_directives = value.split(":", 1)
        directives = [d.strip().lower() for d in agent_and_directives[-1].split(",")]
        agent = agent_and_directives[0].lower() if len(agent_and_directives) == 2 else None
        if (agent is None or agent == user_agent_token) and any(d in directives_set for d in directives):
            return True
    return False
