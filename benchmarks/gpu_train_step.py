"""Training-step throughput of our trainer against timm's EVA-g with the same step, on one device.

    python benchmarks/gpu_train_step.py [--out results.json] [--batch 64] [--steps 10] [--no-compile]

On a GPU: EVA-g (`giant`, 224 px, patch 14), bf16, batch 64, targets 768-d. "ours" is the real
trainer step: eva.train.loop.train_one_step on the DeepSpeed engine of eva.train.engine (ZeRO-1,
AdamW, clipping 3.0) plus the loop's per-step loss all-reduce; images come as uint8 and are
normalised on the device, as from the loader. "timm" is timm's `eva_giant_patch14_224` with the
step of /work/shared/anchors/measure_h100_anchors.py (bf16 autocast, 1408->768 head, cosine loss
on the masked patches, fused AdamW); the anchor on an H100 is 221 img/s eager, 254 compiled. Both
run in this one command on the same card, each in its own subprocess (clean memory): both eager,
then, as `--time-budget` allows, ours compiled (as the trainer compiles it by default: the whole
MIM model as one graph); on a GPU with float8 tensor cores (H100), ours compiled with
`model.float8_matmuls` (eva.float8: not EVA-01's recipe, reported apart from the bf16 comparison
with timm); the `--extra-batch` sizes in the fastest setting found; timm compiled last. Target:
ours >= 300 img/s per H100. Each measurement also profiles
a few steps and reports the device time per step by kind of kernel (matmuls, attention, norms,
optimizer, copies, ...) and the share of the step the device sat idle: where the time goes (CUDA).

Without a GPU the same comparison runs on CPU at `tiny` size (fp32, batch 32) so the script can
be checked anywhere. Prints one JSON object (and writes it to --out).

The lent GPU machines have torch/timm but not deepspeed, webdataset or pydantic: carry wheels of
deepspeed, hjson, pydantic, pydantic-core, annotated-types, typing-inspection, webdataset and
braceexpand (see docs/training.md, "GPU benchmark").
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

TARGET_IMG_PER_S = 300  # per H100, EVA-g
TIMM_ANCHOR = {"eager": 221, "compiled": 254, "device": "NVIDIA H100 80GB HBM3", "batch": 64, "precision": "bf16"}
TOTAL_BUDGET_S = 420    # default --time-budget: 7 minutes (a lent GPU's session has 15 in all)
# a run starts only while the time spent is under this share of the budget (runs take 40-100 s)
COMPILE_BUDGET_SHARE = 0.48
EXTRA_BUDGET_SHARE = 0.78

# DeepSpeed settings --diagnose compares with the trainer's (each merged into its config)
DIAGNOSE_DS_OVERRIDES = {
    # DeepSpeed's default ZeRO-1 gradient path, which the trainer left in the sixth session (host time)
    "contiguous_gradients": {"zero_optimization": {"contiguous_gradients": True}},
    "overlap_comm": {"zero_optimization": {"overlap_comm": True}},
    # diagnosis only: also turns off the gradient-norm check that skips non-finite steps (its sync)
    "no_bf16_overflow_check": {"bf16": {"check_grad_overflow": False}},
}

# Kernel kinds for the profile breakdown, by (lower-case) kernel name; first match wins.
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "mm_", "conv")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "norm_kernel", "l2norm")),
    ("layer_norm", ("layer_norm", "layernorm")),
    ("communication", ("nccl",)),
    ("copy_cast", ("copy", "memcpy", "memset", "cast", "cat", "index", "gather", "scatter", "nonzero")),
)


def setup(args):
    import torch

    gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    settings = dict(variant=args.variant or ("giant" if gpu else "tiny"), batch=args.batch or (64 if gpu else 32),
                    precision=args.precision or ("bf16" if gpu else "fp32"), target_dim=768 if gpu else 64)
    return torch, device, settings


def synthetic_batch(torch, device, settings, num_masking_patches: int, min_num_patches: int):
    """One loader-shaped batch, already on the device: uint8 images, block masks, float16 targets."""
    import numpy as np

    from eva.masking import BlockMaskGenerator
    from eva.vit import VARIANTS

    variant = VARIANTS[settings["variant"]]
    side = variant["img_size"] // variant["patch_size"]
    b, size = settings["batch"], variant["img_size"]
    rng = np.random.default_rng(0)
    masks = BlockMaskGenerator((side, side), num_masking_patches, min_num_patches)
    return {
        "images": torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, device=device),
        "mask": torch.from_numpy(np.stack([masks(rng).reshape(-1) for _ in range(b)])).to(device),
        "targets": torch.randn(b, side * side, settings["target_dim"], device=device).half(),
    }


def timed(torch, device, step, steps: int, warmup: int) -> tuple[float, float]:
    """(first step seconds, mean seconds per step after warm-up)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - started
    for _ in range(warmup):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return first, (time.perf_counter() - started) / steps


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "elementwise_other"


