"""The roofline of the device the bench runs on, measured, not taken from a datasheet.

``measure_roofline`` times a large device-to-device copy (HBM bandwidth: bytes read + bytes written per
second) and a large bf16 matmul (dense bf16 FLOP/s) with the harness's own timer. ``roofline_fraction``
places one kernel on it: with ``F`` FLOPs and ``B`` bytes of minimum HBM traffic in ``t`` seconds, the
attainable rate is ``min(peak FLOP/s, (F / B) · peak bytes/s)`` and the kernel's fraction is
``(F / t) / attainable``; memory-bound kernels are judged by bandwidth, compute-bound ones by FLOPs.
"""

from __future__ import annotations

from typing import Optional

import torch

from .timing import measure

_COPY_BYTES = 1024 ** 3  # 1 GiB each way: far beyond any L2
_MATMUL_N = 8192


def _measure_copy(device: torch.device, warmup: int, repeats: int):
    src = torch.empty(_COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return measure(lambda i: dst.copy_(src), device, warmup, repeats)


def _measure_matmul(device: torch.device, warmup: int, repeats: int):
    a = torch.randn(_MATMUL_N, _MATMUL_N, dtype=torch.bfloat16, device=device)
    b = torch.randn(_MATMUL_N, _MATMUL_N, dtype=torch.bfloat16, device=device)
    return measure(lambda i: a @ b, device, warmup, repeats)


def measure_roofline(device: torch.device, warmup: int = 3, repeats: int = 10) -> dict:
    """``{"hbm_bytes_per_s", "bf16_flop_per_s", "copy_bytes", "matmul_n", "method"}`` on a CUDA device."""
    if device.type != "cuda":
        raise ValueError(f"the roofline is measured on a CUDA device, not {device}")
    copy = _measure_copy(device, warmup, repeats)  # each buffer freed on return, before the next is made
    matmul = _measure_matmul(device, warmup, repeats)
    torch.cuda.empty_cache()
    return {
        "hbm_bytes_per_s": 2 * _COPY_BYTES / (copy.median_ms * 1e-3),
        "bf16_flop_per_s": 2 * _MATMUL_N ** 3 / (matmul.median_ms * 1e-3),
        "copy_bytes": _COPY_BYTES,
        "matmul_n": _MATMUL_N,
        "method": "median of CUDA-event-timed 1 GiB copy_ (read + write) and 8192^3 bf16 torch.matmul",
    }


def roofline_fraction(flops: Optional[float], bytes_moved: Optional[float], seconds: float,
                      roofline: dict) -> Optional[dict]:
    """Achieved rates of one timed call and its fraction of the attainable roofline rate.

    Returns ``{"achieved_flop_per_s", "achieved_bytes_per_s", "bound", "fraction"}`` (``bound`` is
    ``"memory"`` or ``"compute"``, ``fraction`` in [0, ~1]), or None without a cost model.
    """
    if flops is None or bytes_moved is None or seconds <= 0:
        return None
    peak_flops, peak_bw = roofline["bf16_flop_per_s"], roofline["hbm_bytes_per_s"]
    memory_roof = flops / bytes_moved * peak_bw if bytes_moved else float("inf")
    bound = "memory" if memory_roof < peak_flops else "compute"
    attainable = min(peak_flops, memory_roof)
    achieved_flops = flops / seconds
    if flops == 0:  # pure data movement (e.g. dequantisation): judged by bandwidth alone
        bound, fraction = "memory", bytes_moved / seconds / peak_bw
    else:
        fraction = achieved_flops / attainable
    return {
        "achieved_flop_per_s": achieved_flops,
        "achieved_bytes_per_s": bytes_moved / seconds,
        "bound": bound,
        "fraction": fraction,
    }
