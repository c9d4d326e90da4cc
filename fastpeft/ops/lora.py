"""LoRA / QLoRA as autograd ops: ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` with a dense or NF4 base.

Public API:

- ``lora_linear(x, weight, bias, lora_a, lora_b, scaling, x_dropped=None, dropout_p=0.0)``: the
  signature and semantics of ``fastpeft.reference.lora_linear``, plus ``dropout_p``. ``x`` is ``(..., in)`` (any leading dims, any strides,
  fp32 / fp16 / bf16); ``weight`` a dense ``(out, in)`` tensor or an :class:`~fastpeft.nf4.NF4Weight`
  (frozen: no gradient); ``bias`` ``(out,)`` or None (gets a gradient if it requires one); ``lora_a``
  ``(r, in)``, ``lora_b`` ``(out, r)``; ``scaling`` a float (``alpha / r`` or rsLoRA's
  ``alpha / sqrt(r)``, the caller's choice). ``lora_a`` and ``lora_b`` may both be None: the base layer
  alone, still differentiable in ``x``.

  Dropout, two ways. ``dropout_p=p``: the op draws the mask itself, as ``nn.Dropout(p)`` would on
  ``x`` as given (its strides too) from the same RNG state (so PEFT parity under a fixed seed holds
  bitwise), and stores ``x``, never ``drop(x)``. On CUDA it keeps the RNG state instead of the mask and
  redraws the mask in backward (``torch.utils.checkpoint``'s trick; not CUDA-graph safe: no activation memory
  for the mask, and a Philox redraw costs little); elsewhere it keeps the mask as one bool per element of ``x``
  (CPU's Bernoulli draw costs several times the layer's LoRA math, so drawing it twice made a dropout step
  slower than PEFT's) and rebuilds its values with ``F.dropout``'s own scaling. Or ``x_dropped = dropout(x)``
  from any dropout module of the caller's; autograd then carries the LoRA part of ``dx`` back through it, and
  ``drop(x)`` is stored.

  Scalings and adapter dtypes that fused products would change (NaN, inf, 0 or beyond fp32's range, and
  fp16 adapters, whose overflows depend on PEFT's roundings: ``fastpeft.ops.inputs.fusable_scaling``)
  run PEFT's ``base(x) + lora_B(lora_A(drop(x))) * s`` op by op in its order instead.

Every product is the ``fused_linear`` primitive (``fastpeft.ops.fused_linear``): ``x Wᵀ + b + s · h Bᵀ`` in one
call, ``dx = dy W + s · g A`` in another.

Backward (``h = drop(x) Aᵀ`` is saved, ``(M, r)``; the dequantised ``W`` never is):
``g = dy B``, ``dB = s · dyᵀ h``, ``dA = s · gᵀ drop(x)``, ``dx = dy W + s · drop'(g A)``. Without
dropout, ``dx`` is one fused NF4 kernel call (the LoRA term in its epilogue); with dropout, the base part
comes from the kernel and ``s · g A`` is masked (``dropout_p``) or returned to ``x_dropped``.

Dense base (``fused_linear``'s cuBLAS path): ``x Wᵀ (+ b)`` is one cuBLAS ``addmm``, the small ``h = x Aᵀ``
another, and the LoRA term is added in place with ``addmm_(h, Bᵀ, alpha=s)`` (cuBLAS ``beta = 1``): one extra
read/write of ``y`` and no ``(M, out)`` temporary. The same shape serves ``dx``.

Dtypes, as PEFT's ``lora.Linear.forward`` (fp32 adapters on a bf16 / fp16 model,
``autocast_adapter_dtype=True``): the base product runs in ``x.dtype`` (``bias`` is cast to it); the LoRA
branch runs in the adapter dtype ``lora_a.dtype`` — ``x`` (or ``drop(x)``, the mask drawn on the cast
``x`` as PEFT's dropout sees it) is cast to it, ``h`` and ``s · h Bᵀ`` are computed in it — and the sum is
formed in ``promote(x.dtype, adapter dtype)`` and cast once to ``x.dtype``. The NF4 kernel does this in
registers: bf16 activations, fp32 ``h`` / ``B`` tiles, an fp32 accumulator, one rounding. Backward
likewise: ``g = dy B``, ``dA``, ``dB`` in the adapter dtype (their gradients come back in it), the base
part of ``dx`` in ``x.dtype`` with the LoRA part added before the one rounding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..nf4 import NF4Weight
from .compile_compat import fresh_output_when_compiling
from .fused_linear import fused_linear
from .inputs import (Weight, as_rows, autocast_dtype, check_linear_inputs, check_lora_factors, fusable_scaling,
                     rows_like)


def _x_layout(x: torch.Tensor) -> Optional[tuple]:
    """``x``'s ``(shape, stride)`` for :func:`_dropout_mask`, or None when it is contiguous."""
    return None if x.is_contiguous() else (tuple(x.shape), x.stride())


