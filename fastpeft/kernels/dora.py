"""DoRA's weight norm ``n[o] = ‖W[o, :] + s · (B A)[o, :]‖₂`` by the cached-‖W‖² identity.

Math (``W`` ``(out, in)`` dense or packed NF4, ``A`` ``(r, in)``, ``B`` ``(out, r)``, ``s`` the scaling)::

    n²[o] = ‖W[o]‖² + 2s · (W Aᵀ)[o] · B[o] + s² · B[o] (A Aᵀ) B[o]ᵀ

The base is frozen and the norm is detached (DoRA paper §4.3), so ``‖W‖²`` per row is computed once and
cached (keyed by the weight's storage, shape, dtype and version counter: an in-place change of the base
recomputes it). Each call then needs one skinny product ``P = W Aᵀ`` ``(out, r)``: one read of ``W`` on
tensor cores (cuBLAS on a dense base; on NF4 the GEMV / split-K kernels or dequantise + cuBLAS of
``fastpeft.kernels.nf4_matmul``, picked by its plan for ``M = r``), plus rank-sized work: ``G = A Aᵀ``
``(r, r)`` and ``B G`` ``(out, r)``, cuBLAS in fp32. Neither ``B A`` nor a dense ``W`` copy is formed on a
dense base; on NF4 at most the reusable dequantisation buffer (one layer). PEFT PR #3387 measured this
identity 4.8-5.8x faster than forming ``W + s B A`` on CPU.

Precision: the inputs are rounded to the compute dtype (``dtype``, as the reference and PEFT compute in
it); ``P``, ``G``, ``B G`` and the row sums are accumulated and kept in fp32 (``P`` from bf16/fp16 tensor
cores with fp32 output). The three terms cancel when ``s B A`` nearly cancels ``W``: with fp32 unit
roundoff ``u = 2⁻²⁴`` the relative error of ``n[o]`` is bounded by ``4 u (‖W[o]‖² + ‖s B[o] A‖²) / n[o]²``
(measured constant 1.0-2.3 against float64 at ``n / ‖W‖`` from 7e-2 to 7e-4, tested at 7e-3): 1e-4 at
``n / ‖W‖ = 0.1``, 1e-2 at 0.007, and no correct digit below ~1e-3 (``n²`` is clamped at 0 before the
square root). Forming ``W + s B A`` in bf16 first, as PEFT does, has relative error ``2⁻⁸ ‖W[o]‖ / n[o]``,
worse than this in every case; in fp32, PEFT's direct form keeps ``u ‖W[o]‖ / n[o]``.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from ..nf4 import NF4Weight, dequant_buffer
from .nf4 import nf4_dequantize
from .nf4_matmul import mm_fp32, nf4_lora_matmul
from .plan import LaunchPlan

MAX_RANK = 256
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# ‖W‖² per row, fp32 (out,), per base weight: {key tensor: (version key, compute dtype, norms)}
_weight_sq_norms: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def plan_dora_weight_norm(out_features: int, rank: int, is_nf4: bool, blocksize: int = 64, nested: bool = False,
                          arch: tuple | None = None) -> LaunchPlan:
    """The norm of an ``(out_features, in)`` weight: no kernel of its own (``path="torch"``): ``W Aᵀ``
    is cuBLAS (dense) or ``nf4_lora_matmul``'s own plan for ``M = rank`` (NF4), the rest rank-sized cuBLAS."""
    return LaunchPlan(op="dora_weight_norm", variant="nf4" if is_nf4 else "dense", path="torch")


def _version_key(weight, dtype: torch.dtype):
    """What identifies the base's values: shape, dtype, storage and version counters; None for an inference
    tensor, which has no version counter (its norm is then never cached)."""
    tensors = (weight,) if isinstance(weight, torch.Tensor) else (weight.packed, weight.absmax)
    if any(t.is_inference() for t in tensors):
        return None
    return (tuple(weight.shape), dtype, *((t.data_ptr(), t._version) for t in tensors))


