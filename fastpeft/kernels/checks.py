"""Input checks the Triton launchers share: each bad input is a ``ValueError`` / ``TypeError`` naming the values,
raised before the launch (the kernels themselves trust their inputs)."""

from __future__ import annotations

from typing import Optional

import torch

# The floating-point dtypes the kernels load and store.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_activations(a) -> None:
    """``a`` is a 2-D tensor of one of :data:`DTYPES`."""
    if not isinstance(a, torch.Tensor) or a.dim() != 2:
        raise ValueError(f"a must be a 2-D tensor, got shape {tuple(getattr(a, 'shape', ()))}")
    if a.dtype not in DTYPES:
        raise TypeError(f"a dtype must be one of {DTYPES}, got {a.dtype}")


def check_vector(name: str, t: Optional[torch.Tensor], length: int, a: torch.Tensor) -> None:
    """``t`` (called ``name`` in the message) is None or a contiguous 1-D tensor of ``length`` elements of one of
    :data:`DTYPES` on ``a``'s device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must be a 1-D tensor of {length} elements, got {tuple(getattr(t, 'shape', ()))}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} dtype must be one of {DTYPES}, got {t.dtype}")
    if t.device != a.device:
        raise ValueError(f"{name} is on {t.device}, a is on {a.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def product_dims(a: torch.Tensor, weight, transpose_weight: bool) -> tuple[int, int, int]:
    """``(m, k, n)`` of ``a · op(W)`` for an ``(out, in)`` weight (dense or NF4) on ``a``'s device: ``op(W)`` is
    ``Wᵀ`` (``k = in``, ``n = out``) or, with ``transpose_weight``, ``W`` (``k = out``, ``n = in``); ``a`` must
    have ``k`` columns."""
    if weight.device != a.device:
        raise ValueError(f"a is on {a.device}, the weight on {weight.device}")
    out_features, in_features = weight.shape
    k, n = (out_features, in_features) if transpose_weight else (in_features, out_features)
    if a.shape[1] != k:
        raise ValueError(f"a has {a.shape[1]} columns; op(W) of a {tuple(weight.shape)} weight needs {k}")
    return a.shape[0], k, n
