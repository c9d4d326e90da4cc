"""How the harness measures time and memory.

The implementations of one case are timed side by side (:func:`measure_interleaved`): warmed up, then round after
round each makes the same number of calls, taking turns call by call in an order that rotates by one at every turn,
so a neighbour's load or the caches one implementation leaves cold fall on all of them alike, and ratios come out of
one run. A sample is the mean time per call of one round; inputs rotate (``fn(i)`` picks input set ``i % n``), so a
reused input does not flatter anyone.

On CUDA: CUDA events around each call, with the L2 cache flushed before it (a 256 MiB buffer is zeroed outside the
events, as ``triton.testing.do_bench`` does). Peak memory: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``.

On CPU: ``time.perf_counter`` wall clock (labelled ``cpu-wall``: it measures the PyTorch reference on this machine's
cores, never kernel performance) or this process's CPU time (``cpu-process``), and the process's peak resident set
(``VmHWM`` from ``/proc/self/status`` after resetting it through ``/proc/self/clear_refs``; ``None`` where the kernel
does not allow that).
"""

from __future__ import annotations

import math
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


# What a CPU sample is timed with: wall time, or this process's CPU time (all its threads), which a neighbour's load
# does not stretch (with OMP_NUM_THREADS=1 the two agree on a quiet host)
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def measure(fn: Callable[[int], object], device: torch.device, warmup: int, repeats: int) -> Timing:
    """Time ``fn(i)`` for ``i = warmup .. warmup + repeats - 1``, one call at a time, after ``warmup`` untimed calls
    (CUDA events or wall clock)."""
    samples, _, clock = measure_interleaved({None: fn}, device, warmup, repeats)
    return summarise(samples[None], clock)


def call_timer(device: torch.device, warmup: int = 3, repeats: int = 10) -> Callable[..., float]:
    """``timer(fn, **what)``: the median milliseconds of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones
    (:func:`measure`; the keywords, which name what ``fn`` runs, are not used): the timer ``fastpeft tune`` passes to
    :func:`fastpeft.kernels.tuning.tune`."""
    def timer(fn: Callable[[], object], **what) -> float:
        return measure(lambda i: fn(), device, warmup, repeats).median_ms
    return timer


def measure_interleaved(fns: dict, device: torch.device, warmup: int, rounds: int, min_round_ms: float = 0.0,
                        clock: str = "wall") -> tuple:
    """``({label: [ms per call, one per round]}, calls per round, clock label)`` of the functions ``fns``
    (``{label: fn}``) timed side by side: each warmed up, then round after round each makes the same number of calls
    ``fn(i)`` (``i`` counting on from the warm-up's, so inputs rotate), the functions taking turns call by call in an
    order that rotates by one at every turn, so none always runs first on caches the one before left cold. Turns of
    one call each, not blocks of a round's calls: a shared host's load changes within milliseconds, and a block of
    20 ms that one function had to itself would catch a slow spell the others missed (two copies of one IA3 reference
    layer, M = 1, 2816x1024 forward + backward, on a 2-core host, six runs of 15 rounds: their ratio's standard
    deviation 0.058 in 20 ms blocks, 0.013 call by call).

    ``min_round_ms > 0``: one more call each calibrates the count, enough calls per round that the fastest spends at
    least that long (one call of a sub-millisecond function on CPU would time the timer and the scheduler); else one
    call per round. CUDA: events around each call, after the L2 flush; CPU: ``clock`` (:data:`CLOCKS`) around each
    call (the two clock reads, well under a microsecond, fall on every function alike)."""
    if rounds < 1:
        raise ValueError(f"repeats must be >= 1, got {rounds}")
    cuda = device.type == "cuda"
    timer = None if cuda else CLOCKS[clock]
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if cuda else None
    for fn in fns.values():
        for i in range(warmup):
            fn(i)
    first, calls = warmup, 1
    if min_round_ms > 0 and fns:
        probes = [_timed_call(fn, first, timer, flush) for fn in fns.values()]
        if cuda:
            torch.cuda.synchronize(device)
            probes = [start.elapsed_time(end) for start, end in probes]
        calls, first = max(1, math.ceil(min_round_ms / max(min(probes), 1e-6))), first + 1
    labels = list(fns)
    timed = {label: [[] for _ in range(rounds)] for label in labels}  # per round, each call's ms (CPU) or events
    for r in range(rounds):
        for c in range(calls):
            i = first + r * calls + c
            shift = i % len(labels)
            for label in labels[shift:] + labels[:shift]:
                timed[label][r].append(_timed_call(fns[label], i, timer, flush))
    if cuda:
        torch.cuda.synchronize(device)
        timed = {label: [[start.elapsed_time(end) for start, end in s] for s in per_round]
                 for label, per_round in timed.items()}
    samples = {label: [sum(s) / calls for s in per_round] for label, per_round in timed.items()}
    return samples, calls, "cuda-events" if cuda else f"cpu-{clock}"


def _timed_call(fn, i: int, timer, flush):
    """``fn(i)``: its time in ms (CPU ``timer``), or the CUDA events ``(start, end)`` around it after zeroing
    ``flush`` (read once the device is synchronised)."""
    if timer is None:
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        return start, end
    start = timer()
    fn(i)
    return (timer() - start) * 1e3


def ratio(num: list, den: list) -> float:
    """The median over rounds of per-round time ratios ``num[r] / den[r]`` (samples of :func:`measure_interleaved`):
    a neighbour's load in one round stretches both of its times alike."""
    return statistics.median(a / b for a, b in zip(num, den))


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
