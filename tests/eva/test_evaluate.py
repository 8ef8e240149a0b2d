"""Evaluation: labelled loaders, k-NN and linear probe, the three encoders, masked-feature cosine, CLI."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from testkit import make_image
from eva.checkpoints import checkpoint_dir_name, set_latest, write_model_weights
from eva.evaluate import (
    ImageFolderData,
    ImageShardData,
    checkpoint_encoder,
    eval_mask_generator,
    eval_transform,
    evaluate,
    extract_features,
    fixed_mask,
    knn_accuracy,
    linear_probe_accuracy,
    load_labelled,
    main,
    masked_cosine_over_training,
    masked_feature_cosine,
    random_init_encoder,
    teacher_encoder,
)
from eva.export import export_backbone
from eva.mim import MIMModel, create_mim_model
from eva.teacher import load_teacher
from eva.views import CLIP_MEAN, CLIP_STD, ViewPolicy, draw_views, render_view, to_normalized_tensor
from shards import contract
from shards.manifest import write_manifest
from shards.writer import ShardWriter

TARGET_DIM = 24
COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


# ---------------------------------------------------------------- test data (also used by test_visualize)


def class_image(colour: tuple[int, int, int], seed: int) -> Image.Image:
    """A photo-like colour field tinted towards the class colour; sizes vary, most are not square."""
    width, height = 72 + 8 * (seed % 3), 64 + 6 * (seed % 2)
    field = np.asarray(make_image(width, height, seed), dtype=np.float32)
    return Image.fromarray((0.55 * np.array(colour) + 0.45 * field).astype(np.uint8), "RGB")


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def labelled_items(per_class: int, first_seed: int) -> list[tuple[str, bytes]]:
    return [(name, jpeg_bytes(class_image(colour, first_seed + 10 * c + i)))
            for c, (name, colour) in enumerate(COLOURS.items()) for i in range(per_class)]


def write_folder(root: Path, items: list[tuple[str, bytes]]) -> Path:
    for i, (label, data) in enumerate(items):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"img{i:03d}.jpg").write_bytes(data)
    return root


def write_samples(directory: Path, samples: list[dict[str, bytes]], stage: str, shard_size: int = 4,
                  extra: dict | None = None) -> Path:
    """Shards of `shard_size` samples (members by extension) with their status rows, then the manifest."""
    for shard_id, start in enumerate(range(0, len(samples), shard_size)):
        with ShardWriter(directory, shard_id) as writer:
            for index, members in enumerate(samples[start : start + shard_size]):
                key = contract.make_key(shard_id, index, shard_size)
                writer.add_sample(key, members)
                writer.add_row({"key": key, "status": contract.STATUS_SUCCESS, "error_message": None})
            writer.close()
    write_manifest(directory, stage, config={}, extra=extra)
    return directory


def write_image_shards(directory: Path, items: list[tuple[str, bytes]]) -> Path:
    samples = [{"jpg": data, "json": json.dumps({"label": label}).encode()} for label, data in items]
    return write_samples(directory, samples, contract.STAGE_IMAGES)


def write_train_shards(directory: Path, images: list[Image.Image], targets: list[np.ndarray], views: list[list[dict]],
                       dtype: str = "float16", grid: int = 8) -> Path:
    """A train shard directory: per sample the jpg, its views, and [K, N, D] targets in `dtype`."""
    samples = []
    for image, target, sample_views in zip(images, targets, views):
        members = {"jpg": jpeg_bytes(image), "json": json.dumps({"views": sample_views}).encode()}
        if dtype == "int8":
            scales = np.abs(target).max(axis=-1) / 127.0  # [K, N]
            members["tgt.npy"] = _npy(np.round(target / scales[..., None]).astype(np.int8))
            members["tgs.npy"] = _npy(scales.astype(np.float32))
        else:
            members["tgt.npy"] = _npy(target.astype(np.float16))
        samples.append(members)
    extra = {"targets": {"grid": [grid, grid], "dim": int(targets[0].shape[-1]), "dtype": dtype, "input_size": 64,
                         "teacher": "test"},
             "views": {"k": int(targets[0].shape[0]), **ViewPolicy().to_dict(), "seed": 0}}
    return write_samples(directory, samples, contract.STAGE_TARGETS, shard_size=3, extra=extra)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def sample_views(images: list[Image.Image], count: int = 2) -> list[list[dict]]:
    return [draw_views(str(i), 0, count, image.width, image.height, ViewPolicy()) for i, image in enumerate(images)]


def decoded_view0(image: Image.Image, views: list[dict], size: int = 64) -> Image.Image:
    """View 0 as the evaluator sees it: from the stored JPEG's decoded pixels."""
    return render_view(Image.open(io.BytesIO(jpeg_bytes(image))).convert("RGB"), views[0], size)


