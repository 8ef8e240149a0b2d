"""The monitor's throughput window and the device peaks behind MFU."""
from __future__ import annotations

import types

import pytest

from eva.train import monitor as monitor_lib
from eva.train.monitor import Monitor, peak_tflops_of


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def test_throughput_counts_from_the_loops_start_and_leaves_checkpoint_saves_out(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(monitor_lib, "time", types.SimpleNamespace(perf_counter=clock.perf_counter, time=lambda: 0.0))
    monitor = Monitor(tmp_path, every=2, enabled=False, tensorboard=False, start_step=0, images_per_step=10,
                      flops_per_image=1e12, peak_tflops=10.0, world_size=1)
    stats = {"loss": 0.5, "lr": 1e-3, "loss_scale": 1.0, "grad_norm": 1.0, "data_seconds": 0.1}
    clock.now += 60.0  # set-up: loader start, engine build
    monitor.start_clock()
    clock.now += 1.0
    assert monitor.update(1, stats, {}) is None
    clock.now += 5.0  # a checkpoint save
    monitor.exclude(5.0)
    clock.now += 1.0
    record = monitor.update(2, stats, {})
    assert record["img_per_s"] == pytest.approx(20 / 2.0)  # two steps of 10 images in 2 s of training
    assert record["data_wait"] == pytest.approx(0.2 / 2.0) and record["mfu"] == pytest.approx(10 * 1e12 / 10e12)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 NVL", 835.5), ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 4090", None)])
def test_each_card_gets_its_own_dense_peak(name, peak):
    assert peak_tflops_of(name) == peak
