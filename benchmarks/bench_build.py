"""Build throughput of jobs/build_shards.py: a local folder, and a loopback URL list against bare img2dataset.

    python benchmarks/bench_build.py [--images 2000] [--workers N] [--threads 32] [--repeats 2] [--out FILE]

Generates photo-like JPEGs (500x375, about ImageNet's mean size) into class folders, then:
1. folder: builds them as a `folder` source with 1 worker and with N workers -> images/s per core
   (target: >= 150);
2. URL list: serves the same files from a separate `python -m pipeline.serve_folder` process on
   127.0.0.1 and builds the list with our builder and with bare `img2dataset.download` (same
   processes, threads, shard size, image size, JPEG quality, sha256, webdataset output), runs
   interleaved, best of `--repeats` each -> ratio ours / img2dataset (target: >= 0.95).
Ray is started once and its workers warmed before timing (on a cluster it already runs), and
img2dataset is imported in this process first (both drivers use its reader); img2dataset's timing
still includes starting its worker processes, which every img2dataset run pays. Besides wall
time: images per CPU-second of the workers (ours: the shards' `cpu_seconds`; img2dataset: its
child processes' rusage), and the median per-shard rate (steady state, start-up excluded).
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which phones PyPI
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.local_ray import keep_embedded_ray_on_loopback  # noqa: E402

keep_embedded_ray_on_loopback(sys.argv)  # before ray is imported

import numpy as np  # noqa: E402
import ray  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.build_images import BuildOptions, build  # noqa: E402
from pipeline.serve_folder import url_list  # noqa: E402
from shards.reader import completed_shards, read_stats  # noqa: E402


def make_corpus(root: Path, count: int, width: int = 500, height: int = 375) -> list[str]:
    """Photo-like JPEGs: smooth colour fields plus fine noise, so they compress like photos."""
    rng = np.random.default_rng(0)
    relative = []
    for index in range(count):
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse, "RGB").resize((width, height), Image.BICUBIC), dtype=np.int16)
        image = np.clip(image + rng.integers(-12, 13, size=image.shape), 0, 255).astype(np.uint8)
        path = root / f"class_{index % 20:02d}" / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "RGB").save(path, quality=90)
        relative.append(path.relative_to(root).as_posix())
    return sorted(relative)


def stored_cpu_and_shard_rates(directory: Path) -> tuple[int, float, list[float]]:
    """Images stored, the shard tasks' CPU seconds (worker processes, all threads), per-shard images/s."""
    stats = [read_stats(directory, shard_id) for shard_id in completed_shards(directory)]
    return (sum(s["count"] for s in stats), sum(s["cpu_seconds"] for s in stats),
            [s["images_per_second"] for s in stats])


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_ours(sources: Path, output: Path, workers: int, threads: int, shard_size: int) -> tuple:
    shutil.rmtree(output, ignore_errors=True)
    options = BuildOptions(sources=sources, output=output, shard_size=shard_size, workers=workers,
                           threads_per_worker=threads, allow_private_addresses=True, retries=0)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        code = build(options)
    seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"build failed with exit code {code}")
    return (seconds, *stored_cpu_and_shard_rates(output))


