"""How the harness measures time and memory.

On CUDA: CUDA events around each call, after a warm-up, with the L2 cache flushed before every timed
call (a 256 MiB buffer is zeroed outside the events, as ``triton.testing.do_bench`` does) and the
inputs rotated by the caller (``fn(i)`` picks input set ``i % n``), so neither the cache nor a reused
input flatters a kernel. Peak memory: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``.

On CPU: ``time.perf_counter`` wall clock around each call (labelled ``cpu-wall``: it measures the
PyTorch reference on this machine's cores, never kernel performance) and the process's peak resident
set (``VmHWM`` from ``/proc/self/status`` after resetting it through ``/proc/self/clear_refs``; ``None``
where the kernel does not allow that).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

# The flush buffer is larger than any current GPU's L2 (H100: 50 MiB, B200: 126 MiB).
_L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass
class Timing:
    """Median and spread (20th / 80th percentile) of ``repeats`` timed calls, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    clock: str  # "cuda-events" or "cpu-wall"


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``samples`` with linear interpolation (numpy's default)."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarise(samples_ms: list[float], clock: str) -> Timing:
    return Timing(statistics.median(samples_ms), percentile(samples_ms, 0.2), percentile(samples_ms, 0.8),
                  len(samples_ms), clock)


def measure(fn: Callable[[int], object], device: torch.device, warmup: int, repeats: int) -> Timing:
    """Time ``fn(i)`` for ``i = 0 .. repeats-1`` after ``warmup`` untimed calls (CUDA events or wall clock)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for i in range(warmup):
        fn(i)
    if device.type == "cuda":
        return _measure_cuda(fn, device, warmup, repeats)
    samples = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(warmup + i)
        samples.append((time.perf_counter() - start) * 1e3)
    return summarise(samples, "cpu-wall")


def _measure_cuda(fn, device, warmup, repeats) -> Timing:
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize(device)
    for i in range(repeats):
        flush.zero_()
        starts[i].record()
        fn(warmup + i)
        ends[i].record()
    torch.cuda.synchronize(device)
    return summarise([s.elapsed_time(e) for s, e in zip(starts, ends)], "cuda-events")


def _rss_peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[Optional[int], str]:
    """Run ``fn()`` once and return ``(peak bytes, source)``: the CUDA allocator's peak during the call
    (absolute, model and inputs included) or, on CPU, the process's peak resident set during the call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), "cuda-max-memory-allocated"
    if not _rss_peak_reset():
        fn()
        return None, "unavailable (cannot reset /proc/self peak RSS)"
    fn()
    return _rss_peak_bytes(), "cpu-peak-rss (whole process)"