def _dense_nf4(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The NF4 base in ``dtype`` as PEFT's DoRA reads it: dequantised to its stored dtype (bitsandbytes'
    ``dequantize_4bit``) into the reusable buffer, then cast (one rounding of the fp32 products where the stored
    dtype is fp32)."""
    stored = dtype if weight.dtype == torch.float32 else weight.dtype
    dense = nf4_dequantize(weight, stored, out=dequant_buffer(weight, stored))
    return dense if stored == dtype else dense.to(dtype)


def weight_sq_norms(weight, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``(out,)`` ``‖W[o]‖²`` of the base rounded to ``dtype`` (an NF4 base to its stored dtype first, see
    ``_dense_nf4``), computed once per base and cached."""
    key_tensor = weight if isinstance(weight, torch.Tensor) else weight.packed
    version = _version_key(weight, dtype)
    cached = _weight_sq_norms.get(key_tensor)
    if cached is not None and version is not None and cached[0] == version:
        return cached[1]
    dense = _dense_nf4(weight, dtype) if isinstance(weight, NF4Weight) else weight.to(dtype)
    norms = torch.linalg.vector_norm(dense, dim=1, dtype=torch.float32).square_()
    if version is not None:
        _weight_sq_norms[key_tensor] = (version, norms)
    return norms


def dora_weight_norm(
    weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``‖W + s·B A‖₂`` per output row as ``(out,)`` in ``dtype`` (default ``lora_a.dtype``), computed in
    ``dtype`` with fp32 accumulation (see the module docstring).

    ``weight``: dense ``(out, in)`` tensor (any strides) or :class:`NF4Weight`; ``lora_a`` ``(r, in)`` and
    ``lora_b`` ``(out, r)`` float tensors (any strides, any of fp32/fp16/bf16), ``1 <= r <= MAX_RANK``.
    ``out``: an optional contiguous ``(out,)`` buffer of ``dtype``. No autograd (the norm is detached).
    """
    is_nf4 = isinstance(weight, NF4Weight)
    if not is_nf4 and not (isinstance(weight, torch.Tensor) and weight.dim() == 2):
        raise TypeError(f"weight must be a 2-D tensor or an NF4Weight, got {type(weight).__name__}")
    if not is_nf4 and weight.dtype not in _DTYPES:
        raise TypeError(f"weight dtype must be one of {_DTYPES}, got {weight.dtype}")
    out_features, in_features = weight.shape
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got shape {tuple(getattr(t, 'shape', ()))}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} dtype must be one of {_DTYPES}, got {t.dtype}")
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device}, the weight on {weight.device}")
    rank = lora_a.shape[0]
    if lora_a.shape[1] != in_features or tuple(lora_b.shape) != (out_features, rank):
        raise ValueError(f"lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} must be (r, {in_features}) "
                         f"and ({out_features}, r) for a {tuple(weight.shape)} weight")
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank must be in [1, {MAX_RANK}], got {rank}")
    dtype = lora_a.dtype if dtype is None else dtype
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be one of {_DTYPES}, got {dtype}")
    if out is None:
        out = torch.empty(out_features, dtype=dtype, device=weight.device)
    elif tuple(out.shape) != (out_features,) or out.dtype != dtype or out.device != weight.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({out_features},) {dtype} tensor on {weight.device}, got "
                         f"{tuple(out.shape)} {out.dtype} {out.device}")
    if out_features == 0:
        return out
    with torch.no_grad():
        lora_a = lora_a.to(dtype)
        lora_b32 = lora_b.to(dtype).float()
        if is_nf4 and weight.dtype in (dtype, torch.float32):
            # Pᵀ = A Wᵀ: an NF4 product with M = r rows, fp32 output (the kernels accumulate in fp32)
            projected = nf4_lora_matmul(lora_a, weight, out=torch.empty(rank, out_features, device=weight.device,
                                                                        dtype=torch.float32)).t()
        elif is_nf4:  # stored in another half precision: its rounding first, as PEFT's
            projected = mm_fp32(_dense_nf4(weight, dtype), lora_a.t())
        else:
            projected = mm_fp32(weight.to(dtype), lora_a.t())
        gram = mm_fp32(lora_a, lora_a.t())
        sq = weight_sq_norms(weight, dtype).clone()
        sq.add_((projected * lora_b32).sum(1), alpha=2.0 * scaling)
        sq.add_(((lora_b32 @ gram) * lora_b32).sum(1), alpha=scaling * scaling)
        torch.sqrt(sq.clamp_(min=0.0), out=sq)
        out.copy_(sq)
    return out
