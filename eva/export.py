"""Export a run's backbone as a .safetensors file in timm's `Eva` key layout.

    python -m eva.export RUN_DIR --out FILE.safetensors

The file loads into `timm.models.eva.Eva(**json.loads(metadata["timm_kwargs"]))` with
load_state_dict(strict=True); for EVA-g that is `timm.create_model("eva_giant_patch14_224",
pretrained=False, num_classes=0, global_pool="token")` (metadata "timm_model"). Metadata also
holds our model kwargs (for eva.checkpoints.load_backbone), the variant and the source step.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from eva.checkpoints import EXPORT_FORMAT, read_checkpoint
from eva.vit import VisionTransformer, checkpoint_filter_fn, timm_eva_kwargs, timm_model_name


def export_backbone(src: Path, out: Path) -> Path:
    """Writes the backbone of `src` (a run directory or a checkpoint directory) to `out`, atomically."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"output file must end in .safetensors, got {out}")
    state, meta = read_checkpoint(Path(src))
    kwargs = meta["model_kwargs"]
    tensors = {k: v.to(torch.float32).contiguous() for k, v in checkpoint_filter_fn(state).items()}
    with torch.device("meta"):  # shapes only: checks the file matches the kwargs it records
        expected = {k: v.shape for k, v in VisionTransformer(**kwargs).state_dict().items()}
    got = {k: v.shape for k, v in tensors.items()}
    if got != expected:
        raise ValueError(f"backbone weights in {src} do not match its model_kwargs {kwargs}: differing keys "
                         f"{sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))[:10]}")
    metadata = {
        "format": EXPORT_FORMAT,
        "model_kwargs": json.dumps(kwargs, sort_keys=True),
        "timm_kwargs": json.dumps(timm_eva_kwargs(kwargs), sort_keys=True),
        "timm_model": timm_model_name(kwargs) or "",
        "variant": str(meta.get("variant", "")),
        "source_step": str(meta.get("step", "")),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eva.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="run directory (its latest checkpoint) or a checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="output FILE.safetensors")
    args = parser.parse_args(argv)
    try:
        out = export_backbone(args.src, args.out)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(json.dumps({"out": str(out), "bytes": out.stat().st_size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
