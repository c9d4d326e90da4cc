"""Which NF4 product runs at which ``M``: GEMV, split-K ``tl.dot`` GEMM or dequantise + cuBLAS, per GPU arch.

The rule is bitsandbytes 0.50's (``bitsandbytes/backends/cuda/ops.py``, ``_gemm_4bit_use_custom_cuda``):
its own kernel wins below a threshold on ``M`` that grows with the number of SM waves the output fills
(``ceil(N / 64)`` column tiles over the SM count), and "dequantise + F.linear" (cuBLAS, wgmma on Hopper)
wins above it; below ``CUSTOM_FLOOR_M`` rows its own kernel always runs (``_GEMM_4BIT_CUSTOM_FLOOR_M = 4``).
Of those, one row (decode) takes the GEMV and more the split-K GEMM, as GemLite's ``get_matmul_type``
(its GEMV serves M = 1; from two rows the ``tl.dot`` tile, padded to 16 tokens, does the same work for
every row at once). fp32 has no tensor-core path in either: Triton only below 8 rows (bitsandbytes: "fp32
has no MMA kernel ... custom only wins in the SIMT range (M<8)").

A file written by ``fastpeft tune`` (``fastpeft.kernels.tuning``; read by ``fastpeft.kernels.tune_file``)
for the running architecture is preferred over the shipped table. Overrides, read at each call (so a test or
a user can move the crossovers without editing code), win over both: ``FASTPEFT_NF4_GEMV_MAX_M`` (largest
``M`` on the GEMV) and ``FASTPEFT_NF4_TRITON_MAX_M`` (largest ``M`` on a Triton kernel; above it, cuBLAS),
or the same names set with :func:`set_thresholds`. ``fastpeft info`` shows the table in use.
"""

from __future__ import annotations

import os
from typing import Optional

from .tune_file import tune_path, tuned_tiers

GEMV_MAX_M = 1
CUSTOM_FLOOR_M = 4
FP32_TRITON_MAX_M = 7

# Per architecture: the SM count the rule assumes when planning without a device, and the tiers
# ``(minimum waves of 64-column tiles, largest M on the Triton split-K GEMM)``, first match wins.
THRESHOLDS = {
    # A100 (108 SMs). bitsandbytes 0.50 sm80 ladder, large weights: >= 3 waves M <= 128, >= 1 wave M <= 64
    # (K < N; 32 otherwise), below: M <= 16.
    (8, 0): {"sms": 108, "tiers": ((3.0, 128), (1.0, 32), (0.0, 16))},
    # L40S / RTX 4090 (142 / 128 SMs). bitsandbytes 0.50 fallback (sm89) ladder: >= 3 waves 256, >= 2 waves
    # 128, ~0.8 wave 64, >= 0.5 wave 8-32, below 8-16.
    (8, 9): {"sms": 142, "tiers": ((3.0, 256), (2.0, 128), (0.8, 64), (0.0, 16))},
    # H100 / H200 (132 SMs). bitsandbytes 0.50 sm90 ladder ("dequant+F.linear (WGMMA path) is significantly
    # faster than our mma.sync kernel"): >= 3 waves 64, >= 2 waves 48, >= 1 wave 32, >= 0.5 wave 16, else
    # dequantise from M = 5.
    (9, 0): {"sms": 132, "tiers": ((3.0, 64), (2.0, 48), (1.0, 32), (0.5, 16), (0.0, CUSTOM_FLOOR_M))},
    # Anything else (and planning without a GPU): the most conservative of the above, sm90's.
    "default": {"sms": 132, "tiers": ((3.0, 64), (2.0, 48), (1.0, 32), (0.5, 16), (0.0, CUSTOM_FLOOR_M))},
}

_ENV = ("FASTPEFT_NF4_GEMV_MAX_M", "FASTPEFT_NF4_TRITON_MAX_M")
_overrides: dict = {}


def set_thresholds(gemv_max_m: Optional[int] = None, triton_max_m: Optional[int] = None) -> None:
    """Override the crossovers in this process (None: back to the environment / the table)."""
    for name, value in zip(_ENV, (gemv_max_m, triton_max_m)):
        if value is None:
            _overrides.pop(name, None)
        else:
            _overrides[name] = int(value)


def _override(name: str) -> Optional[int]:
    if name in _overrides:
        return _overrides[name]
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def table_for(arch: Optional[tuple]) -> dict:
    """The threshold entry for ``arch`` (``(major, minor)`` or None)."""
    if arch is not None and tuple(arch[:1]) == (9,):
        arch = (9, 0)  # H100 and H200 share the sm90 ladder
    return THRESHOLDS.get(tuple(arch) if arch is not None else None, THRESHOLDS["default"])


def nf4_path(m: int, n: int, fp32: bool, arch: Optional[tuple], sm_count: Optional[int] = None) -> str:
    """``"gemv"``, ``"splitk"`` or ``"cublas"`` for an ``(m, k) · (k, n)`` NF4 product."""
    entry = table_for(arch)
    sms = sm_count or entry["sms"]
    waves = -(-n // 64) / sms
    gemv_max = _override(_ENV[0])
    triton_max = _override(_ENV[1])
    tuned = tuned_tiers(arch) if not fp32 else None  # measured in bf16 by `fastpeft tune`
    if tuned:
        tier = next(tier for tier in tuned if waves >= tier[0])
    if gemv_max is None:
        gemv_max = tier[1] if tuned else GEMV_MAX_M
    if triton_max is None:
        if tuned:
            triton_max = tier[2]
        elif fp32:
            triton_max = FP32_TRITON_MAX_M
        else:
            triton_max = next(limit for min_waves, limit in entry["tiers"] if waves >= min_waves)
    if m <= gemv_max:
        return "gemv"
    return "splitk" if m <= triton_max else "cublas"


def describe(arch: Optional[tuple]) -> list[str]:
    """Lines for ``fastpeft info``: the thresholds in force for ``arch``."""
    entry = table_for(arch)
    tiers = ", ".join(f">= {w:g} waves: M <= {limit}" for w, limit in entry["tiers"])
    lines = [f"NF4 dispatch ({'sm_%d%d' % tuple(arch) if arch else 'no GPU: default table'}, {entry['sms']} SMs): "
             f"GEMV M <= {GEMV_MAX_M}; split-K tl.dot {tiers}; above: dequantise + cuBLAS; fp32: Triton M <= "
             f"{FP32_TRITON_MAX_M}"]
    tuned = tuned_tiers(arch)
    if tuned:
        lines.append(f"  preferred: measured on this GPU by `fastpeft tune` ({tune_path(arch)}): " + ", ".join(
            f">= {w:.2g} waves: GEMV M <= {g}, Triton M <= {t}" for w, g, t in tuned))
    for name in _ENV:
        value = _override(name)
        if value is not None:
            lines.append(f"  override {name}={value}")
    return lines