@torch.no_grad()
def oracle_targets(model: MIMModel, images: list[Image.Image], views: list[list[dict]], mask_seed: int,
                   seed: int = 0) -> list[np.ndarray]:
    """Random [K, N, D] targets, except that view 0's masked patches hold the model's own predictions
    under the evaluation mask of that sample: a perfect student for mask_seed, cosine 1 there."""
    rng = np.random.default_rng(seed)
    generator = eval_mask_generator(model.backbone.grid_size)
    model.eval()
    targets = []
    for index, (image, sample_views) in enumerate(zip(images, views)):
        mask = fixed_mask(generator, mask_seed, index).reshape(-1)
        pixels = to_normalized_tensor(decoded_view0(image, sample_views))[None]
        target = rng.normal(size=(len(sample_views), mask.size, model.target_dim)).astype(np.float32)
        target[0][mask] = model(pixels, torch.from_numpy(mask)[None]).rows().numpy()
        targets.append(target)
    return targets


def save_checkpoint(run_dir: Path, model: MIMModel, step: int) -> Path:
    ckpt = run_dir / "checkpoints" / checkpoint_dir_name(step)
    write_model_weights(ckpt, model, {"variant": "tiny", "step": step})
    set_latest(run_dir, ckpt)
    return ckpt


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> dict[str, Path]:
    """The same three-colour-class images as folders and as image shards: train 6/class, test 3/class."""
    root = tmp_path_factory.mktemp("labelled")
    train, test = labelled_items(6, 0), labelled_items(3, 100)
    return {
        "train_folder": write_folder(root / "train", train), "test_folder": write_folder(root / "test", test),
        "train_shards": write_image_shards(root / "train_shards", train),
        "test_shards": write_image_shards(root / "test_shards", test),
    }


# ---------------------------------------------------------------- loaders


def test_image_folder_reads_every_format_and_labels_by_parent(tmp_path):
    formats = {"a.jpg": "JPEG", "b.JPEG": "JPEG", "c.png": "PNG", "d.webp": "WEBP", "e.bmp": "BMP", "f.GIF": "GIF"}
    for i, (name, fmt) in enumerate(formats.items()):
        folder = tmp_path / ("zebra" if i % 2 else "ant") / ("deep" if i == 5 else "")
        folder.mkdir(parents=True, exist_ok=True)
        make_image(40 + i, 30, seed=i, mode="L" if fmt == "PNG" else "RGB").save(folder / name, format=fmt)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "ant" / ".hidden.jpg").write_bytes(b"junk")

    data = ImageFolderData(tmp_path)
    assert data.classes == ["ant", "deep", "zebra"]  # f.GIF lies in zebra/deep: its parent is "deep"
    assert sorted(p.name for p in data.paths) == sorted(formats)
    by_name = {p.name: data.classes[int(y)] for p, y in zip(data.paths, data.labels)}
    assert by_name == {"a.jpg": "ant", "b.JPEG": "zebra", "c.png": "ant", "d.webp": "zebra", "e.bmp": "ant", "f.GIF": "deep"}
    image, label = data[data.paths.index(tmp_path / "ant" / "c.png")]
    assert image.mode == "RGB" and image.size == (42, 30) and data.classes[label] == "ant"

    # a test set in the training label space; a class the training set lacks is an error
    (tmp_path / "test" / "zebra").mkdir(parents=True)
    make_image(seed=9).save(tmp_path / "test" / "zebra" / "z.jpg")
    assert ImageFolderData(tmp_path / "test", data.classes).labels.tolist() == [2]
    with pytest.raises(ValueError, match="not among the training classes"):
        ImageFolderData(tmp_path / "test", ["ant"])