def profile_breakdown(torch, step, step_ms: float, steps: int = 3) -> dict:
    """Device time per step by kernel kind, the top kernels, and the share of the (unprofiled)
    step time the device sat idle. CUDA only."""
    from torch.profiler import ProfilerActivity, profile

    def kernels_of(activities) -> list[tuple[float, str]]:
        torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        return [(event.self_device_time_total / 1e3 / steps, event.key) for event in prof.key_averages()
                if event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation]

    # device activity alone keeps the profiler off the launch path; some builds record kernels
    # only next to CPU activity
    kernels = kernels_of([ProfilerActivity.CUDA]) or kernels_of([ProfilerActivity.CPU, ProfilerActivity.CUDA])
    by_kind: dict[str, float] = {}
    for ms, name in kernels:
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + ms
    busy = sum(by_kind.values())
    kernels.sort(reverse=True)
    return {"device_busy_ms_per_step": round(busy, 2), "idle_share": round(max(0.0, 1.0 - busy / step_ms), 3),
            "ms_per_step_by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"ms": round(ms, 2), "kind": kernel_kind(name), "name": name[:90]} for ms, name in kernels[:12]]}


def write_trace(torch, step, path: Path, steps: int = 1) -> str:
    """A Chrome trace (gzipped) of `steps` steps: host ops with their Python stacks and the device's
    kernels, linked by correlation ids. It shows which host code the device waits on in its idle
    gaps; read it offline (chrome://tracing, Perfetto). The stacks slow the host: durations in it
    are not the step's."""
    import gzip
    import shutil
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = path.with_suffix("")  # NAME.json.gz -> NAME.json
    prof.export_chrome_trace(str(plain))
    with open(plain, "rb") as source, gzip.open(path, "wb") as target:
        shutil.copyfileobj(source, target)
    plain.unlink()
    return str(path)


def with_profile(torch, device, step, result: dict, enabled: bool) -> dict:
    if not enabled or device.type != "cuda":
        return result
    try:
        return {**result, "profile": profile_breakdown(torch, step, result["step_ms"])}
    except Exception as error:  # the timing stands without the breakdown
        return {**result, "profile": {"error": f"{type(error).__name__}: {error}"}}


def mask_geometry(settings) -> tuple[int, int]:
    return (105, 16) if settings["variant"] != "tiny" else (26, 4)  # EVA-01's, and tiny_cpu.yaml's


def measure_mim_step(torch, device, settings, args, step, model, batch) -> dict:
    """Time `step` on our MIM model; FLOPs count the masked patches of `batch`."""
    from eva.train.monitor import train_flops_per_image

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first, seconds = timed(torch, device, step, args.steps, args.warmup)
    masked = batch["mask"].sum().item() / settings["batch"]
    flops = train_flops_per_image(model.backbone.kwargs, settings["target_dim"], masked)
    return _result(torch, device, settings, first, seconds, flops, sum(p.numel() for p in model.parameters()))


def run_ours(args) -> dict:
    torch, device, settings = setup(args)
    from eva.train import engine as engine_lib
    from eva.train.config import config_from_dict
    from eva.train.loop import DTYPES, StepContext, make_model, share_step_results, train_one_step
    from eva.views import CLIP_MEAN, CLIP_STD

    num_masking, min_patches = mask_geometry(settings)
    cfg = config_from_dict({
        "model": {"name": settings["variant"], "compile": args.compile, "compile_scope": args.compile_scope,
                  "compile_mode": args.compile_mode, "float8_matmuls": args.float8},
        "data": {"train": "unused"}, "run_dir": "unused", "precision": settings["precision"],
        "mask": {"num_masking_patches": num_masking, "min_num_patches": min_patches},
        "train": {"steps": 1000, "batch_size": settings["batch"], "lr": 1.0e-4, "warmup_steps": 0},
    })
    if args.ds_override:  # a DeepSpeed setting to compare (diagnosis)
        use_deepspeed_overrides(json.loads(args.ds_override))
    dist_info = engine_lib.init_distributed()
    torch.manual_seed(0)
    with device:  # initialised where it trains: a billion trunc-normal draws on the CPU take long
        model = make_model(cfg, settings["target_dim"])
    engine = engine_lib.build_engine(model, cfg, dist_info)
    batch = synthetic_batch(torch, device, settings, num_masking, min_patches)
    channel = lambda values: torch.tensor(values, device=device).view(1, 3, 1, 1)  # noqa: E731
    ctx = StepContext(device, DTYPES[settings["precision"]], channel(CLIP_MEAN), channel(CLIP_STD), grad_accum=1,
                      mask_width=num_masking)
    batches = itertools.repeat(batch)

    def step():
        stats = train_one_step(engine, batches, 1.0e-4, ctx)
        share_step_results(stats["loss"], False, dist_info)

    result = measure_mim_step(torch, device, settings, args, step, model, batch)
    if args.phases and device.type == "cuda":
        result["phases_ms"] = phase_times(torch, engine, batches, ctx, dist_info)
    if args.trace and device.type == "cuda":
        result["trace"] = write_trace(torch, step, Path(args.trace))
    return with_profile(torch, device, step, result, args.profile)


def float8_capable(device) -> bool:
    from eva.float8 import float8_support_error

    return device.type == "cuda" and float8_support_error(device) is None


def merge_config(config: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        config[key] = merge_config(dict(config.get(key, {})), value) if isinstance(value, dict) else value
    return config


def use_deepspeed_overrides(overrides: dict) -> None:
    """Merge `overrides` into every DeepSpeed config the trainer builds from now on (diagnosis only)."""
    from eva.train import engine as engine_lib

    trainer_config = engine_lib.deepspeed_config
    engine_lib.deepspeed_config = lambda cfg: merge_config(trainer_config(cfg), overrides)


def phase_times(torch, engine, batches, ctx, dist_info, steps: int = 5) -> dict:
    """Host and device time of each phase of the trainer's step, from host clocks and CUDA events
    recorded where train_one_step marks its phases: where the device waits on the host."""
    from eva.train.loop import share_step_results, train_one_step

    names = ("forward_loss", "backward", "optimizer_step", "stats", "loss_all_reduce")  # ctx.grad_accum is 1
    host = {name: 0.0 for name in names}
    events = []
    torch.cuda.synchronize()
    for _ in range(steps):
        marks, clock = [], []

        def mark(_phase: str = "") -> None:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
            clock.append(time.perf_counter())

        mark()
        stats = train_one_step(engine, batches, 1.0e-4, ctx, mark=mark)
        share_step_results(stats["loss"], False, dist_info)  # the loop's one collective a step
        mark()
        for i, name in enumerate(names):
            host[name] += (clock[i + 1] - clock[i]) * 1e3 / steps
        events.append(marks)
    torch.cuda.synchronize()
    device_ms = {name: sum(m[i].elapsed_time(m[i + 1]) for m in events) / steps for i, name in enumerate(names)}
    return {name: {"host": round(host[name], 2), "device": round(device_ms[name], 2)} for name in names}


def run_plain(args) -> dict:
    """Our MIM model without DeepSpeed: bf16 autocast, fused AdamW, foreach clipping. Not a
    trainer path: the reference that says what DeepSpeed's step costs on top of the model."""
    torch, device, settings = setup(args)
    from eva.loss import negative_cosine_loss
    from eva.mim import create_mim_model, param_groups
    from eva.views import CLIP_MEAN, CLIP_STD, normalize_pixels

    num_masking, min_patches = mask_geometry(settings)
    torch.manual_seed(0)
    with device:
        model = create_mim_model(settings["variant"], settings["target_dim"])
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1.0e-4, betas=(0.9, 0.98), fused=device.type == "cuda")
    batch = synthetic_batch(torch, device, settings, num_masking, min_patches)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    dtype = torch.bfloat16 if settings["precision"] == "bf16" else torch.float16

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=settings["precision"] != "fp32"):
            out = model(normalize_pixels(batch["images"], mean, std), batch["mask"], num_masking)
        loss = negative_cosine_loss(out.pred, out.gather(batch["targets"]), out.valid)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = measure_mim_step(torch, device, settings, args, step, model, batch)
    return with_profile(torch, device, step, result, args.profile)