def time_img2dataset(urls: Path, output: Path, workers: int, threads: int, shard_size: int) -> tuple:
    from img2dataset import download

    shutil.rmtree(output, ignore_errors=True)
    cpu_before = children_cpu_seconds()  # its pool processes are our children, reaped inside download()
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        download(url_list=str(urls), output_folder=str(output), input_format="txt", output_format="webdataset",
                 processes_count=workers, thread_count=threads, number_sample_per_shard=shard_size,
                 image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_quality=95,
                 compute_hash="sha256", timeout=10, retries=0, distributor="multiprocessing")
    seconds = time.perf_counter() - started
    stats = [json.loads(p.read_text()) for p in output.glob("*_stats.json")]
    rates = [s["successes"] / (s["end_time"] - s["start_time"]) for s in stats]
    return seconds, sum(s["successes"] for s in stats), children_cpu_seconds() - cpu_before, rates


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def folder_server(directory: Path):
    """pipeline.serve_folder in its own process, so serving does not share a GIL with either builder."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "pipeline.serve_folder", str(directory), "--port", str(port)],
                               cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "/", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_build_"))
    try:
        corpus = work / "corpus"
        relative = make_corpus(corpus, args.images)
        folder_sources = work / "folder.yaml"
        folder_sources.write_text(f"sources:\n  - name: corpus\n    kind: folder\n    path: {corpus}\n")
        ray_started = time.perf_counter()
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=args.workers, include_dashboard=False,
                 log_to_driver=False)
        ray_seconds = time.perf_counter() - ray_started
        result: dict = {"load_average_1m_at_start": round(os.getloadavg()[0], 2), "images": args.images, "image_px": [500, 375], "workers": args.workers,
                        "threads_per_worker": args.threads, "shard_size": args.shard_size,
                        "cpu_count": os.cpu_count(), "ray_start_seconds": round(ray_seconds, 2)}

        time_ours(folder_sources, work / "warmup", args.workers, args.threads, args.shard_size)  # Ray workers warm
        import pipeline.img2dataset_parts  # noqa: F401  both drivers cut URL lists with img2dataset's reader
        folder = {}
        for workers in sorted({1, args.workers}):
            seconds, stored, cpu, _ = min(time_ours(folder_sources, work / f"folder_{workers}", workers,
                                                    args.threads, args.shard_size) for _ in range(args.repeats))
            folder[f"workers_{workers}"] = {"seconds": round(seconds, 2), "stored": stored,
                                            "images_per_s": round(stored / seconds, 1),
                                            "images_per_s_per_core": round(stored / seconds / workers, 1),
                                            "images_per_cpu_second": round(stored / cpu, 1)}
        result["folder"] = folder

        with folder_server(corpus) as base:
            urls = work / "urls.txt"
            urls.write_text("".join(f"{u}\n" for u in url_list(corpus, base, relative)))
            url_sources = work / "urls.yaml"
            url_sources.write_text(f"sources:\n  - name: web\n    kind: urls\n    path: {urls}\n")
            ours, theirs = [], []
            for attempt in range(args.repeats):  # interleaved, so drifting machine load hits both alike
                ours.append(time_ours(url_sources, work / f"ours_{attempt}", args.workers, args.threads,
                                      args.shard_size))
                theirs.append(time_img2dataset(urls, work / f"img2dataset_{attempt}", args.workers, args.threads,
                                               args.shard_size))
        def summary(runs):
            seconds, stored, cpu, _ = min(runs)
            rates = sorted(rate for run in runs for rate in run[3])
            return {"seconds": round(seconds, 2), "stored": stored, "images_per_s": round(stored / seconds, 1),
                    "images_per_cpu_second": round(stored / cpu, 1), "all_runs_s": [round(r[0], 2) for r in runs],
                    "per_shard_images_per_s_median": round(rates[len(rates) // 2], 1)}

        result["url_list"] = {"ours": summary(ours), "img2dataset": summary(theirs)}
        url = result["url_list"]
        url["ratio_ours_over_img2dataset"] = round(url["ours"]["images_per_s"] / url["img2dataset"]["images_per_s"], 3)
        url["cpu_efficiency_ratio"] = round(url["ours"]["images_per_cpu_second"]
                                            / url["img2dataset"]["images_per_cpu_second"], 3)
        url["per_shard_ratio"] = round(url["ours"]["per_shard_images_per_s_median"]
                                       / url["img2dataset"]["per_shard_images_per_s_median"], 3)
        result["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
        result["targets"] = {
            "folder_images_per_s_per_core>=150": folder["workers_1"]["images_per_s_per_core"] >= 150,
            "folder_images_per_cpu_second>=150": folder["workers_1"]["images_per_cpu_second"] >= 150,
            "url_ratio>=0.95": url["ratio_ours_over_img2dataset"] >= 0.95,
        }
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