def _dropout_mask(rows: tuple, layout: Optional[tuple], p: float, device, dtype) -> torch.Tensor:
    """``(1 - p)``-Bernoulli mask scaled by ``1 / (1 - p)`` as ``rows`` ``(M, in)``, drawn exactly as ``F.dropout``
    draws its noise for the caller's ``x`` (``layout``: its shape and strides, None when contiguous), so
    ``x * mask`` is bitwise ``nn.Dropout(p)(x)`` from the same RNG state. The noise tensor takes ``x``'s memory
    layout (``empty_like``) and the generator fills it in memory order: a transposed ``x`` draws another mask than
    a contiguous one of its shape. A meta tensor of that layout gives ``ones_like`` the same layout decision."""
    if layout is None:
        return F.dropout(torch.ones(rows, device=device, dtype=dtype), p, training=True)
    like = torch.empty_strided(layout[0], layout[1], dtype=dtype, device="meta")
    return F.dropout(torch.ones_like(like, device=device), p, training=True).reshape(rows)


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _forward(x2d, x_dropped, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float, x_layout):
    """The forward math on 2-D ``x2d`` ``(M, in)`` (``x_dropped`` 2-D or None; ``x_layout`` the caller's ``x``
    as :func:`_x_layout` gives it): ``(y (M, out), drop(x) (M, in), h = drop(x) Aᵀ (M, r) or None, the dropout
    mask (M, in) or None)``."""
    # the LoRA branch runs in the adapter dtype (x cast to it first, as PEFT's forward does)
    adapter_dtype = x2d.dtype if lora_a is None else lora_a.dtype
    mask = None
    if dropout_p > 0.0:
        mask = _dropout_mask(x2d.shape, x_layout, dropout_p, x2d.device, adapter_dtype)
        x_lora = x2d.to(adapter_dtype) * mask
    else:
        x_lora = x2d if x_dropped is None else x_dropped
    h = None if lora_a is None else F.linear(x_lora if x_lora.dtype == adapter_dtype else x_lora.to(adapter_dtype),
                                             lora_a)
    y = fused_linear(x2d, weight, bias=bias, lora_h=h, lora_expand=None if lora_b is None else lora_b.t(),
                     scaling=scaling)[0]
    return y, x_lora, h, mask


