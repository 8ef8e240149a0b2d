"""`python jobs/pretrain.py` on a local Ray cluster: Ray Train's TorchTrainer runs the same trainer
on 2 CPU workers (gloo). (Resume is the same code path as `python -m eva.train`, tested there.)"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from trainer_fixtures import REPO_ROOT, TINY_CONFIG, read_log
from eva.checkpoints import latest_checkpoint, load_mim_model
from eva.train.config import load_config


def pretrain(ray_address: str, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "jobs/pretrain.py", "--config", str(TINY_CONFIG), "--workers", "2",
               "--ray-address", ray_address, *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}"
    return result


def test_pretrain_job_on_ray_trains_two_workers(ray_cluster, tiny_train_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = pretrain(ray_cluster["address"], f"data.train={tiny_train_dir}", f"run_dir={run_dir}", "train.steps=3",
                      "train.warmup_steps=1", "train.batch_size=16", "data.num_workers=1", "log.every=1",
                      "log.tensorboard=false")
    assert "done: last metrics" in result.stdout
    log = read_log(run_dir)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert log[-1]["samples_seen"] == 3 * 16 * 2  # two ranks
    assert latest_checkpoint(run_dir).name == "step_00000003"
    _, meta = load_mim_model(run_dir)
    assert meta["step"] == 3 and meta["world_size"] == 2
    assert (run_dir / "ray").is_dir()  # Ray Train's own run state lives in the run directory


def test_the_job_pins_relative_paths_before_workers_change_directory(tmp_path, monkeypatch):
    """Ray Train starts each worker in its own directory: data, run dir, teacher config and teacher
    weights files are made absolute; a pretrained tag or `none` is not a path."""
    spec = importlib.util.spec_from_file_location("pretrain_job", REPO_ROOT / "jobs" / "pretrain.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "teacher.pt").write_bytes(b"")
    online = ["data.targets=online", "data.teacher.model=teachers/tiny.json", "data.train=images", "run_dir=runs/a"]
    cfg = job.absolute_paths(load_config(TINY_CONFIG, online + ["data.teacher.weights=w/teacher.pt"]))
    assert cfg.data.teacher.weights == str(tmp_path / "w" / "teacher.pt")
    assert (cfg.data.teacher.model, cfg.data.train, cfg.run_dir) == (
        str(tmp_path / "teachers" / "tiny.json"), str(tmp_path / "images"), str(tmp_path / "runs" / "a"))
    for tag in ("openai", "none"):
        assert job.absolute_paths(load_config(TINY_CONFIG, online + [f"data.teacher.weights={tag}"])).data.teacher.weights == tag