def run_timm(args) -> dict:
    torch, device, settings = setup(args)
    import timm
    import torch.nn.functional as F
    from timm.models.eva import Eva

    from eva.train.monitor import train_flops_per_image
    from eva.vit import create_vit, timm_eva_kwargs, timm_model_name

    kwargs = create_vit(settings["variant"]).kwargs
    torch.manual_seed(0)
    name = timm_model_name(kwargs)
    with device:
        model = timm.create_model(name, pretrained=False, num_classes=0) if name else Eva(**timm_eva_kwargs(kwargs))
        head = torch.nn.Linear(model.embed_dim, settings["target_dim"])
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1.0e-4, betas=(0.9, 0.98),
                                  weight_decay=0.05, fused=device.type == "cuda")
    forward = torch.compile(model.forward_features) if args.compile else model.forward_features
    num_masking, min_patches = mask_geometry(settings)
    batch = synthetic_batch(torch, device, settings, num_masking, min_patches)
    images = batch["images"].float().div(255.0)
    mask, targets = batch["mask"], batch["targets"].float()
    low_precision = settings["precision"] != "fp32"
    dtype = torch.bfloat16 if settings["precision"] == "bf16" else torch.float16

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=low_precision):
            pred = head(forward(images)[:, 1:])
        loss = -F.cosine_similarity(pred.float()[mask], targets[mask], dim=-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first, seconds = timed(torch, device, step, args.steps, args.warmup)
    n = (kwargs["img_size"] // kwargs["patch_size"]) ** 2
    flops = train_flops_per_image(kwargs, settings["target_dim"], n)  # head and last block on every patch
    result = {**_result(torch, device, settings, first, seconds, flops, sum(p.numel() for p in model.parameters())),
              "timm_model": name or "timm.models.eva.Eva(same architecture)"}
    return with_profile(torch, device, step, result, args.profile)


def _result(torch, device, settings, first, seconds, flops_per_image, params) -> dict:
    from eva.train.monitor import device_peak_tflops

    img_per_s = settings["batch"] / seconds
    peak = device_peak_tflops(device, settings["precision"])
    out = {"img_per_s": round(img_per_s, 1), "step_ms": round(seconds * 1e3, 2), "first_step_s": round(first, 2),
           "tflops": round(img_per_s * flops_per_image / 1e12, 2), "mfu": round(img_per_s * flops_per_image / (peak * 1e12), 4) if peak else None,
           "params_M": round(params / 1e6, 1)}
    if device.type == "cuda":
        out["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    return out


def child(args, which: str, compile_scope: str | None, started: float, batch: int | None = None,
          ds_override: dict | None = None, compile_mode: str = "default", float8: bool = False) -> dict:
    """Run one measurement in a fresh process (memory and process group of its own); eager when
    `compile_scope` is None, else compiled ("blocks" or "model" for ours; timm's is whole-model);
    `float8`: ours with model.float8_matmuls."""
    command = [sys.executable, __file__, "--only", which, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    for flag, value in (("batch", batch or args.batch), ("variant", args.variant), ("precision", args.precision)):
        if value:
            command += [f"--{flag}", str(value)]
    if compile_scope:
        command += ["--compile", "--compile-scope", compile_scope, "--compile-mode", compile_mode]
    if not args.no_profile:
        command.append("--profile")
    if args.diagnose and which == "ours":
        command.append("--phases")
    if ds_override:
        command += ["--ds-override", json.dumps(ds_override)]
    if float8:
        command.append("--float8")
    if args.trace_dir and which == "ours" and compile_scope == "model" and compile_mode == "default" and not (batch or ds_override):
        command += ["--trace", str(args.trace_dir / f"ours_compiled_model{'_float8' if float8 else ''}.json.gz")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    timeout = max(30.0, args.time_budget - (time.time() - started))
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (the command's budget is {args.time_budget} s)"}
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {"error": f"exit {result.returncode}: {(result.stderr or result.stdout)[-1500:]}"}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--batch", type=int, default=None, help="per device (default 64 on GPU, 32 on CPU)")
    parser.add_argument("--variant", default=None, help="model variant (default giant on GPU, tiny on CPU)")
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-kernel-kind breakdown")
    parser.add_argument("--extra-batch", type=int, nargs="+", default=[],
                        help="also measure ours at these batches (compiled on GPU, in the fastest setting "
                             "found at the default batch), in order, while time allows")
    parser.add_argument("--diagnose", action="store_true",
                        help="GPU: also time the step's phases and compile_mode reduce-overhead; then, as time "
                             "allows, per-block compile, our model without DeepSpeed and DeepSpeed settings")
    parser.add_argument("--trace-dir", type=Path, default=None,
                        help="GPU: write a Chrome trace (host ops with Python stacks, kernels) of a step of ours "
                             "compiled into this directory, to see what the device waits on")
    parser.add_argument("--time-budget", type=float, default=TOTAL_BUDGET_S,
                        help="seconds for the whole command: later runs are skipped or cut to stay inside it")
    parser.add_argument("--only", choices=("ours", "timm", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--phases", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ds-override", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile-scope", default="model", choices=("blocks", "model"), help=argparse.SUPPRESS)
    parser.add_argument("--compile-mode", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--float8", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trace", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps({"ours": run_ours, "timm": run_timm, "plain": run_plain}[args.only](args)), flush=True)
        return

    torch, device, settings = setup(args)
    from report import emit, machine  # benchmarks/, this script's directory

    started = time.time()
    results = {"machine": machine(device), **settings, "timed_steps": args.steps}

    def measure(key: str, which: str, compile_scope: str | None, batch: int | None = None,
                ds_override: dict | None = None, compile_mode: str = "default", float8: bool = False) -> None:
        results[key] = child(args, which, compile_scope, started, batch, ds_override, compile_mode, float8)
        print(f"{key}: {json.dumps({k: v for k, v in results[key].items() if k != 'profile'})}", flush=True)
        if args.out:  # what is measured so far survives a run cut short
            args.out.write_text(json.dumps(results, indent=1) + "\n")

    def spent_under(share: float) -> bool:
        return time.time() - started < share * args.time_budget

    measure("ours_eager", "ours", None)
    measure("timm_eager", "timm", None)
    compiled = device.type == "cuda" and not args.no_compile and spent_under(COMPILE_BUDGET_SHARE)
    # ours' settings at the default batch, by result key: the extra batches run in the fastest one
    ours_runs = {"ours_eager": dict(compile_scope=None)}
    if compiled:
        ours_runs["ours_compiled_model"] = dict(compile_scope="model")  # the whole MIM model as one graph
        if float8_capable(device):  # float8 matmuls for the blocks' linear layers (eva.float8)
            ours_runs["ours_compiled_model_float8"] = dict(compile_scope="model", float8=True)
        if args.diagnose:  # CUDA graphs: the forward's and backward's launches replayed in one call each
            ours_runs["ours_compiled_model_reduce_overhead"] = dict(compile_scope="model", compile_mode="reduce-overhead")
        for key, how in list(ours_runs.items())[1:]:
            if key == "ours_compiled_model" or spent_under(EXTRA_BUDGET_SHARE):
                measure(key, "ours", **how)
    fastest = max(ours_runs, key=lambda k: results.get(k, {}).get("img_per_s", 0))
    for batch in args.extra_batch:
        if spent_under(EXTRA_BUDGET_SHARE):
            measure(f"{fastest}_batch{batch}", "ours", batch=batch, **ours_runs[fastest])
    # timm's compiled step last, and only inside the budget: its compile alone outlasts the 30 s a
    # child gets past the budget (timm compiled is 252.5 img/s on an H100, BENCHMARKS.md)
    if compiled and spent_under(EXTRA_BUDGET_SHARE):
        measure("timm_compiled", "timm", "model")
    if args.diagnose and device.type == "cuda":  # last: what is left of the budget, most telling first
        if compiled and spent_under(EXTRA_BUDGET_SHARE + 0.05):
            measure("diag_ours_compiled_blocks", "ours", "blocks")  # each block compiled alone
        if spent_under(EXTRA_BUDGET_SHARE + 0.1):
            measure("diag_plain_eager", "plain", None)
        for name, override in DIAGNOSE_DS_OVERRIDES.items():
            if spent_under(EXTRA_BUDGET_SHARE + 0.1):
                measure(f"diag_ours_eager_{name}", "ours", None, ds_override=override)

    def best(prefix: str, same_batch: bool = True, float8: bool = True) -> float:
        return max((r.get("img_per_s", 0) for k, r in results.items() if isinstance(r, dict) and k.startswith(prefix)
                    and not (same_batch and "_batch" in k) and (float8 or "float8" not in k)), default=0)

    # like for like: eager against eager, compiled (whole model) against compiled, at the same batch
    # and precision (timm runs bf16 matmuls); float8 only against our own bf16 compiled step
    pairs = {"eager": ("ours_eager", "timm_eager"), "compiled": ("ours_compiled_model", "timm_compiled")}
    results["ours_vs_timm"] = {mode: round(results[ours]["img_per_s"] / results[timm]["img_per_s"], 3)
                               for mode, (ours, timm) in pairs.items()
                               if "img_per_s" in results.get(ours, {}) and "img_per_s" in results.get(timm, {})}
    if "img_per_s" in results.get("ours_compiled_model_float8", {}) and best("ours_compiled_model", float8=False):
        results["float8_vs_bf16_compiled"] = round(results["ours_compiled_model_float8"]["img_per_s"]
                                                   / best("ours_compiled_model", float8=False), 3)
    if device.type == "cuda" and settings["variant"] == "giant":
        results["target_img_per_s"] = TARGET_IMG_PER_S
        results["meets_target"] = best("ours_", same_batch=False) >= TARGET_IMG_PER_S
        results["timm_anchor"] = TIMM_ANCHOR
    results["total_s"] = round(time.time() - started, 1)
    emit(results, args.out)


if __name__ == "__main__":
    main()