@fresh_output_when_compiling
class LoraLinearFunction(torch.autograd.Function):
    """The LoRA / QLoRA layer on 2-D ``x2d`` ``(M, in)``, returning ``(M, out)``; see the module docstring.
    ``x_dropped`` None means ``drop(x) = x`` unless ``dropout_p > 0`` (then the op draws the mask itself and
    keeps it or its RNG state for backward); ``lora_a`` / ``lora_b`` None means the base layer alone. ``x2d`` and ``bias``
    share one dtype, ``lora_a`` and ``lora_b`` another (``lora_linear`` casts them and reshapes outside, so
    the output is no view made in here and can be changed in place)."""

    @staticmethod
    def forward(ctx, x2d, x_dropped, weight, bias, lora_a, lora_b, scaling, dropout_p, x_layout):
        ctx.dropout_p = dropout_p
        ctx.redraw = dropout_p > 0.0 and x2d.device.type == "cuda"
        if ctx.redraw:
            ctx.rng_state = _rng_state(x2d.device)
            ctx.x_layout = x_layout
        y, x_lora, h, mask = _forward(x2d, x_dropped, weight, bias, lora_a, lora_b, scaling, dropout_p, x_layout)
        needs_mask = mask is not None and not ctx.redraw and (ctx.needs_input_grad[0] or ctx.needs_input_grad[4])
        ctx.weight = weight if isinstance(weight, NF4Weight) else None
        ctx.scaling = scaling
        ctx.has_dropout = x_dropped is not None or dropout_p > 0.0
        ctx.save_for_backward(
            None if isinstance(weight, NF4Weight) else weight,
            # with the op's own mask: x (usually kept alive by the previous layer anyway), not drop(x)
            (x2d if dropout_p > 0.0 else x_lora) if ctx.needs_input_grad[4] else None,
            h if ctx.needs_input_grad[5] else None,
            lora_a, lora_b,
            mask != 0 if needs_mask else None,
        )
        return y

    @staticmethod
    def backward(ctx, dy):
        dense_weight, x_saved, h, lora_a, lora_b, kept = ctx.saved_tensors
        weight = ctx.weight if ctx.weight is not None else dense_weight
        scaling = ctx.scaling
        needs_dx, needs_dx_dropped, _, needs_bias, needs_a, needs_b = ctx.needs_input_grad[:6]
        has_lora = lora_a is not None
        adapter_dtype = lora_a.dtype if has_lora else dy.dtype
        # the LoRA branch's gradients in the adapter dtype (dy widened exactly, as PEFT's final cast does)
        dy_lora = dy.to(adapter_dtype) if has_lora else None
        mask = None
        x_lora = None if x_saved is None else x_saved.to(adapter_dtype)
        if kept is not None:
            # the forward's mask: F.dropout's 0 / 1 noise divided by 1 - p in the mask's dtype, bit for bit
            mask = kept.to(adapter_dtype).div_(1.0 - ctx.dropout_p)
            x_lora = None if x_lora is None else x_lora * mask
        elif ctx.redraw and has_lora and (needs_dx or needs_a):
            # redraw the forward's mask from its RNG state, leaving the global RNG untouched
            with torch.random.fork_rng(devices=[dy.device] if dy.device.type == "cuda" else [],
                                       device_type=dy.device.type):
                if dy.device.type == "cuda":
                    torch.cuda.set_rng_state(ctx.rng_state, dy.device)
                else:
                    torch.set_rng_state(ctx.rng_state)
                mask = _dropout_mask((dy.shape[0], lora_a.shape[1]), ctx.x_layout, ctx.dropout_p, dy.device,
                                     adapter_dtype)
            x_lora = None if x_lora is None else x_lora * mask
        g = dy_lora @ lora_b if has_lora and (needs_dx or needs_dx_dropped or needs_a) else None
        dx = dx_dropped = dbias = da = db = None
        if needs_dx:
            fuse = has_lora and not ctx.has_dropout
            dx = fused_linear(dy, weight, transpose_weight=True, lora_h=g if fuse else None,
                              lora_expand=lora_a if fuse else None, scaling=scaling)[0]
            if mask is not None:
                dx = dx.addcmul_(scaling * (g @ lora_a), mask)
        if needs_dx_dropped and has_lora:
            dx_dropped = (scaling * (g @ lora_a)).to(dy.dtype)
        if needs_bias:
            dbias = dy.sum(0)
        # s applied to the (M, r) factor, not to the (r, in) / (out, r) product: fewer elements whenever M < in,
        # out (a decode-sized step scales 16 values, not 45 thousand)
        if needs_a:
            da = (g * scaling).t() @ x_lora
        if needs_b:
            db = dy_lora.t() @ (h * scaling)
        return dx, dx_dropped, None, dbias, da, db, None, None, None


