"""jobs/cache_targets.py end to end on a real Ray cluster with a tiny open_clip teacher (CPU).

The cached targets are checked against an independent recomputation (PIL + numpy + open_clip,
no eva/pipeline code) from the stored JPEG and the stored views.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from eva.views import ViewPolicy, draw_views
from shards import contract
from shards.reader import completed_shards, iter_tar, load_npy, read_rows
from support_shards import REPO_ROOT, TINY_TEACHER_CONFIG, make_image_shard_dir, save_tiny_teacher_weights

sys.path.insert(0, str(REPO_ROOT / "jobs"))
import cache_targets  # noqa: E402

VENV_BIN = Path(sys.executable).parent
K = 3
SHARDS = 10


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    # enough shards that a run killed after its first finished shard has work left to resume
    images = make_image_shard_dir(
        root / "images", (8,) * SHARDS, image_size=128, duplicates={(1, 2): (0, 1), (2, 3): (1, 0)},
        excluded={(0, 3), (2, 0)}, corrupt={(1, 4)},
    )
    weights = save_tiny_teacher_weights(root / "tiny.pt", seed=1234)
    return {"root": root, "images": images, "weights": weights}


def stage_args(workspace, output: Path, *extra: str, teacher: str = str(TINY_TEACHER_CONFIG)) -> list[str]:
    return ["--images", str(workspace["images"].path), "--output", str(output), "--teacher", teacher,
            "--teacher-weights", str(workspace["weights"]), "--views", str(K), "--batch-size", "8",
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def cached(workspace, ray_cluster):
    """{dtype: train directory}, each written by one in-process run against the session cluster."""
    outputs = {}
    for dtype in contract.TARGET_DTYPES:
        output = workspace["root"] / f"train_{dtype}"
        assert cache_targets.main(stage_args(workspace, output, "--dtype", dtype,
                                             "--ray-address", ray_cluster["address"])) == 0
        outputs[dtype] = output
    return outputs


def reference_visual(weights: Path) -> torch.nn.Module:
    model = open_clip.model.CLIP(**json.loads(TINY_TEACHER_CONFIG.read_text()))
    model.load_state_dict(torch.load(weights, weights_only=True))
    visual = model.visual.eval()
    visual.output_tokens = True
    return visual


def reference_targets(visual: torch.nn.Module, jpg: bytes, views: list[dict]) -> np.ndarray:
    """Crop each stored box, bicubic to 64, flip, OpenAI-CLIP normalise, patch tokens @ proj: [K, N, D]."""
    image = Image.open(io.BytesIO(jpg)).convert("RGB")
    mean = np.array(open_clip.OPENAI_DATASET_MEAN, dtype=np.float32)
    std = np.array(open_clip.OPENAI_DATASET_STD, dtype=np.float32)
    batch = []
    for view in views:
        left, top, width, height = view["box"]
        crop = image.crop((left, top, left + width, top + height)).resize((64, 64), Image.BICUBIC)
        if view["flip"]:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        batch.append(((np.asarray(crop, dtype=np.float32) / 255.0 - mean) / std).transpose(2, 0, 1))
    with torch.no_grad():
        _, tokens = visual(torch.from_numpy(np.stack(batch)))
        return (tokens @ visual.proj).numpy()


def all_samples(directory: Path) -> dict[str, dict[str, bytes]]:
    return {key: members for shard in completed_shards(directory)
            for key, members in iter_tar(contract.tar_path(directory, shard))}


def run_verify(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards.verify", str(directory)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_train_directory_is_valid_and_follows_upstream_keys(workspace, cached):
    images = workspace["images"]
    for dtype, output in cached.items():
        verified = run_verify(output)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        for shard_id in images.success_keys:
            rows = read_rows(output, shard_id)
            assert [r["key"] for r in rows] == images.expected_train_keys(shard_id)
            tar_keys = [key for key, _ in iter_tar(contract.tar_path(output, shard_id))]
            assert tar_keys == [k for k in images.expected_train_keys(shard_id) if k not in images.corrupt]
        failed = [r for s in images.success_keys for r in read_rows(output, s) if r["status"] != "success"]
        assert [(r["key"], r["status"]) for r in failed] == [(k, "decode_error") for k in sorted(images.corrupt)]
        assert "truncated" in failed[0]["error_message"]
        manifest = json.loads((output / "manifest.json").read_text())
        assert manifest["stage"] == "targets" and manifest["failed_samples"] == {"decode_error": 1}
        assert manifest["upstream"]["path"] == str(images.path.resolve())
        targets = manifest["targets"]
        assert targets["dtype"] == dtype and targets["grid"] == [8, 8] and targets["dim"] == 64
        assert targets["input_size"] == 64 and targets["random_init"] is False
        assert targets["weights_sha256"] == hashlib.sha256(workspace["weights"].read_bytes()).hexdigest()
        assert targets["normalisation"]["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
        assert manifest["views"] == {"k": K, **ViewPolicy().to_dict(), "seed": 0}
    for dtype, output in cached.items():  # images, captions, metadata and views are the same bytes upstream
        upstream = all_samples(images.path)
        for key, members in all_samples(output).items():
            assert members["jpg"] == upstream[key]["jpg"] and members["txt"] == upstream[key]["txt"]
            meta = json.loads(members["json"])
            assert {k: v for k, v in meta.items() if k != "views"} == json.loads(upstream[key]["json"])


@pytest.mark.parametrize("dtype", contract.TARGET_DTYPES)
def test_cached_targets_equal_an_independent_recomputation(workspace, cached, dtype):
    visual = reference_visual(workspace["weights"])
    samples = all_samples(cached[dtype])
    rng = np.random.default_rng(7)
    for key in rng.choice(sorted(samples), size=5, replace=False):
        members = samples[key]
        meta = json.loads(members["json"])
        width, height = Image.open(io.BytesIO(members["jpg"])).size
        assert meta["views"] == draw_views(key, 0, K, width, height, ViewPolicy())  # seeded: reproducible
        expected = reference_targets(visual, members["jpg"], meta["views"])  # [K, N, D]
        stored = load_npy(members["tgt.npy"])
        assert stored.shape == (K, 64, 64) and str(stored.dtype) == dtype
        if dtype == "float16":
            assert "tgs.npy" not in members
            relative = np.linalg.norm(stored.astype(np.float32) - expected) / np.linalg.norm(expected)
            assert relative <= 1e-3, (key, relative)
        else:
            scales = load_npy(members["tgs.npy"])
            assert scales.shape == (K, 64) and scales.dtype == np.float32
            value = stored.astype(np.float32) * scales[..., None]
            cosine = (value * expected).sum(-1) / (np.linalg.norm(value, axis=-1) * np.linalg.norm(expected, axis=-1))
            assert cosine.min() >= 0.999, (key, cosine.min())


def test_int8_is_about_half_the_bytes_of_float16(cached):
    def target_bytes(directory):
        return sum(len(m["tgt.npy"]) + len(m.get("tgs.npy", b"")) for m in all_samples(directory).values())
    assert target_bytes(cached["int8"]) < 0.6 * target_bytes(cached["float16"])


def test_rerun_is_a_no_op_and_changed_settings_are_refused(workspace, cached, capsys, tmp_path):
    output = cached["float16"]
    markers = {p.name: p.stat().st_mtime_ns for p in output.glob("*_stats.json")}
    assert cache_targets.main(stage_args(workspace, output, "--dtype", "float16")) == 0  # no Ray needed
    assert {p.name: p.stat().st_mtime_ns for p in output.glob("*_stats.json")} == markers
    other_weights = save_tiny_teacher_weights(tmp_path / "other.pt", seed=99)
    changes = [
        (["--dtype", "int8"], "targets.dtype: recorded 'float16', now 'int8'"),
        (["--views", "2"], "views.k: recorded 3, now 2"),
        (["--flip-p", "0.25"], "views.flip_p: recorded 0.5, now 0.25"),
        (["--crop-scale", "0.3,1.0"], "views.scale"),
        (["--seed", "1"], "views.seed: recorded 0, now 1"),
        (["--teacher-weights", str(other_weights)], "targets.weights_sha256"),
        (["--teacher-weights", "none"], "targets.random_init: recorded False, now True"),
    ]
    before = sorted(p.name for p in output.iterdir())
    for extra, field in changes:
        capsys.readouterr()
        assert cache_targets.main(stage_args(workspace, output, "--dtype", "float16") + extra) == 2
        error = capsys.readouterr().err
        assert "was written with another configuration" in error and field in error, error
    assert sorted(p.name for p in output.iterdir()) == before


def test_incomplete_image_directory_is_reported_and_failing_shards_are_kept_for_a_rerun(
        workspace, ray_cluster, tmp_path, capsys):
    images, output = tmp_path / "images", tmp_path / "train"
    shutil.copytree(workspace["images"].path, images)
    (images / "000001_stats.json").unlink()
    (images / "000002.tar").unlink()
    original = (images / "000003.tar").read_bytes()
    (images / "000003.tar").write_bytes(original + b"\0" * 1024)  # changed after its manifest was written
    args = ["--images", str(images), "--output", str(output), "--teacher", str(TINY_TEACHER_CONFIG),
            "--views", "1", "--device", "cpu", "--retries", "1", "--ray-address", ray_cluster["address"]]
    assert cache_targets.main(args) == 2
    error = capsys.readouterr().err
    assert "000001.tar has no completion marker" in error and "000002.tar is listed in manifest.json but missing" in error
    assert not output.exists()

    assert cache_targets.main(args + ["--allow-missing-shards"]) == 1
    error = capsys.readouterr().err
    assert "1 shard(s) failed after 2 attempt(s): 000003" in error and "checksum" in error
    kept = [s for s in range(SHARDS) if s not in (1, 2, 3)]
    assert completed_shards(output) == kept and not (output / "manifest.json").exists()

    (images / "000003.tar").write_bytes(original)
    assert cache_targets.main(args + ["--allow-missing-shards"]) == 0
    assert completed_shards(output) == sorted(kept + [3])
    manifest = json.loads((output / "manifest.json").read_text())
    assert len(manifest["skipped_upstream_shards"]) == 2
    assert run_verify(output).returncode == 0


def test_a_hung_shard_times_out_and_restarts_its_actor_while_the_others_finish(workspace, ray_cluster, tmp_path, capsys):
    """A read that never returns (the tar is a FIFO nobody writes: a stuck network filesystem) must
    not stall the stage: the actor is restarted, the shard is reported, the rest are cached."""
    images, output = tmp_path / "images", tmp_path / "train"
    shutil.copytree(workspace["images"].path, images)
    (images / "000004.tar").unlink()
    os.mkfifo(images / "000004.tar")
    args = stage_args(workspace, output, "--retries", "0", "--shard-timeout", "10",
                      "--ray-address", ray_cluster["address"])
    args[args.index("--images") + 1] = str(images)
    started = time.monotonic()
    assert cache_targets.main(args) == 1
    error = capsys.readouterr().err
    assert "1 shard(s) failed after 1 attempt(s): 000004: timed out after 10 s" in error
    assert completed_shards(output) == [s for s in range(SHARDS) if s != 4]  # shards after the hang too
    assert time.monotonic() - started < 120


def test_bad_teacher_fails_before_any_shard_is_written(workspace, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    bad_weights = stage_args(workspace, tmp_path / "out1")
    bad_weights[bad_weights.index("--teacher-weights") + 1] = str(garbage)
    assert cache_targets.main(bad_weights) == 2
    assert "garbage.pt: cannot be read" in capsys.readouterr().err
    assert cache_targets.main(stage_args(workspace, tmp_path / "out2", "--expected-grid", "16x16")) == 2
    assert "has a 8x8 patch grid (64 px input), but --expected-grid is 16x16" in capsys.readouterr().err
    assert cache_targets.main(stage_args(workspace, tmp_path / "out3", teacher="ViT-Nope")) == 2
    assert "neither an open_clip model name" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("out1", "out2", "out3"))


def alive_target_actors(dashboard: str) -> list:
    from ray.util.state import list_actors

    return list_actors(address=dashboard, filters=[("class_name", "=", "TargetCacheActor"), ("state", "=", "ALIVE")])


def test_rerun_after_kill_completes_with_nothing_lost_or_duplicated(workspace, cached, ray_cluster, tmp_path):
    resumed = tmp_path / "resumed"
    args = stage_args(workspace, resumed, "--dtype", "float16", "--ray-address", ray_cluster["address"])
    job = subprocess.Popen([sys.executable, str(REPO_ROOT / "jobs" / "cache_targets.py"), *args],
                           cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not completed_shards(resumed) and job.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    job.send_signal(signal.SIGKILL)
    job.wait()
    deadline = time.time() + 60
    while alive_target_actors(ray_cluster["dashboard"]) and time.time() < deadline:
        time.sleep(0.5)  # Ray reaps the dead driver's actor
    done_before = completed_shards(resumed)
    assert 1 <= len(done_before) < SHARDS, f"the kill came too late to test anything: {done_before}"
    assert not (resumed / "manifest.json").exists()
    kept = {s: contract.stats_path(resumed, s).read_bytes() for s in done_before}

    assert cache_targets.main(args) == 0
    assert completed_shards(resumed) == list(range(SHARDS)) and not list(resumed.glob(".*.tmp-*"))
    reference = cached["float16"]  # the same command, never interrupted
    for shard_id in range(SHARDS):
        assert contract.tar_path(resumed, shard_id).read_bytes() == contract.tar_path(reference, shard_id).read_bytes()
        assert read_rows(resumed, shard_id) == read_rows(reference, shard_id)
        if shard_id in kept:  # finished shards are not redone
            assert contract.stats_path(resumed, shard_id).read_bytes() == kept[shard_id]
    keys = [key for s in range(SHARDS) for key, _ in iter_tar(contract.tar_path(resumed, s))]
    assert len(keys) == len(set(keys)) == len(all_samples(reference))
    assert run_verify(resumed).returncode == 0


def test_ray_job_submit(workspace, cached, ray_cluster, tmp_path):
    output = tmp_path / "submitted"
    entrypoint = ["python", "jobs/cache_targets.py",
                  *stage_args(workspace, output, "--dtype", "float16", teacher="configs/teachers/tiny.json")]
    command = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir",
               str(REPO_ROOT), "--", *entrypoint]
    deadline = time.time() + 30
    while True:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        # the head's job agent registers some seconds after the dashboard answers (it never does
        # when its HTTP port, 52365 unless `ray start` is given another, is taken by another cluster)
        if "No available agent to submit job" not in result.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["targets"]["teacher"] == "configs/teachers/tiny.json"
    for shard_id in workspace["images"].success_keys:  # same views and targets as the in-process run
        assert contract.tar_path(output, shard_id).read_bytes() == \
            contract.tar_path(cached["float16"], shard_id).read_bytes()