def test_image_folder_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_labelled(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no labelled images"):
        load_labelled(tmp_path / "empty")
    make_image().save(tmp_path / "loose.jpg")
    with pytest.raises(ValueError, match=r"loose\.jpg.*directly in the root"):
        load_labelled(tmp_path)
    (tmp_path / "loose.jpg").unlink()
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*broken.jpg"):
        load_labelled(tmp_path)[0]


def test_shard_loader_matches_the_folder(labelled, tmp_path):
    folder, shards = load_labelled(labelled["train_folder"]), load_labelled(labelled["train_shards"])
    assert isinstance(shards, ImageShardData) and len(shards.locations) == 18  # across 5 shards of 4
    assert shards.classes == folder.classes == ["blue", "green", "red"]
    assert shards.labels.tolist() == folder.labels.tolist()
    for i in (0, 7, 17):
        assert np.array_equal(np.asarray(shards[i][0]), np.asarray(folder[i][0]))  # the same JPEG bytes

    # duplicates listed by the dedupe stage are skipped; a sample without a label is an error
    first, second = shards.locations[0][1], shards.locations[1][1]
    pq.write_table(pa.table({"key": [second], "first_key": [first]}), labelled["train_shards"] / "duplicates.parquet")
    try:
        assert len(load_labelled(labelled["train_shards"])) == 17
    finally:
        (labelled["train_shards"] / "duplicates.parquet").unlink()
    unlabelled = write_samples(tmp_path / "unlabelled", [{"jpg": jpeg_bytes(make_image()), "json": b"{}"}], contract.STAGE_IMAGES)
    with pytest.raises(ValueError, match=r"000000\.tar: sample 0000000 has no \"label\""):
        load_labelled(unlabelled)


def test_eval_transform_resizes_the_shorter_side_and_centre_crops():
    image = Image.fromarray(np.concatenate([np.zeros((40, 20, 3)), np.full((40, 60, 3), 255), np.zeros((40, 20, 3))], axis=1).astype(np.uint8))
    tensor = eval_transform(image, 32, CLIP_MEAN, CLIP_STD)  # 100x40 -> 80x32 -> centre 32x32: all white
    assert tensor.shape == (3, 32, 32)
    white = to_normalized_tensor(Image.new("RGB", (32, 32), (255, 255, 255)))
    assert torch.allclose(tensor, white, atol=1e-5)


# ---------------------------------------------------------------- protocols


def test_knn_weights_votes_by_similarity():
    # one close neighbour of class 0 against two farther ones of class 1
    train_f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    train_y = torch.tensor([0, 1, 1, 2])
    test_f, test_y = torch.tensor([[1.0, 0.05]]), torch.tensor([0])
    assert knn_accuracy(train_f, train_y, test_f, test_y, k=3, temperature=0.07) == 1.0  # exp(1/.07) >> 2 exp(.6/.07)
    assert knn_accuracy(train_f, train_y, test_f, test_y, k=3, temperature=100.0) == 0.0  # near-equal votes: majority
    assert knn_accuracy(train_f, train_y, test_f, test_y, k=1) == 1.0
    assert knn_accuracy(train_f * 7, train_y, test_f, test_y, k=3) == 1.0  # cosine: scale-free


def test_knn_matches_a_brute_force_reference():
    gen = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(300, 16, generator=gen), torch.randn(120, 16, generator=gen)
    train_y, test_y = torch.randint(0, 5, (300,), generator=gen), torch.randint(0, 5, (120,), generator=gen)
    sims = F.normalize(test_f, dim=1) @ F.normalize(train_f, dim=1).T
    expected = []
    for row in sims:
        top = row.argsort(descending=True)[:20]
        votes = [sum(float(torch.exp(row[j] / 0.07)) for j in top if train_y[j] == c) for c in range(5)]
        expected.append(int(np.argmax(votes)))
    reference = float(np.mean(np.array(expected) == test_y.numpy()))
    assert knn_accuracy(train_f, train_y, test_f, test_y, chunk=50) == pytest.approx(reference)


def test_linear_probe_separates_blobs_and_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=gen) * 3
    train_y, test_y = torch.arange(200) % 4, torch.arange(80) % 4
    train_f = centres[train_y] + torch.randn(200, 32, generator=gen)
    test_f = centres[test_y] + torch.randn(80, 32, generator=gen)
    accuracy = linear_probe_accuracy(train_f, train_y, test_f, test_y, steps=100)
    assert accuracy >= 0.95
    assert linear_probe_accuracy(train_f, train_y, test_f, test_y, steps=100) == accuracy
    # labels unrelated to the features: chance level, not a probe that always scores high
    shuffled = linear_probe_accuracy(train_f, train_y[torch.randperm(200, generator=gen)], test_f, test_y, steps=100)
    assert shuffled < 0.6
    with pytest.raises(ValueError, match="differ in length"):
        linear_probe_accuracy(train_f, train_y[:10], test_f, test_y)


