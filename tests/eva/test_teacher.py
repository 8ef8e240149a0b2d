"""eva.teacher: EVA-01's target definition on a tiny open_clip config, weight checks, early failures."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from eva.teacher import LAYER, TeacherError, load_teacher
from support_shards import TINY_TEACHER_CONFIG, save_tiny_teacher_weights

TINY = str(TINY_TEACHER_CONFIG)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    return save_tiny_teacher_weights(tmp_path_factory.mktemp("teacher") / "tiny.pt", seed=1234)


def reference_clip(weights: Path) -> torch.nn.Module:
    """open_clip's CLIP built straight from the config, weights loaded strictly: no eva code."""
    model = open_clip.model.CLIP(**json.loads(TINY_TEACHER_CONFIG.read_text()))
    model.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    return model.eval()


def test_target_is_patch_tokens_after_ln_post_times_proj(tiny_weights):
    teacher = load_teacher(TINY, str(tiny_weights))
    assert teacher.input_size == 64 and teacher.grid == (8, 8) and teacher.dim == 64
    assert teacher.mean == tuple(open_clip.OPENAI_DATASET_MEAN) and teacher.std == tuple(open_clip.OPENAI_DATASET_STD)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    visual = reference_clip(tiny_weights).visual
    with torch.no_grad():
        x = visual.conv1(images).flatten(2).transpose(1, 2)  # [B, 64, W]
        cls = visual.class_embedding.expand(x.shape[0], 1, -1)
        x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
        x = visual.transformer(x)
        expected = visual.ln_post(x[:, 1:]) @ visual.proj  # [B, N, D]: cls dropped, ln_post, proj
        got = teacher(images)
    assert got.shape == (3, 64, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_frozen_and_described(tiny_weights):
    teacher = load_teacher(TINY, str(tiny_weights))
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    info = teacher.describe()
    assert info["teacher"] == TINY and info["weights"] == str(tiny_weights)
    assert info["random_init"] is False and len(info["weights_sha256"]) == 64
    assert info["grid"] == [8, 8] and info["dim"] == 64 and info["input_size"] == 64 and info["layer"] == LAYER
    assert info["normalisation"] == {"mean": list(teacher.mean), "std": list(teacher.std)}
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        teacher(torch.zeros(1, 3, 32, 32))


def test_weights_really_loaded_and_random_init_is_seeded_and_flagged(tiny_weights):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    loaded = load_teacher(TINY, str(tiny_weights))
    with torch.no_grad():
        reference = reference_clip(tiny_weights).visual
        reference.output_tokens = True
        torch.testing.assert_close(loaded(images), reference(images)[1] @ reference.proj)
        random_a, random_b = load_teacher(TINY, "none", seed=5), load_teacher(TINY, "none", seed=5)
        assert torch.equal(random_a(images), random_b(images))
        assert not torch.allclose(random_a(images), load_teacher(TINY, "none", seed=6)(images))
        assert not torch.allclose(random_a(images), loaded(images))
    assert random_a.describe()["random_init"] is True and random_a.describe()["weights_sha256"] is None
    assert random_a.describe()["init_seed"] == 5


def test_open_clip_config_file_layout_is_accepted(tmp_path):
    wrapped = tmp_path / "open_clip_config.json"
    wrapped.write_text(json.dumps({"model_cfg": json.loads(TINY_TEACHER_CONFIG.read_text()),
                                   "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    teacher = load_teacher(str(wrapped))
    assert teacher.mean == (0.5, 0.5, 0.5) and teacher.std == (0.25, 0.25, 0.25) and teacher.grid == (8, 8)


def write_config(path: Path, **vision_overrides) -> str:
    config = json.loads(TINY_TEACHER_CONFIG.read_text())
    config["vision_cfg"].update(vision_overrides)
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("model, message", [
    ("ViT-Nope-99", "neither an open_clip model name"),
    ("/no/such/teacher.json", "cannot be read"),
])
def test_unknown_model_or_missing_config(model, message):
    with pytest.raises(TeacherError, match=message):
        load_teacher(model)


def test_unreadable_or_invalid_config(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(TeacherError, match="broken.json: not valid JSON"):
        load_teacher(str(broken))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"embed_dim": 64, "text_cfg": {}}))
    with pytest.raises(TeacherError, match=r"partial.json: not an open_clip model config \(missing \['vision_cfg'\]\)"):
        load_teacher(str(partial))


def test_tower_without_eva_targets_is_refused(tmp_path):
    pooled = write_config(tmp_path / "attn_pool.json", attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)
    with pytest.raises(TeacherError, match="attn_pool.json.*not EVA's target"):
        load_teacher(pooled)
    resnet = json.loads(TINY_TEACHER_CONFIG.read_text())
    resnet["vision_cfg"] = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16}
    (tmp_path / "resnet.json").write_text(json.dumps(resnet))
    with pytest.raises(TeacherError, match="ModifiedResNet.*only defined for open_clip VisionTransformer"):
        load_teacher(str(tmp_path / "resnet.json"))


def test_missing_garbage_and_pickled_weights_are_refused(tmp_path):
    with pytest.raises(TeacherError, match="teacher weights /no/such/weights.pt: no such file"):
        load_teacher(TINY, "/no/such/weights.pt")
    with pytest.raises(TeacherError, match="not a pretrained tag"):
        load_teacher(TINY, "openai")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(TeacherError, match="garbage.pt: cannot be read as a weights-only checkpoint"):
        load_teacher(TINY, str(garbage))
    pickled = tmp_path / "pickled.pt"
    torch.save({"visual.proj": torch.zeros(64, 64), "extra": Path("/")}, pickled)  # needs unpickling a Path
    with pytest.raises(TeacherError, match="pickled.pt: cannot be read as a weights-only checkpoint"):
        load_teacher(TINY, str(pickled))


def test_weights_of_another_model_or_incomplete_are_refused(tmp_path, tiny_weights):
    wider = write_config(tmp_path / "wider.json", width=96, head_width=32)
    with pytest.raises(TeacherError, match="tiny.pt: do not fit .*wider.json"):
        load_teacher(wider, str(tiny_weights))
    state = torch.load(tiny_weights, weights_only=True)
    text_only = tmp_path / "text_only.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("visual.")}, text_only)
    with pytest.raises(TeacherError, match=r"text_only.pt: matched 0 of \d+ vision-tower tensors"):
        load_teacher(TINY, str(text_only))
    renamed = tmp_path / "renamed.pt"
    torch.save({k.replace("visual.", "vision."): v for k, v in state.items()}, renamed)
    with pytest.raises(TeacherError, match="renamed.pt: matched 0 of .* unexpected"):
        load_teacher(TINY, str(renamed))


def test_weights_for_another_input_size_are_refused(tmp_path, tiny_weights):
    """open_clip would interpolate the 8x8 position embedding to the config's 12x12 grid silently."""
    larger = write_config(tmp_path / "tiny96.json", image_size=96)
    with pytest.raises(TeacherError, match=r"tiny.pt: position embedding for 65 tokens, but .*tiny96.json' at 96 px "
                                           r"takes 145 \(a 12x12 grid and cls\)"):
        load_teacher(larger, str(tiny_weights))
    wrapped = tmp_path / "wrapped.pt"  # the same weights in a {"state_dict": {"module." ...}} training checkpoint
    torch.save({"state_dict": {f"module.{k}": v for k, v in torch.load(tiny_weights, weights_only=True).items()}}, wrapped)
    with pytest.raises(TeacherError, match="wrapped.pt: position embedding for 65 tokens"):
        load_teacher(larger, str(wrapped))
    assert load_teacher(TINY, str(wrapped)).grid == (8, 8)


def test_builtin_name_resolves_grid_and_dim_without_weights():
    teacher = load_teacher("ViT-B-32", "none")  # smallest built-in ViT: 224 px, patch 32
    assert teacher.grid == (7, 7) and teacher.dim == 512 and teacher.input_size == 224
