"""IA3 as autograd ops over a dense or NF4 base; the same semantics as ``fastpeft.reference.ia3_linear``.

Public API:

- ``ia3_linear(x, weight, bias, ia3_scale, is_feedforward)``: ``x`` ``(..., in)`` (any strides, fp32 /
  fp16 / bf16), ``weight`` a frozen dense ``(out, in)`` tensor or an :class:`~fastpeft.nf4.NF4Weight`,
  ``bias`` ``(out,)`` or None, ``ia3_scale`` ``l``: ``(in,)`` when ``is_feedforward``
  (``y = (x ⊙ l) Wᵀ + b``), else ``(out,)`` (``y = (x Wᵀ + b) ⊙ l``, PEFT's rule: the bias is scaled
  too). Gradients for ``x``, ``ia3_scale`` and ``bias``.

Every product is the ``fused_linear`` primitive (``fastpeft.ops.fused_linear``: its input scale, its column scale with
the bias scaled too, its fused row reduction). Every pass is one kernel launch except the output-scaling backward on
the Triton backend, which recomputes ``z = x Wᵀ + b`` for ``dl = Σ_t dy ⊙ z`` in a second launch (reduced on the fly, never stored: the GPU trades a
second pass over ``W`` for an ``(M, out)`` activation). Off it (the CPU path), where recomputing would be a
second full matmul per backward and slower than PEFT, ``z`` is kept, as autograd keeps it for PEFT's
``result * l``: over a dense base, eager, autograd differentiates the reference's torch ops
(``fastpeft.reference.fused_linear``, PEFT's IA3 forward op for op) directly, without an autograd Function, whose
per-call Python cost exceeds a small layer's math; over an NF4 base the Function keeps ``z`` (and never the
dequantised weight, which autograd would keep).

    feed-forward  forward  y  = (x ⊙ l) Wᵀ + b        backward  dx = (dy W) ⊙ l,  dl = Σ_t x ⊙ (dy W)  (one pass)
    output        forward  y  = (x Wᵀ + b) ⊙ l        backward  dx = (dy ⊙ l) W,  dl = Σ_t dy ⊙ (x Wᵀ + b)

Dtypes: computed in ``x.dtype`` with fp32 accumulation; ``l`` is read in its own dtype and ``dl`` is
returned in it (the reduction is fp32). PEFT computes the feed-forward ``x ⊙ l`` in ``l``'s dtype and casts
back; the two agree when the dtypes match.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..nf4 import NF4Weight
from .dispatch import backend_for, eager_reference
from .fused_linear import fused_linear
from .inputs import Weight, as_rows, autocast_dtype, check_linear_inputs, check_vector, rows_like

_SCALE_NOTES = {True: " for is_feedforward=True", False: " for is_feedforward=False"}  # not formatted per call


def _forward(x2d, weight: Weight, bias, ia3_scale, is_feedforward: bool) -> torch.Tensor:
    """The forward on 2-D ``x2d`` ``(M, in)``: ``(M, out)``; ``ia3_scale`` None: the base layer alone."""
    if ia3_scale is None:
        return fused_linear(x2d, weight, bias=bias)[0]
    if is_feedforward:
        return fused_linear(x2d, weight, in_scale=ia3_scale, bias=bias, scale_bias=True)[0]
    return fused_linear(x2d, weight, bias=bias, scale_bias=True, col_scale=ia3_scale)[0]


class IA3LinearFunction(torch.autograd.Function):
    """IA3 over a frozen base on 2-D ``x2d`` ``(M, in)``, returning ``(M, out)``; see the module docstring.
    ``x`` and ``bias`` share one dtype (``ia3_linear`` casts them and reshapes outside, so the output can be
    changed in place); ``ia3_scale`` keeps its own, or is None: the base layer alone (``l = 1``)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, ia3_scale, is_feedforward):
        base_out = None  # z = x Wᵀ + b of the output scaling, kept for dl off the Triton backend
        if (not is_feedforward and ia3_scale is not None and ctx.needs_input_grad[3]
                and backend_for(x2d.device) == "reference"):
            base_out = fused_linear(x2d, weight, bias=bias, scale_bias=True)[0]
            y = base_out * ia3_scale  # the reference's column-scale arithmetic
            y = y if y.dtype == x2d.dtype else y.to(x2d.dtype)
        else:
            y = _forward(x2d, weight, bias, ia3_scale, is_feedforward)
        ctx.weight = weight if isinstance(weight, NF4Weight) else None
        ctx.is_feedforward = is_feedforward
        ctx.save_for_backward(None if isinstance(weight, NF4Weight) else weight, x2d if base_out is None else None,
                              bias, ia3_scale, base_out)
        return y

    @staticmethod
    def backward(ctx, dy):
        dense_weight, x2d, bias, ia3_scale, base_out = ctx.saved_tensors
        weight = ctx.weight if ctx.weight is not None else dense_weight
        needs_dx, _, needs_bias, needs_scale, _ = ctx.needs_input_grad
        dx = dbias = dscale = None
        if ia3_scale is None:
            if needs_dx:
                dx = fused_linear(dy, weight, transpose_weight=True)[0]
            if needs_bias:
                dbias = dy.sum(0)
        elif ctx.is_feedforward:
            if needs_dx or needs_scale:
                dx, dscale = fused_linear(dy, weight, transpose_weight=True, scale_bias=True, col_scale=ia3_scale,
                                          reduce_rows=x2d if needs_scale else None, store_out=needs_dx)
            if needs_bias:
                dbias = dy.sum(0)
        else:
            if needs_dx:
                dx = fused_linear(dy, weight, transpose_weight=True, in_scale=ia3_scale, scale_bias=True)[0]
            if needs_scale and base_out is not None:
                acc = reference.reduction_dtype(dy.dtype)
                dscale = (dy.to(acc) * base_out.to(acc)).sum(0)
            elif needs_scale:
                dscale = fused_linear(x2d, weight, bias=bias, scale_bias=True, reduce_rows=dy, store_out=False)[1]
            if needs_bias:
                dbias = (dy * ia3_scale).sum(0)
        if dscale is not None:
            dscale = dscale.to(ia3_scale.dtype)
        return dx, None, dbias, dscale, None


