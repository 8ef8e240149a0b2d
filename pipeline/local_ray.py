"""Keep a single-machine (embedded) Ray on the loopback interface.

Ray resolves `127.0.0.1` given as the node address to this machine's network address (Linux
default), so an embedded Ray, and Ray Train's process group, would listen there. With
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it keeps 127.0.0.1; the only other effect is that other
machines cannot join, which an embedded Ray never wants. Ray reads the variable when it is first
imported, so this must run before anything imports ray.
"""
from __future__ import annotations

import os

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_embedded_ray_on_loopback(argv: list[str]) -> None:
    """Set the variable unless the job will join a cluster (RAY_ADDRESS, or --ray-address in argv)."""
    joins_cluster = os.environ.get("RAY_ADDRESS") or any(
        arg == "--ray-address" or arg.startswith("--ray-address=") for arg in argv)
    if not joins_cluster:
        os.environ.setdefault(LOOPBACK_ENV, "0")