# ---------------------------------------------------------------- encoders and evaluate


def test_random_init_features_separate_colour_classes(labelled):
    encoder = random_init_encoder("tiny", seed=0)
    assert encoder.description["features"] == "mean_patch_tokens" and encoder.input_size == 64
    results = evaluate(encoder, labelled["train_folder"], labelled["test_shards"], batch_size=8, progress=False)
    assert results["train"] == {"path": str(labelled["train_folder"]), "images": 18, "classes": 3}
    assert results["test"]["images"] == 9 and results["knn"]["k"] == 18
    assert results["model"]["kind"] == "random_init" and results["model"]["dim"] == 96
    # colour survives a random patch embedding: both protocols must find the classes
    assert results["knn"]["top1"] >= 8 / 9 and results["linear"]["top1"] >= 8 / 9
    # the same seed draws the same backbone
    again = random_init_encoder("tiny", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), again.state_dict().values()))


def test_checkpoint_and_export_give_the_student_features(labelled, tmp_path):
    torch.manual_seed(1)
    model = create_mim_model("tiny", TARGET_DIM)
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, model, step=7)
    exported = export_backbone(run_dir, tmp_path / "backbone.safetensors")
    data = load_labelled(labelled["test_folder"])
    feats = {}
    for name, source in (("run", run_dir), ("file", exported)):
        encoder = checkpoint_encoder(source, pool="cls")
        feats[name], labels = extract_features(encoder, data, batch_size=4, progress=False)
        assert encoder.description["features"] == "cls_token"
    assert checkpoint_encoder(run_dir).description["step"] == 7
    assert checkpoint_encoder(run_dir).mean == CLIP_MEAN  # the trainer's default normalisation
    # a run trained with other mean/std is evaluated with them (meta holds the resolved config)
    ckpt = run_dir / "checkpoints" / checkpoint_dir_name(8)
    write_model_weights(ckpt, model, {"variant": "tiny", "step": 8, "config": {"data": {"mean": [0.5] * 3, "std": [0.25] * 3}}})
    assert (checkpoint_encoder(ckpt).mean, checkpoint_encoder(ckpt).std) == ((0.5,) * 3, (0.25,) * 3)
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([eval_transform(data[i][0], 64, CLIP_MEAN, CLIP_STD) for i in range(len(data))])
        expected = model.backbone.forward_features(pixels)[:, 0]
    assert torch.allclose(feats["run"], expected, atol=1e-5) and torch.equal(feats["run"], feats["file"])
    assert labels.tolist() == data.labels.tolist()


