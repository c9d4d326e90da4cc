"""Input checks shared by the linear ops (``lora_linear``, ``dora_linear``, ``ia3_linear``): every bad
input is a ``ValueError`` / ``TypeError`` naming the values, raised before any kernel launches. Also the
rule for which LoRA scalings the fused ops take (:func:`fusable_scaling`)."""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..nf4 import NF4Weight

Weight = Union[torch.Tensor, NF4Weight]
_X_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16, torch.float64))  # a hash lookup per check
# fusable_scaling runs at every LoRA call: plain module constants, no attribute lookups
_FP32_TINY, _FP32_MAX, _FP16 = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max, torch.float16


def check_linear_inputs(op: str, x: torch.Tensor, weight: Weight, bias: Optional[torch.Tensor]) -> tuple:
    """``x`` ``(..., in)`` floating point, ``weight`` a frozen floating-point dense ``(out, in)`` tensor or an
    :class:`NF4Weight` on ``x``'s device, ``bias`` floating point ``(out,)`` on that device or None; returns
    ``(out, in)``. ``op`` names the caller in the frozen-weight message."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor of shape (..., in_features), got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x dtype must be floating point, got {x.dtype}")
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        if weight.dtype not in _X_DTYPES:  # an int8 weight would be cast to x's dtype, its scales lost
            raise TypeError(f"a dense weight must be floating point, got {weight.dtype}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"the base weight must be frozen (requires_grad=False): {op} gives it no gradient")
    elif not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be a 2-D tensor or an NF4Weight, got {type(weight).__name__}")
    out_features, in_features = weight.shape
    if weight.device != x.device:
        raise ValueError(f"x is on {x.device}, the weight on {weight.device}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features; the weight {tuple(weight.shape)} needs {in_features}")
    if bias is not None:
        check_vector("bias", bias, (out_features,), x.device)
    return out_features, in_features


def check_vector(name: str, t: torch.Tensor, shape: tuple, device: torch.device, note: str = "") -> None:
    """``t`` (a bias, scale or factor) a floating-point tensor of ``shape`` on ``device``; ``note`` follows the
    shape in the message."""
    if not isinstance(t, torch.Tensor) or t.shape != shape:
        raise ValueError(f"{name} must be {shape}{note}, got {tuple(getattr(t, 'shape', ()))}")
    if t.dtype not in _X_DTYPES:
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"x is on {device}, {name} on {t.device}")


def check_lora_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, out_features: int, in_features: int,
                       device: torch.device) -> None:
    """``lora_a`` ``(r, in)`` and ``lora_b`` ``(out, r)``, floating point, on ``device`` (``x``'s)."""
    rank = lora_a.shape[0] if lora_a.dim() == 2 else -1
    if lora_b.dim() != 2 or lora_a.shape[-1] != in_features or lora_b.shape != (out_features, rank):
        raise ValueError(f"lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} must be (r, {in_features}) "
                         f"and ({out_features}, r)")
    check_vector("lora_a", lora_a, lora_a.shape, device)
    check_vector("lora_b", lora_b, lora_b.shape, device)


def as_rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x`` ``(..., in)`` as ``(M, in)`` (a view where strides allow); a 2-D ``x`` as it is (a reshape per
    call costs about as much as a small layer's math at M = 1)."""
    return x if x.dim() == 2 else x.reshape(-1, in_features)


def rows_like(y: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """The ``(M, out)`` result ``y`` of :func:`as_rows` ``(x)`` as ``(..., out)``. A view made outside the ops'
    autograd Functions, so in-place changes of the output are allowed."""
    return y if x.dim() == 2 else y.view(*x.shape[:-1], out_features)


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` would run a linear layer on ``x``'s device in, or None when autocast is
    off there. The ops read it at entry and cast as autocast would cast PEFT's ``nn.Linear`` calls, then
    run with autocast off (a custom autograd Function is not cast by autocast itself)."""
    if not torch._C._is_any_autocast_enabled():  # the common case in one C call (the checks below cost ~1 µs)
        return None
    device_type = x.device.type
    if (not x.is_floating_point() or not torch.amp.is_autocast_available(device_type)
            or not torch.is_autocast_enabled(device_type)):
        return None
    return torch.get_autocast_dtype(device_type)


def fusable_scaling(scaling: float, dtype: torch.dtype) -> bool:
    """Whether a LoRA term in ``dtype`` may take ``scaling`` inside a fused product (``addmm_(alpha=s)``, a
    kernel's epilogue, ``s`` folded into a factor) and still give PEFT's ``lora_B(lora_A(x)) * s`` entry for
    entry, inf and NaN included. Not for a NaN or infinite ``s`` (BLAS with such an alpha returns finite values
    or NaN where PEFT's product gives NaN or inf), an ``s`` that is 0 or outside fp32's normal range (BLAS skips
    the product at alpha 0, dropping the NaN of PEFT's ``0 · inf``; addmm refuses an alpha fp32 cannot hold),
    nor for fp16 terms: there PEFT's rounding of ``h Bᵀ`` before the scale, and of the scaled term before the
    sum, decides which entries overflow 65504. Those run PEFT's ops in PEFT's order."""
    return dtype is not _FP16 and _FP32_TINY <= abs(scaling) <= _FP32_MAX