def _ia3(x: torch.Tensor, weight: Weight, bias: Optional[torch.Tensor], ia3_scale: Optional[torch.Tensor],
         is_feedforward: bool, in_features: int, out_features: int) -> torch.Tensor:
    """IA3 (``ia3_scale`` None: the base layer alone) of checked inputs, ``bias`` of ``x``'s dtype.

    Eager on the reference backend, over a dense base or with nothing to differentiate, the reference's torch ops
    run directly (``fastpeft.reference.fused_linear``, PEFT's IA3 forward op for op), and autograd differentiates
    them, keeping what it keeps for PEFT's layer (``z = x Wᵀ + b`` for ``dl``, the weight itself): neither the op's
    dispatch nor the autograd Function's per-call Python (each more than the layer's math at M = 1 on CPU). Over an
    NF4 base under autograd the Function runs, as autograd would keep the dequantised weight."""
    differentiable = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)
                                                  or (ia3_scale is not None and ia3_scale.requires_grad))
    x2d = x if x.dim() == 2 else as_rows(x, in_features)
    if ia3_scale is not None and not ia3_scale.is_contiguous():
        ia3_scale = ia3_scale.contiguous()
    if (not differentiable or not isinstance(weight, NF4Weight)) and eager_reference(x.device):
        if is_feedforward or ia3_scale is None:
            y = reference.fused_linear(x2d, weight, False, ia3_scale, bias, ia3_scale is not None)[0]
        else:
            y = reference.fused_linear(x2d, weight, False, None, bias, True, None, None, 1.0, ia3_scale)[0]
    elif not differentiable:
        y = _forward(x2d, weight, bias, ia3_scale, is_feedforward)
    else:
        y = IA3LinearFunction.apply(x2d, weight, bias, ia3_scale, is_feedforward)
    return y if x2d is x else rows_like(y, x, out_features)


# the signature of fastpeft.reference.ia3_linear, the oracle this op is held to
def ia3_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    ia3_scale: torch.Tensor,
    is_feedforward: bool,
) -> torch.Tensor:
    """IA3 ``(x ⊙ l) Wᵀ + b`` (feed-forward) or ``(x Wᵀ + b) ⊙ l`` as ``(..., out)`` in ``x.dtype``; see the
    module docstring.

    Under ``torch.autocast`` (dtype ``c``) over a dense base, as PEFT's IA3 there: the base ``nn.Linear`` runs in
    ``c`` (``x``, ``W`` and ``b`` cast to it); a feed-forward layer's input ``x ⊙ l`` is formed first (in the
    promoted dtype, back to ``x``'s) and then cast; an output scaling multiplies the ``c`` product by ``l``."""
    is_feedforward = bool(is_feedforward)
    cast_to = autocast_dtype(x)
    if cast_to is not None and not isinstance(weight, NF4Weight):
        with torch.autocast(x.device.type, enabled=False):
            out_features, in_features = check_linear_inputs("ia3_linear", x, weight, bias)
            check_vector("ia3_scale", ia3_scale, (in_features if is_feedforward else out_features,), x.device,
                         _SCALE_NOTES[is_feedforward])
            bias = None if bias is None else bias.to(cast_to)
            if is_feedforward:
                scaled = (x * ia3_scale).to(x.dtype).to(cast_to)
                return _ia3(scaled, weight.to(cast_to), bias, None, False, in_features, out_features)
            return _ia3(x.to(cast_to), weight.to(cast_to), bias, ia3_scale, False, in_features, out_features)
    out_features, in_features = check_linear_inputs("ia3_linear", x, weight, bias)
    check_vector("ia3_scale", ia3_scale, (in_features if is_feedforward else out_features,), x.device,
                 _SCALE_NOTES[is_feedforward])
    if bias is not None and bias.dtype != x.dtype:  # a cast that does nothing still costs a dispatch
        bias = bias.to(x.dtype)
    return _ia3(x, weight, bias, ia3_scale, is_feedforward, in_features, out_features)
