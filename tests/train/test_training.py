"""`python -m eva.train` end to end on CPU with real DeepSpeed engines: loss falls, checkpoints
describe themselves, exact resume, SIGTERM, non-finite loss, manifest refusal, online teacher,
and a 2-process run (torchrun, gloo)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer_fixtures import REPO_ROOT, TINY_CONFIG, TINY_TEACHER, build_image_dir, free_port, read_log, run_trainer
from eva.checkpoints import latest_checkpoint, load_mim_model
from eva.train.config import load_config
from eva.train.engine import WeightsOnlyCheckpointEngine
from shards import contract
from shards.manifest import manifest_hash

# small, fast runs: 16 images per step, 2 loader workers (exercises the worker rotation on resume)
FAST = ("train.batch_size=16", "data.num_workers=2", "data.shuffle_buffer=64", "train.warmup_steps=3",
        "log.every=1", "log.tensorboard=false")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(latest_checkpoint(run_dir) / "model.pt", map_location="cpu", weights_only=True)


def test_loss_falls_and_the_checkpoint_describes_itself(tiny_train_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_trainer(f"data.train={tiny_train_dir}", f"run_dir={run_dir}", "train.steps=30",
                         "train.warmup_steps=5", "log.every=5", "checkpoint.every=15")
    assert "finished at step 30" in result.stdout
    log = read_log(run_dir)
    assert [r["step"] for r in log] == list(range(5, 31, 5))
    for record in log:
        assert {"step", "loss", "loss_avg", "lr", "loss_scale", "img_per_s", "data_wait", "mfu", "skipped_steps"} <= set(record)
    # window means (5 steps of 32 images each): one step's loss moves by ~0.03 from batch to batch
    first, last = log[0]["loss_avg"], log[-1]["loss_avg"]
    assert last < first - 0.05, [r["loss_avg"] for r in log]
    assert log[-1]["lr"] < log[1]["lr"]  # cosine decay after warmup
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.train.steps == 30 and resolved.data.train == str(tiny_train_dir)

    ckpt = latest_checkpoint(run_dir)
    assert ckpt.name == "step_00000030" and (run_dir / "checkpoints" / "step_00000015").is_dir()
    model, meta = load_mim_model(run_dir)
    assert meta["variant"] == "tiny" and meta["target_dim"] == 64 and meta["step"] == 30
    assert meta["model_kwargs"]["embed_dim"] == 96 and meta["model_kwargs"]["drop_path_rate"] == 0.1
    assert meta["samples_seen"] == 30 * 32 and meta["data_position"] == {"start_epoch": 0, "batches": 30}
    assert meta["train_manifest_sha256"] == manifest_hash(tiny_train_dir)
    assert meta["config"] == resolved.to_dict() and meta["world_size"] == 1 and meta["skipped_steps"] == 0
    assert model.head.out_features == 64
    # everything in a checkpoint loads without unpickling arbitrary objects
    engine = WeightsOnlyCheckpointEngine()
    for path in ckpt.rglob("*.pt"):
        assert isinstance(engine.load(str(path), map_location="cpu"), dict), path


def test_float8_matmuls_run_through_the_trainer_eager_and_compiled(tiny_train_dir, tmp_path, monkeypatch):
    """model.float8_matmuls moves the loss only by float8 rounding, and compiles with the model as
    one graph, as on a GPU (on the CPU, inductor runs the same float8 matmuls)."""
    monkeypatch.setenv("TORCH_LOGS", "graph_breaks")
    common = (f"data.train={tiny_train_dir}", "train.steps=3", "model.drop_path=0", *FAST)  # 16 images: float8-sized rows
    run_trainer(*common, f"run_dir={tmp_path / 'exact'}")
    run_trainer(*common, "model.float8_matmuls=true", f"run_dir={tmp_path / 'float8'}")
    compiled = run_trainer(*common, "model.float8_matmuls=true", "model.compile=true", f"run_dir={tmp_path / 'compiled'}")
    exact, fp8 = read_log(tmp_path / "exact"), read_log(tmp_path / "float8")
    assert load_config(tmp_path / "float8" / "config.yaml").model.float8_matmuls
    # the same first batch and weights: loss (a mean cosine, ~0 at init) and gradient norm differ
    # only by float8 rounding in the blocks
    assert fp8[0]["loss"] != exact[0]["loss"] and abs(fp8[0]["loss"] - exact[0]["loss"]) < 0.005, (fp8[0], exact[0])
    assert abs(fp8[0]["grad_norm"] / exact[0]["grad_norm"] - 1) < 0.05, (fp8[0], exact[0])
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in fp8)
    assert "graph break" not in compiled.stderr.lower()
    assert [r["loss"] for r in read_log(tmp_path / "compiled")] == pytest.approx([r["loss"] for r in fp8], rel=1e-3)


# the trainer's own main(), run by `python -c PATCH + TRAINER_MAIN -m eva.train --config ...`
TRAINER_MAIN = """
import sys
from eva.train.main import main
sys.exit(main(sys.argv[3:]))  # argv: -c -m eva.train --config ...
"""

# every fsync and rename the trainer makes, appended to $DISK_LOG as it happens
RECORD_DISK_WRITES = """
import json, os
log = open(os.environ["DISK_LOG"], "a")
real_fsync, real_replace = os.fsync, os.replace
def record(*event):
    log.write(json.dumps(event) + "\\n")
    log.flush()
