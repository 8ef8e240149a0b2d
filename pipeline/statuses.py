"""Row statuses of the image stage: `success` or one failure class per reason a row was not stored.

Every input row ends as exactly one parquet row with one of these statuses and, for failures, a
readable `error_message`; the end-of-run table counts rows per status and source.
"""
from __future__ import annotations

from shards import contract

SUCCESS = contract.STATUS_SUCCESS
EXCLUDED = contract.STATUS_EXCLUDED          # sha256 listed in --exclude-hashes

# URL rows: refused before any traffic.
MALFORMED_URL = "malformed_url"
UNSUPPORTED_SCHEME = "unsupported_scheme"    # anything but http(s)
FORBIDDEN_ADDRESS = "forbidden_address"      # loopback/private/link-local/reserved host (SSRF)
# URL rows: the fetch.
CONNECTION_ERROR = "connection_error"        # refused, reset, DNS failure, TLS failure
PROTOCOL_ERROR = "protocol_error"            # the peer does not speak HTTP
HTTP_ERROR = "http_error"                    # a non-2xx answer
REDIRECT_LOOP = "redirect_loop"
TOO_MANY_REDIRECTS = "too_many_redirects"
TIMEOUT = "timeout"                          # the total per-image deadline passed
DISALLOWED = "disallowed"                    # X-Robots-Tag opt-out
TOO_LARGE = "too_large"                      # body or file over the byte cap
# Folder rows.
UNREADABLE_FILE = "unreadable_file"
# Both: the bytes.
EMPTY = "empty"
TRUNCATED = "truncated"
NOT_AN_IMAGE = "not_an_image"
CORRUPT_IMAGE = "corrupt_image"
DECOMPRESSION_BOMB = "decompression_bomb"    # too many pixels, caught from the header
TOO_SMALL = "too_small"
INTERNAL_ERROR = "internal_error"            # a bug: the row is kept as a failure, the shard goes on


class RowFailure(Exception):
    """Why one row was not stored: a status from this module and a message a person can act on."""

    def __init__(self, status: str, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
