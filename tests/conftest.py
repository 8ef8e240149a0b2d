"""Shared fixtures: a local Ray cluster on 127.0.0.1 that the tests stop themselves (helpers: testkit.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request

import pytest

from pipeline.local_ray import keep_embedded_ray_on_loopback
from testkit import VENV_BIN, free_port

# Every Ray the tests start (the `ray start` cluster, embedded ones, those of subprocess jobs) keeps
# to 127.0.0.1 instead of this machine's network address. Set before any test module imports ray.
keep_embedded_ray_on_loopback([])


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """`ray start --head --block` on 127.0.0.1 with the dashboard (for `ray job submit`).

    The venv's bin is first on the cluster's PATH, so a job entrypoint `python ...` runs the
    project's interpreter.

    Yields {"address": GCS address, "dashboard": http URL}. --block keeps `ray start` in the
    foreground as the parent of the cluster's processes; stopping it by pid (SIGTERM to its
    process group) takes the whole cluster down.
    """
    gcs_port, dashboard_port = free_port(), free_port()
    log = open(tmp_path_factory.mktemp("ray") / "ray_start.log", "w")
    process = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         "--include-dashboard=true", "--num-cpus=2", "--disable-usage-stats",
         # every port of its own, so concurrent test sessions never collide on Ray's fixed defaults
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # RAY_AUTH_MODE=disabled: `ray start` turns token auth on whenever ~/.ray/auth_token exists
        # (any embedded ray.init writes one), but clients given an explicit address never send it.
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
             "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{dashboard}/api/version", timeout=2).read()
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                os.killpg(process.pid, signal.SIGTERM)
                raise RuntimeError(f"ray start failed; see {log.name}")
            time.sleep(1)
    try:
        yield {"address": f"127.0.0.1:{gcs_port}", "dashboard": dashboard}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.fixture
def ray_connected(ray_cluster):
    """This test process connected to the session's cluster as a driver."""
    import ray

    ray.init(address=ray_cluster["address"], log_to_driver=False)
    try:
        yield ray_cluster
    finally:
        ray.shutdown()
