"""Run-directory checkpoints (write, latest, load) and the timm-layout safetensors export."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.eva import Eva

from eva.checkpoints import (
    checkpoint_dir_name,
    latest_checkpoint,
    load_backbone,
    load_mim_model,
    set_latest,
    write_model_weights,
)
from eva.export import export_backbone, main
from eva.mim import MIMModel, create_mim_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def save_run(run_dir: Path, model: MIMModel, step: int) -> Path:
    ckpt_dir = run_dir / "checkpoints" / checkpoint_dir_name(step)
    write_model_weights(ckpt_dir, model, {"variant": "tiny", "step": step, "data_position": {"epoch": 0}})
    set_latest(run_dir, ckpt_dir)
    return ckpt_dir


@pytest.fixture
def trained_run(tmp_path) -> tuple[Path, MIMModel]:
    """A run directory with two checkpoints; the model of the latest one."""
    torch.manual_seed(0)
    run_dir = tmp_path / "run"
    save_run(run_dir, create_mim_model("tiny", 32), step=5)
    model = create_mim_model("tiny", 32, drop_path_rate=0.1)
    save_run(run_dir, model, step=10)
    return run_dir, model


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_round_trip(trained_run):
    run_dir, model = trained_run
    ckpt_dir = latest_checkpoint(run_dir)
    assert ckpt_dir == run_dir / "checkpoints" / "step_00000010"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["meta.json", "model.pt"]  # no temp files left

    for source in (run_dir, ckpt_dir):
        loaded, meta = load_mim_model(source)
        assert_same_state(loaded, model)
        assert meta["step"] == 10 and meta["variant"] == "tiny" and meta["target_dim"] == 32
        assert meta["model_kwargs"] == model.backbone.kwargs and meta["data_position"] == {"epoch": 0}
        assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    assert_same_state(load_backbone(run_dir), model.backbone)
    earlier, meta = load_mim_model(run_dir / "checkpoints" / "step_00000005")
    assert meta["step"] == 5 and not torch.equal(earlier.head.weight, model.head.weight)
    # the file is a plain state dict that loads without unpickling code
    state = torch.load(ckpt_dir / "model.pt", map_location="cpu", weights_only=True)
    assert state.keys() == model.state_dict().keys()


def test_half_model_is_saved_in_fp32(tmp_path):
    torch.manual_seed(0)
    model = create_mim_model("tiny", 16).half()
    save_run(tmp_path, model, step=1)
    loaded, _ = load_mim_model(tmp_path)
    assert all(p.dtype == torch.float32 for p in loaded.state_dict().values())
    assert torch.equal(loaded.head.weight, model.head.weight.float())


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        latest_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        load_mim_model(tmp_path)
    model = create_mim_model("tiny", 16)
    with pytest.raises(ValueError, match="step"):
        write_model_weights(tmp_path / "checkpoints" / "x", model, {"variant": "tiny"})
    outside = tmp_path / "elsewhere" / "step_00000001"
    write_model_weights(outside, model, {"variant": "tiny", "step": 1})
    with pytest.raises(ValueError, match="not directly under"):
        set_latest(tmp_path, outside)
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000099\n")
    with pytest.raises(FileNotFoundError, match="step_00000099"):
        latest_checkpoint(tmp_path)
    # weights that do not fit the kwargs in meta.json
    meta_file = outside / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "target_dim": 8}))
    with pytest.raises(ValueError, match="do not match"):
        load_mim_model(outside)


def test_export_loads_into_timm_eva_with_the_same_features(trained_run, tmp_path):
    run_dir, model = trained_run
    out = export_backbone(run_dir, tmp_path / "export" / "tiny.safetensors")
    with safe_open(out, framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    assert json.loads(metadata["model_kwargs"]) == model.backbone.kwargs
    assert metadata["source_step"] == "10" and metadata["variant"] == "tiny" and metadata["timm_model"] == ""
    assert keys == set(model.backbone.state_dict())

    timm_model = Eva(**json.loads(metadata["timm_kwargs"]))
    with safe_open(out, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    timm_model.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 64, 64)
    ours = model.backbone.eval().forward_features(images)
    torch.testing.assert_close(timm_model.eval().forward_features(images), ours, atol=1e-5, rtol=1e-5)
    assert_same_state(load_backbone(out), model.backbone)


def test_export_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.safetensors")])
    assert exit_info.value.code == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export_backbone(tmp_path, tmp_path / "x.pt")
    not_export = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, not_export)
    with pytest.raises(ValueError, match="not an exported backbone"):
        load_backbone(not_export)


def test_python_m_eva_export(trained_run, tmp_path):
    run_dir, model = trained_run
    out = tmp_path / "cli.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "eva.export", str(run_dir), "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["out"] == str(out)
    assert_same_state(load_backbone(out), model.backbone)