def test_cli_writes_json_and_rejects_bad_input(labelled, tmp_path, capsys):
    out = tmp_path / "results" / "eval.json"
    assert main(["--random-init", "tiny", "--train", str(labelled["train_shards"]), "--test", str(labelled["test_folder"]),
                 "--protocol", "knn", "--features", "cls", "--batch-size", "8", "--device", "cpu",
                 "--out", str(out), "--no-progress"]) == 0
    written = json.loads(out.read_text())
    assert written == json.loads(capsys.readouterr().out)
    assert set(written) == {"model", "train", "test", "knn"} and written["model"]["features"] == "cls_token"
    assert 0.0 <= written["knn"]["top1"] <= 1.0 and written["test"]["images"] == 9

    with pytest.raises(SystemExit) as exit_info:
        main(["--random-init", "tiny", "--train", str(labelled["train_folder"]), "--out", str(out)])
    assert exit_info.value.code == 2 and "needs --train and --test" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--random-init", "huge", "--train", str(labelled["train_folder"]), "--test", str(labelled["test_folder"]),
              "--out", str(out)])
    assert "unknown ViT variant 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--random-init", "tiny", "--train", str(tmp_path / "nope"), "--test", str(labelled["test_folder"])])
    assert "nope does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused before any feature is extracted (the files need not exist)
        main(["--checkpoint", str(tmp_path / "backbone.safetensors"), "--protocol", "knn", "masked",
              "--train", str(tmp_path / "nope"), "--test", str(tmp_path / "nope"), "--masked-data", str(tmp_path)])
    assert "--protocol masked needs the MIM head" in capsys.readouterr().err


# ---------------------------------------------------------------- masked-feature cosine


@pytest.fixture(scope="module")
def student() -> MIMModel:
    torch.manual_seed(0)
    return create_mim_model("tiny", TARGET_DIM).eval()


@pytest.fixture(scope="module")
def train_images() -> tuple[list[Image.Image], list[list[dict]]]:
    images = [make_image(90 + 4 * i, 70, seed=i) for i in range(7)]
    return images, sample_views(images)


def test_eval_mask_is_fixed_and_scaled_to_the_grid():
    generator = eval_mask_generator((8, 8))
    assert (generator.num_masking_patches, generator.min_num_patches) == (26, 4)
    big = eval_mask_generator((16, 16))
    assert (big.num_masking_patches, big.min_num_patches) == (102, 16)  # EVA: 105 in blocks of >= 16
    masks = [fixed_mask(generator, 3, i) for i in range(20)]
    assert all(np.array_equal(m, fixed_mask(generator, 3, i)) for i, m in enumerate(masks))
    assert len({m.tobytes() for m in masks}) == 20 and not np.array_equal(masks[0], fixed_mask(generator, 4, 0))
    assert all(16 <= m.sum() <= 26 for m in masks)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_masked_cosine_of_a_perfect_student_is_one(student, train_images, tmp_path, dtype):
    images, views = train_images
    targets = oracle_targets(student, images, views, mask_seed=5)
    train_dir = write_train_shards(tmp_path / "train", images, targets, views, dtype)
    result = masked_feature_cosine(student, train_dir, mask_seed=5, max_samples=6, batch_size=4)
    assert result["samples"] == 6 and result["cosine"] > 0.999

    # the baseline, computed here from the stored targets (mean over all view-0 tokens)
    generator = eval_mask_generator((8, 8))
    stored = [t[0] for t in targets[:6]]
    mean = np.concatenate(stored).mean(axis=0)
    cosines = [F.cosine_similarity(torch.from_numpy(mean)[None], torch.from_numpy(t[fixed_mask(generator, 5, i).reshape(-1)]), dim=-1)
               for i, t in enumerate(stored)]
    assert result["masked_patches"] == sum(len(c) for c in cosines)
    assert result["mean_target_baseline"] == pytest.approx(float(torch.cat(cosines).mean()), abs=2e-3)
    assert result["mean_target_baseline"] < result["cosine"] - 0.2

    # other masks: the student's predictions no longer sit where its targets are
    assert masked_feature_cosine(student, train_dir, mask_seed=6, max_samples=6, batch_size=4)["cosine"] < 0.7