# the signature of fastpeft.reference.lora_linear (plus dropout_p), the oracle this op is held to
def lora_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    scaling: float,
    x_dropped: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """LoRA / QLoRA ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` as ``(..., out)`` in ``x.dtype``; see the
    module docstring for shapes, dropout and dtypes.

    Under ``torch.autocast`` (dtype ``c``) it computes what PEFT's layer computes there: every linear
    product in ``c`` (``x``, a dense ``W``, ``b``, ``A``, ``B`` cast to it, as autocast casts each
    ``nn.Linear``), so the output is ``c``; over an NF4 base the base product keeps ``x``'s dtype (a 4-bit
    layer is not autocast) and the LoRA branch runs in ``c``."""
    cast_to = autocast_dtype(x)
    if cast_to is not None:
        with torch.autocast(x.device.type, enabled=False):
            dense = not isinstance(weight, NF4Weight)
            return lora_linear(
                x.to(cast_to) if dense else x,
                weight.to(cast_to) if dense else weight,
                None if bias is None else bias.to(cast_to) if dense else bias,
                None if lora_a is None else lora_a.to(cast_to),
                None if lora_b is None else lora_b.to(cast_to),
                scaling,
                None if x_dropped is None else x_dropped.to(cast_to) if dense else x_dropped,
                dropout_p,
            )
    out_features, in_features = check_linear_inputs("lora_linear", x, weight, bias)
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together")
    if lora_a is not None:
        check_lora_factors(lora_a, lora_b, out_features, in_features, x.device)
        if lora_b.dtype != lora_a.dtype:
            lora_b = lora_b.to(lora_a.dtype)
    if x_dropped is not None and x_dropped.shape != x.shape:
        raise ValueError(f"x_dropped shape {tuple(x_dropped.shape)} must equal x's {tuple(x.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and x_dropped is not None:
        raise ValueError("give x_dropped or dropout_p, not both")
    if lora_a is not None and not fusable_scaling(scaling, lora_a.dtype):
        return _lora_in_peft_order(x, weight, bias, lora_a, lora_b, scaling, x_dropped, dropout_p)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    x2d = as_rows(x, in_features)
    if x_dropped is not None:
        x_dropped = as_rows(x_dropped, in_features)
    x_layout = _x_layout(x) if dropout_p > 0.0 else None
    if not torch.is_grad_enabled() or not (x.requires_grad or (x_dropped is not None and x_dropped.requires_grad)
                                           or (bias is not None and bias.requires_grad)
                                           or (lora_a is not None and (lora_a.requires_grad or lora_b.requires_grad))):
        # nothing to differentiate (inference, decode): the forward alone, without the autograd Function's
        # per-call cost (tens of microseconds, more than a decode step's LoRA math on a small layer)
        y = _forward(x2d, x_dropped, weight, bias, lora_a, lora_b, float(scaling), float(dropout_p), x_layout)[0]
    else:
        y = LoraLinearFunction.apply(x2d, x_dropped, weight, bias, lora_a, lora_b, float(scaling), float(dropout_p),
                                     x_layout)
    return rows_like(y, x, out_features)


def _lora_in_peft_order(x, weight, bias, lora_a, lora_b, scaling: float, x_dropped, dropout_p: float):
    """PEFT's ``base(x) + lora_B(lora_A(drop(x))) * s`` op by op in its order, for the scalings and adapter dtypes
    :func:`~fastpeft.ops.inputs.fusable_scaling` refuses: the base product by the base-only op, the LoRA term by
    plain torch ops in the adapter dtype (autograd then gives PEFT's gradients), ``nn.Dropout``'s own draw on the
    cast ``x``, the sum in the promoted dtype, one cast to ``x.dtype``."""
    x_lora = (x if x_dropped is None else x_dropped).to(lora_a.dtype)
    if dropout_p > 0.0:
        x_lora = F.dropout(x_lora, dropout_p, training=True)
    term = F.linear(F.linear(x_lora, lora_a), lora_b) * scaling
    return (lora_linear(x, weight, bias, None, None, 0.0) + term).to(x.dtype)