def fsync(fd):
    real_fsync(fd)
    record("fsync", os.readlink(f"/proc/self/fd/{fd}"))
def replace(src, dst, **kwargs):
    real_replace(src, dst, **kwargs)
    record("replace", os.path.realpath(dst))
os.fsync, os.replace = fsync, replace
"""


def test_every_file_of_a_checkpoint_is_on_disk_before_latest_names_it(tiny_train_dir, tmp_path, monkeypatch):
    """A machine crash (not only a process crash) must not leave `latest` naming empty files."""
    monkeypatch.setenv("DISK_LOG", str(tmp_path / "disk.jsonl"))
    run_dir = tmp_path / "run"
    run_trainer(f"data.train={tiny_train_dir}", "train.steps=3", "checkpoint.every=3", *FAST, f"run_dir={run_dir}",
                launcher=[sys.executable, "-c", RECORD_DISK_WRITES + TRAINER_MAIN])
    events = [tuple(json.loads(line)) for line in (tmp_path / "disk.jsonl").read_text().splitlines()]
    checkpoints = (run_dir / "checkpoints").resolve()
    named = events.index(("replace", str(checkpoints / "latest")))
    synced_before = {path for kind, path in events[:named] if kind == "fsync"}
    ckpt = latest_checkpoint(run_dir).resolve()
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    assert {"model.pt", "meta.json", "rank_00000.pt", "mp_rank_00_model_states.pt"} <= {p.name for p in files}
    assert any(p.suffix == ".pt" and "optim_states" in p.name for p in files)  # DeepSpeed's ZeRO partition
    assert [str(p) for p in files + [ckpt] if str(p) not in synced_before] == []
    assert ("fsync", str(checkpoints)) in events[named:]  # the rename of `latest` itself


def resume_copy(straight: Path, step: int, destination: Path) -> None:
    """A run directory as if `straight` had stopped after `step` (train.stop_at=step): its
    checkpoint there, `latest` naming it, and the log up to it."""
    name = f"step_{step:08d}"
    shutil.copytree(straight / "checkpoints" / name, destination / "checkpoints" / name)
    (destination / "checkpoints" / "latest").write_text(name + "\n")
    (destination / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_log(straight) if r["step"] <= step))


def assert_same_run(a: Path, b: Path) -> None:
    log_a, log_b = read_log(a), read_log(b)
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b]
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in log_a] == [(r["loss"], r["grad_norm"], r["lr"]) for r in log_b]
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_is_exact(tiny_train_dir, tmp_path):
    """14 steps straight == 7 steps, stop, resume to 14 (crossing an epoch: 192 samples = 12 steps).

    The stopped run is the straight run's step-7 checkpoint in a fresh run directory: the state a
    run stopped by train.stop_at=7 leaves (the SIGTERM test covers stopping itself)."""
    common = (f"data.train={tiny_train_dir}", "train.steps=14", "checkpoint.every=7", *FAST)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_trainer(*common, f"run_dir={straight}")
    resume_copy(straight, 7, resumed)
    second = run_trainer(*common, f"run_dir={resumed}")
    assert f"resuming from {resumed / 'checkpoints' / 'step_00000007'} at step 7" in second.stdout
    assert_same_run(straight, resumed)


def test_sigterm_saves_a_checkpoint_and_a_rerun_resumes(tiny_train_dir, tmp_path):
    run_dir = tmp_path / "run"
    common = (f"data.train={tiny_train_dir}", f"run_dir={run_dir}", "train.steps=1000", "checkpoint.every=1000", *FAST)
    command = [sys.executable, "-m", "eva.train", "--config", str(TINY_CONFIG), *common]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ((run_dir / "log.jsonl").exists() and len(read_log(run_dir)) >= 3):
            assert process.poll() is None and time.time() < deadline, process.communicate()
            time.sleep(0.5)
        os.killpg(process.pid, signal.SIGTERM)  # the whole group, loader workers included
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, stderr[-3000:]
    step = read_log(run_dir)[-1]["step"]
    assert f"terminated at step {step} (SIGTERM)" in stdout
    assert latest_checkpoint(run_dir).name == f"step_{step:08d}"
    rerun = run_trainer(*common, f"train.stop_at={step + 2}")
    assert f"resuming from {run_dir / 'checkpoints' / f'step_{step:08d}'} at step {step}" in rerun.stdout
    assert f"stopped at step {step + 2} (train.stop_at reached)" in rerun.stdout
    assert [r["step"] for r in read_log(run_dir)] == list(range(1, step + 3))
    assert latest_checkpoint(run_dir).name == f"step_{step + 2:08d}"


def optimizer_settings(ckpt: Path) -> dict:
    """What the ZeRO optimizer state in a checkpoint trained with: per-group AdamW settings, clipping."""
    [path] = (ckpt / "deepspeed").glob("zero_pp_rank_0_*optim_states.pt")
    state = WeightsOnlyCheckpointEngine().load(str(path), map_location="cpu")["optimizer_state_dict"]
    groups = state["base_optimizer_state"]["param_groups"]
    return {"weight_decay": [g["weight_decay"] for g in groups], "betas": [tuple(g["betas"]) for g in groups],
            "eps": [g["eps"] for g in groups], "clip_grad": state["clip_grad"]}


def test_a_run_resumed_with_changed_optimizer_settings_trains_with_them(tiny_train_dir, tmp_path):
    run_dir = tmp_path / "run"
    common = (f"data.train={tiny_train_dir}", "train.steps=4", "checkpoint.every=2", *FAST, f"run_dir={run_dir}")
    run_trainer(*common, "train.stop_at=2")
    assert optimizer_settings(latest_checkpoint(run_dir)) == {
        "weight_decay": [0.05, 0.0], "betas": [(0.9, 0.98)] * 2, "eps": [1e-6] * 2, "clip_grad": 3.0}
    resumed = run_trainer(*common, "train.weight_decay=0.1", "train.betas=[0.8,0.95]", "train.eps=1e-8", "train.clip_grad=1.0")
    assert "(config changed: train.betas, train.clip_grad, train.eps, train.weight_decay)" in resumed.stdout
    assert latest_checkpoint(run_dir).name == "step_00000004"
    assert optimizer_settings(latest_checkpoint(run_dir)) == {
        "weight_decay": [0.1, 0.0], "betas": [(0.8, 0.95)] * 2, "eps": [1e-8] * 2, "clip_grad": 1.0}


def test_a_checkpoint_with_other_weight_decay_groups_is_refused_before_deepspeed_loads_it(tiny_train_dir, tmp_path):
    """ZeRO lays out its optimizer state by parameter group: DeepSpeed's own error would blame its
    alignment setting. The checkpoint records the undecayed parameters; resume compares them."""
    run_dir = tmp_path / "run"
    common = (f"data.train={tiny_train_dir}", "train.steps=4", "checkpoint.every=2", *FAST, f"run_dir={run_dir}")
    run_trainer(*common, "train.stop_at=2")
    meta_path = latest_checkpoint(run_dir) / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert "backbone.cls_token" in meta["undecayed_parameters"] and "mask_token" not in meta["undecayed_parameters"]
    meta["undecayed_parameters"] = sorted(meta["undecayed_parameters"] + ["mask_token"])  # as an older grouping had it
    meta_path.write_text(json.dumps(meta))
    refused = run_trainer(*common, check=False)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "was written with other weight-decay groups (moved: mask_token)" in refused.stderr


def test_a_run_of_nonfinite_losses_stops_naming_the_step_and_last_good_checkpoint(tiny_train_dir, tmp_path):
    run_dir = tmp_path / "run"
    # an absurd LR: step 1 is finite and checkpointed, then the weights overflow and the loss is NaN
    result = run_trainer(f"data.train={tiny_train_dir}", f"run_dir={run_dir}", "train.steps=50", "train.lr=1e30",
                         "train.min_lr=0", "checkpoint.every=1", "train.nonfinite_patience=3", *FAST,
                         "train.warmup_steps=0", check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    good = run_dir / "checkpoints" / "step_00000001"
    assert f"loss was not finite for 3 consecutive steps (steps 2 to 4); stopping at step 4. " \
           f"Last good checkpoint: {good}" in result.stderr
    log = read_log(run_dir)
    assert [r["skipped_steps"] for r in log] == [0, 1, 2, 3]  # DeepSpeed dropped the non-finite updates
    strict = [json.loads(line, parse_constant=lambda name: pytest.fail(f"log.jsonl holds {name}"))
              for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] is None for r in strict] == [False, True, True, True]  # null, not NaN
    assert latest_checkpoint(run_dir) == good


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed runs fp16 on CUDA only")
def test_fp16_overflow_at_the_minimum_loss_scale_stops_naming_the_step_and_last_good_checkpoint(tiny_train_dir, tmp_path):
    """DeepSpeed's scaler raises a bare Exception there, before the patience count could stop the run."""
    run_dir = tmp_path / "run"
    result = run_trainer(f"data.train={tiny_train_dir}", f"run_dir={run_dir}", "precision=fp16", "train.steps=50",
                         "train.lr=1e30", "train.min_lr=0", "checkpoint.every=1", "train.nonfinite_patience=50",
                         "loss_scale.initial_scale_power=1", "loss_scale.hysteresis=1", *FAST, "train.warmup_steps=0",
                         check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "fp16 gradients overflowed at the minimum loss scale (loss_scale.min_scale = 1) at step " in result.stderr
    assert f"Last good checkpoint: {run_dir / 'checkpoints' / 'step_00000001'}" in result.stderr


# the third step raises what DeepSpeed's fp16 scaler raises at its minimum
SCALER_GIVES_UP_AT_STEP_3 = """
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
import eva.train.loop as loop
real_step, calls = loop.train_one_step, []
def train_one_step(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        DynamicLossScaler(init_scale=1.0, scale_window=1, min_scale=1.0, delayed_shift=1,
                          consecutive_hysteresis=False).update_scale(True)
    return real_step(*args, **kwargs)
loop.train_one_step = train_one_step
"""


def test_deepspeeds_scaler_giving_up_stops_like_a_nonfinite_run(tiny_train_dir, tmp_path):
    """The loop's side of it on the CPU (the fp16 run itself needs CUDA: the test above)."""
    run_dir = tmp_path / "run"
    result = run_trainer(f"data.train={tiny_train_dir}", f"run_dir={run_dir}", "train.steps=5", "checkpoint.every=2",
                         *FAST, launcher=[sys.executable, "-c", SCALER_GIVES_UP_AT_STEP_3 + TRAINER_MAIN], check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert (f"fp16 gradients overflowed at the minimum loss scale (loss_scale.min_scale = 1) at step 3; stopping. "
            f"Last good checkpoint: {run_dir / 'checkpoints' / 'step_00000002'}") in result.stderr


def test_compiled_training_follows_the_eager_losses_and_keeps_the_checkpoint_keys(tiny_train_dir, tmp_path, monkeypatch):
    """model.compile with either scope trains like eager, and checkpoints keep their keys. Scope
    `model` traces the MIM forward as one graph (no graph break; DeepSpeed's hooks stay eager);
    scope `blocks` traces each block."""
    monkeypatch.setenv("TORCH_LOGS", "dynamo,graph_breaks")  # dynamo reports each frame it traces
    losses, keys, traced = {}, {}, {}
    for name, extra in (("eager", ()), ("blocks", ("model.compile=true", "model.compile_scope=blocks")),
                        ("model", ("model.compile=true", "model.compile_scope=model"))):
        run_dir = tmp_path / name
        # no drop path: compiled code draws its random numbers differently from eager
        result = run_trainer(f"data.train={tiny_train_dir}", f"run_dir={run_dir}", "train.steps=3", "model.drop_path=0",
                             "checkpoint.every=3", *FAST, *extra)
        losses[name] = [r["loss"] for r in read_log(run_dir)]
        keys[name] = set(final_weights(run_dir))
        traced[name] = [line.split("start tracing ", 1)[1].split()[:2] for line in result.stderr.splitlines()
                        if "start tracing " in line]
        assert "graph break" not in result.stderr.lower(), name
    assert len(losses["eager"]) == 3 and traced["eager"] == []
    assert [(fn, Path(path).name.split(":")[0]) for fn, path in traced["model"]] == [("forward", "mim.py")]
    assert {(fn, Path(path).name.split(":")[0]) for fn, path in traced["blocks"]} == {("forward", "vit.py")}
    for name in ("blocks", "model"):
        assert losses[name] == pytest.approx(losses["eager"], rel=1e-4), (name, losses)
        assert keys[name] == keys["eager"]


def test_a_mismatched_train_dir_is_refused_naming_both_values(tiny_train_dir, tmp_path):
    result = run_trainer(f"data.train={tiny_train_dir}", f"run_dir={tmp_path / 'run'}", "model.name=small", check=False)
    assert result.returncode == 1
    assert "the patch grid is [8, 8] in its manifest but [16, 16] for this run (model.name=small)" in result.stderr
    assert not (tmp_path / "run").exists()


def test_online_teacher_mode_trains_on_image_shards(tmp_path):
    images = build_image_dir(tmp_path / "images", shards=2, per_shard=24, duplicates=[contract.make_key(0, 1, 24)])
    run_dir = tmp_path / "run"
    run_trainer(f"data.train={images}", f"run_dir={run_dir}", "data.targets=online",
                f"data.teacher.model={TINY_TEACHER}", "train.steps=4", "checkpoint.every=100", *FAST)
    log = read_log(run_dir)
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(-1 <= r["loss"] <= 1 for r in log)
    _, meta = load_mim_model(run_dir)
    assert meta["target_dim"] == 64 and meta["train_manifest_sha256"] == manifest_hash(images)


def test_two_process_deepspeed_run_and_exact_resume(tiny_train_dir, tmp_path):
    """torchrun, 2 ranks on gloo, ZeRO-1, activation checkpointing: 4 steps straight == 2 steps,
    stop, resume to 4."""
    def torchrun(run_dir: Path) -> subprocess.CompletedProcess:
        launcher = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                    "--master_port", str(free_port())]
        return run_trainer(f"data.train={tiny_train_dir}", f"run_dir={run_dir}", "train.steps=4",
                           "checkpoint.every=2", *FAST, "data.num_workers=1", "model.grad_checkpointing=true",
                           launcher=launcher)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun(straight)
    assert read_log(straight)[-1]["samples_seen"] == 4 * 16 * 2
    ckpt = latest_checkpoint(straight)
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert len(list((ckpt / "deepspeed").glob("*optim_states.pt"))) == 2  # ZeRO-1: one partition per rank
    resume_copy(straight, 2, resumed)
    torchrun(resumed)
    assert_same_run(straight, resumed)