def test_masked_cosine_over_training_and_mismatches(student, train_images, tmp_path):
    images, views = train_images
    train_dir = write_train_shards(tmp_path / "train", images, oracle_targets(student, images, views, 0), views)
    run_dir = tmp_path / "run"
    torch.manual_seed(3)
    save_checkpoint(run_dir, create_mim_model("tiny", TARGET_DIM), step=10)
    save_checkpoint(run_dir, student, step=20)
    curve = masked_cosine_over_training(run_dir, train_dir, mask_seed=0, max_samples=7, batch_size=7)
    assert [r["step"] for r in curve] == [10, 20]
    assert curve[0]["cosine"] < 0.5 < 0.999 < curve[1]["cosine"]
    assert curve[0]["mean_target_baseline"] == curve[1]["mean_target_baseline"]

    with torch.device("meta"):  # shapes are all the checks need
        wrong_dim, wrong_grid = create_mim_model("tiny", 16), create_mim_model("tiny", TARGET_DIM, img_size=32)
    with pytest.raises(ValueError, match="targets have dim 24, the model's head predicts 16"):
        masked_feature_cosine(wrong_dim, train_dir)
    with pytest.raises(ValueError, match=r"patch grid \[8, 8\], the model has \[4, 4\]"):
        masked_feature_cosine(wrong_grid, train_dir)
    labelled_images = write_image_shards(tmp_path / "images", [("a", jpeg_bytes(images[0]))])
    with pytest.raises(ValueError, match="is not a train shard directory"):
        masked_feature_cosine(student, labelled_images)

    out = tmp_path / "masked.json"
    assert main(["--checkpoint", str(run_dir), "--protocol", "masked", "--masked-data", str(train_dir),
                 "--max-samples", "4", "--out", str(out), "--no-progress"]) == 0
    written = json.loads(out.read_text())["masked"]
    assert written["step"] == 20 and written["samples"] == 4 and written["cosine"] > 0.999


def test_teacher_features_are_its_mean_target_token(labelled, tmp_path):
    teacher_config = str(Path(__file__).resolve().parents[2] / "configs" / "teachers" / "tiny.json")
    encoder = teacher_encoder(teacher_config, "none", seed=0)
    assert encoder.description["features"] == "mean_teacher_targets" and encoder.input_size == 64
    data = load_labelled(labelled["test_folder"])
    feats, _ = extract_features(encoder, data, batch_size=4, progress=False)
    teacher = load_teacher(teacher_config, "none", seed=0)
    with torch.no_grad():
        pixels = torch.stack([eval_transform(data[i][0], 64, teacher.mean, teacher.std) for i in range(len(data))])
        expected = teacher(pixels).mean(dim=1)  # [B, N, D] -> [B, D]
    assert feats.shape == (9, teacher.dim) and torch.allclose(feats, expected, atol=1e-5)

    out = tmp_path / "teacher.json"
    assert main(["--teacher", teacher_config, "--teacher-weights", "none", "--train", str(labelled["train_shards"]),
                 "--test", str(labelled["test_shards"]), "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    written = json.loads(out.read_text())
    assert written["model"] == {**encoder.description} and {"knn", "linear"} <= written.keys()
