"""--profile: the seconds of each phase of a training step, the step's FLOPs (torch's counter, once), TFLOP/s and the
utilisation of the GPU's peak, added to metrics.jsonl (docs/benchmarks.md)."""

from __future__ import annotations

import contextlib
import time

import torch

# Dense bf16 TFLOP/s per GPU, from NVIDIA's datasheets, by a part of the name torch.cuda.get_device_name gives
# ("NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL", ...). The first that matches wins: the variants before their family
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "H200 NVL": 835.0,
    "H200": 989.0,  # SXM, GH200
    "A100": 312.0,
}


def peak_tflops_of(name: str) -> float:
    """The dense bf16 peak of the GPU named `name` (PEAK_TFLOPS), 0 if unknown."""
    return next((tflops for gpu, tflops in PEAK_TFLOPS.items() if gpu in name), 0.0)


def attention_flops_cpu():
    """FLOP formulas for the CPU's fused attention kernels, which torch's counter does not know (it knows the GPU's):
    those of the GPU's flash attention, which does the same matrix products."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: fc.sdpa_flop_count(
            q, k, v
        ),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *a, **kw: (
            fc.sdpa_backward_flop_count(g, q, k, v)
        ),
    }


class Phases:
    """--profile: `with phases("name"):` adds the block's seconds to time_<name> (CUDA-synchronised, since GPU work
    is asynchronous); a no-op otherwise. The first step runs under torch's FLOP counter (matrix products,
    convolutions and attention, forward and backward; the shapes are the same at every step). report() returns
    the step's times, FLOPs, TFLOP/s, utilisation of the GPU's peak (and peak GPU memory), then resets."""

    def __init__(self, enabled: bool, device: torch.device, peak_tflops: float = 0.0):
        self.enabled, self.cuda, self.times, self.flops = enabled, device.type == "cuda", {}, None
        if self.cuda and not peak_tflops:
            peak_tflops = peak_tflops_of(torch.cuda.get_device_name(device))
        self.peak_tflops = peak_tflops

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.enabled and self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.enabled:
            if self.cuda:
                torch.cuda.synchronize()
            self.times[f"time_{name}"] = self.times.get(f"time_{name}", 0.0) + time.perf_counter() - t0

    @contextlib.contextmanager
    def count_flops(self):
        if not self.enabled or self.flops is not None:
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode

        # eager: compiled code hides its operations from the counter, and a step traced under the counter would
        # never be compiled afterwards
        with (
            torch.compiler.set_stance("force_eager"),
            FlopCounterMode(display=False, custom_mapping=attention_flops_cpu()) as counter,
        ):
            yield
        self.flops = counter.get_total_flops()

    def report(self, seconds: float) -> dict:
        row, self.times = self.times, {}
        if self.enabled and self.flops:
            row.update(flops_per_step=self.flops, tflops_per_sec=self.flops / seconds / 1e12)
            if self.peak_tflops:
                row["utilization"] = row["tflops_per_sec"] / self.peak_tflops
        if self.enabled and self.cuda:
            row["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return row
