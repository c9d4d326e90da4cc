"""``fastpeft tune``: measure the NF4 GEMV / split-K / cuBLAS crossovers on this GPU and save them.

The shipped thresholds (``fastpeft.kernels.nf4_dispatch.THRESHOLDS``) are bitsandbytes' calibrations per
architecture. ``tune`` times the three variants of ``nf4_lora_matmul`` (forced with
``nf4_dispatch.set_thresholds``) over ``SHAPES`` x ``M_GRID`` on the current GPU and writes, per output
width, the crossovers as tiers in the shipped table's form. ``nf4_path`` then prefers the file for the
running architecture over the shipped table; a missing file means the table, an unreadable or malformed
one a warning and the table (never an error at a launch).

File: ``$FASTPEFT_TUNE_DIR/sm_<major><minor>.json`` (default ``~/.cache/fastpeft``)::

    {"format": 1, "gpu": "NVIDIA H100 80GB HBM3", "arch": [9, 0], "sms": 132, "dtype": "bfloat16",
     "tiers": [[waves, gemv_max_m, triton_max_m], ...],          # descending waves, first match wins
     "measurements": [{"n": 4096, "k": 4096, "m": 1, "gemv": ms, "splitk": ms, "cublas": ms}, ...]}
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

FORMAT = 1
# (N, K) of the NF4 layers of a 7-8B Llama (attention, MLP up / down) and their transposes for dx: the
# grid of the static check's NF4 product shapes.
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336))
M_GRID = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
VARIANTS = ("gemv", "splitk", "cublas")
# The GEMV is built for one row (its rows are a static loop in registers): it is timed up to this M only,
# and counted as losing above (``null`` in the file).
GEMV_TUNE_MAX_M = 8
_FORCE = {"gemv": (1 << 30, 1 << 30), "splitk": (0, 1 << 30), "cublas": (0, 0)}
_loaded: dict = {}


def tune_dir() -> Path:
    return Path(os.environ.get("FASTPEFT_TUNE_DIR") or Path.home() / ".cache" / "fastpeft")


def tune_path(arch: tuple) -> Path:
    return tune_dir() / f"sm_{arch[0]}{arch[1]}.json"


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


def _default_timer(fn: Callable[[], object], **shape) -> float:
    from ..bench.timing import measure

    return measure(lambda i: fn(), torch.device("cuda"), warmup=3, repeats=10).median_ms


def tune(
    timer: Optional[Callable[..., float]] = None,
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

    ``timer(fn, variant=, m=, n=, k=)`` returns milliseconds for calling ``fn`` (default: CUDA events, L2
    flushed, median of 10; the keywords name what ``fn`` runs).
    ``device`` / ``arch`` / ``gpu`` / ``sms`` default to the current CUDA device's (tests pass them with a
    CPU device and a synthetic timer)."""
    from ..nf4 import NF4Weight
    from . import nf4_dispatch
    from .nf4_matmul import nf4_lora_matmul

    if device is None:
        if not torch.cuda.is_available():
            raise RuntimeError("fastpeft tune measures kernels on a GPU; no CUDA device is available")
        device = torch.device("cuda", torch.cuda.current_device())
    if arch is None or gpu is None or sms is None:
        props = torch.cuda.get_device_properties(device)
        arch = arch or (props.major, props.minor)
        gpu = gpu or props.name
        sms = sms or props.multi_processor_count
    timer = timer or _default_timer
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
    path = Path(path) if path is not None else tune_path(arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1))
    _loaded.clear()
    return content


def _validate(content) -> list:
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ValueError(f"not a format-{FORMAT} fastpeft tune file")
    tiers = content["tiers"]
    if not tiers or any(len(t) != 3 or t[1] < 0 or t[2] < t[1] for t in tiers):
        raise ValueError(f"bad tiers {tiers!r}")
    return [(float(w), int(g), int(t)) for w, g, t in tiers]


def tuned_tiers(arch: Optional[tuple]) -> Optional[list]:
    """The measured tiers ``[(waves, gemv_max_m, triton_max_m)]`` for ``arch``, or None (no GPU, no file,
    or a file that does not parse: then a warning, once, and the shipped table)."""
    if arch is None:
        return None
    path = tune_path(arch)
    if path not in _loaded:
        try:
            _loaded[path] = _validate(json.loads(path.read_text())) if path.exists() else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"ignoring the fastpeft tune file {path} ({exc}); using the shipped NF4 dispatch table",
                          stacklevel=2)
            _loaded[path] = None
    return _loaded[path]
