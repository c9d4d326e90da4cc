"""``fastpeft tune``: measure the NF4 GEMV / split-K / cuBLAS crossovers on this GPU and save them.

The shipped thresholds (``fastpeft.kernels.nf4_dispatch.THRESHOLDS``) are bitsandbytes' calibrations per
architecture. ``tune`` times the three variants of ``nf4_lora_matmul`` (forced with
``nf4_dispatch.set_thresholds``) over ``SHAPES`` x ``M_GRID`` on the current GPU with the timer its caller
passes, and writes, per output width, the crossovers as tiers in the shipped table's form to the file of
``fastpeft.kernels.tune_file``, which ``nf4_path`` then prefers for the running architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from ..nf4 import NF4Weight
from . import nf4_dispatch
from .nf4_matmul import nf4_lora_matmul
from .tune_file import FORMAT, tune_path, write

# (N, K) of the NF4 layers of a 7-8B Llama (attention, MLP up / down) and their transposes for dx: the
# grid of the static check's NF4 product shapes.
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336))
M_GRID = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
VARIANTS = ("gemv", "splitk", "cublas")
# The GEMV is built for one row (its rows are a static loop in registers): it is timed up to this M only,
# and counted as losing above (``null`` in the file).
GEMV_TUNE_MAX_M = 8
_FORCE = {"gemv": (1 << 30, 1 << 30), "splitk": (0, 1 << 30), "cublas": (0, 0)}


def crossovers(times: dict) -> tuple[int, int]:
    """``(gemv_max_m, triton_max_m)`` from ``{m: {variant: ms}}`` of one shape: the GEMV keeps every M up to
    the first one where the split-K GEMM beats it, Triton every M up to the first one where cuBLAS beats
    both (crossovers are monotone in M for these kernels; the first crossing decides)."""
    ms = sorted(times)
    gemv_max = triton_max = 0
    for m in ms:
        if times[m]["gemv"] is None or times[m]["gemv"] > times[m]["splitk"]:
            break
        gemv_max = m
    for m in ms:
        if min(times[m]["gemv"] if m <= gemv_max else float("inf"), times[m]["splitk"]) > times[m]["cublas"]:
            break
        triton_max = m
    return gemv_max, max(triton_max, gemv_max)


def tiers_from(measurements: list, sms: int) -> list:
    """Tiers ``[waves, gemv_max_m, triton_max_m]`` (descending waves), one per measured output width ``N``;
    where several ``K`` share an ``N`` the most conservative crossover is kept."""
    by_n: dict = {}
    for row in measurements:
        by_n.setdefault(row["n"], {}).setdefault(row["k"], {})[row["m"]] = {v: row[v] for v in VARIANTS}
    tiers = []
    for n, per_k in by_n.items():
        pairs = [crossovers(times) for times in per_k.values()]
        tiers.append([-(-n // 64) / sms, min(p[0] for p in pairs), min(p[1] for p in pairs)])
    tiers.sort(key=lambda tier: -tier[0])
    tiers[-1][0] = 0.0  # the narrowest measured width stands for everything narrower
    return tiers


def tune(
    timer: Callable[..., float],
    *,
    shapes=SHAPES,
    m_grid=M_GRID,
    dtype: torch.dtype = torch.bfloat16,
    device: Optional[torch.device] = None,
    arch: Optional[tuple] = None,
    gpu: Optional[str] = None,
    sms: Optional[int] = None,
    path: Optional[Path] = None,
    progress: Callable[[str], None] = lambda line: None,
) -> dict:
    """Measure, write the file (``path``, default :func:`tune_path`) and return its content.

    ``timer(fn, variant=, m=, n=, k=)`` returns milliseconds for calling ``fn`` (the keywords name what ``fn``
    runs); ``fastpeft tune`` passes the benchmark harness's CUDA-event timer.
    ``device`` / ``arch`` / ``gpu`` / ``sms`` default to the current CUDA device's (tests pass them with a
    CPU device and a synthetic timer)."""
    if device is None:
        if not torch.cuda.is_available():
            raise RuntimeError("fastpeft tune measures kernels on a GPU; no CUDA device is available")
        device = torch.device("cuda", torch.cuda.current_device())
    if arch is None or gpu is None or sms is None:
        props = torch.cuda.get_device_properties(device)
        arch = arch or (props.major, props.minor)
        gpu = gpu or props.name
        sms = sms or props.multi_processor_count
    measurements = []
    previous = dict(nf4_dispatch._overrides)
    try:
        for n, k in shapes:
            weight = NF4Weight.quantize(torch.randn(n, k, device=device), 64, double_quant=True)
            for m in m_grid:
                a = torch.randn(m, k, device=device, dtype=dtype)
                row = {"n": n, "k": k, "m": m}
                for variant in VARIANTS:
                    if variant == "gemv" and m > GEMV_TUNE_MAX_M:
                        row[variant] = None
                        continue
                    nf4_dispatch.set_thresholds(*_FORCE[variant])
                    row[variant] = float(timer(lambda: nf4_lora_matmul(a, weight), variant=variant, m=m, n=n, k=k))
                progress(f"N={n} K={k} M={m}: " + ", ".join(f"{v} {row[v]:.4f} ms" for v in VARIANTS
                                                            if row[v] is not None))
                measurements.append(row)
    finally:
        nf4_dispatch._overrides.clear()
        nf4_dispatch._overrides.update(previous)
    content = {"format": FORMAT, "gpu": gpu, "arch": list(arch), "sms": sms, "dtype": str(dtype).split(".")[-1],
               "tiers": tiers_from(measurements, sms), "measurements": measurements}
    write(content, Path(path) if path is not None else tune_path(arch))
    return content

