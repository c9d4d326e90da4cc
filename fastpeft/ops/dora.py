"""DoRA as autograd ops over a dense or NF4 base; the same semantics as ``fastpeft.reference.dora_linear``
(PEFT's ``lora.Linear`` / ``lora.Linear4bit`` with ``use_dora=True``).

Public API:

- ``dora_weight_norm(weight, lora_a, lora_b, scaling, dtype=None)``: ``‖W + s·B A‖₂`` per output row,
  ``(out,)``, detached (``fastpeft::dora_weight_norm``, a ``torch.library`` custom op:
  ``fastpeft.kernels.dora``'s cached-‖W‖² identity, one skinny ``W Aᵀ`` product per call and no ``B A``,
  or the reference).
- ``dora_linear(x, weight, bias, lora_a, lora_b, scaling, magnitude, x_dropped=None)``: the layer.
  ``x`` ``(..., in)``, ``weight`` frozen dense ``(out, in)`` or :class:`~fastpeft.nf4.NF4Weight`, ``bias``
  ``(out,)`` or None, ``lora_a`` ``(r, in)``, ``lora_b`` ``(out, r)``, ``magnitude`` ``(out,)``;
  ``x_dropped = dropout(x)`` when dropout is active (then autograd carries the ``x'`` gradient back
  through the caller's dropout). Gradients for ``x``, ``bias``, ``lora_a``, ``lora_b``, ``magnitude``.

Math, with ``c = m / n`` per output column, ``h = x' Aᵀ`` and ``z = x' Wᵀ + s · h Bᵀ``:

    no dropout (x' = x):  y = c ⊙ z + b
    dropout:              y = (x Wᵀ + b) + ((c − 1) ⊙ x'Wᵀ + s · h (c ⊙ B)ᵀ)     (PEFT's order)

Backward (``n`` detached; ``dz = dy ⊙ c``, ``g = dz B``): ``dB = s · c ⊙ (dyᵀ h)``, ``dA = s · gᵀ x'``,
``dm = (Σ_t dy ⊙ x'Wᵀ + s · Σ_r B ⊙ (dyᵀ h)) / n``; ``dx = dz W + s · g A`` without dropout, else
``dx = dy W`` and ``dx' = ((c − 1) ⊙ dy) W + s · g A``. Only ``x'``, ``h`` ``(M, r)`` and the ``(out,)``
vectors are kept: ``Σ_t dy ⊙ x'Wᵀ`` recomputes the base product with the row reduction fused into it
(``fastpeft.ops.ia3.ia3_matmul``, dense or NF4), so no ``(M, out)`` tensor is stored for ``dm`` and no
``(out, in)`` tensor is ever built.

Fusion: on an NF4 base the forward ``c ⊙ (x Wᵀ + s h Bᵀ) + b`` is one kernel
(``fastpeft.ops.lora.nf4_lora_matmul`` with its per-column scale in the epilogue: one output write), as
are ``dx`` (LoRA term in the epilogue) and the recomputed ``z``. On a dense base the products are cuBLAS
as in ``fastpeft.ops.lora`` (the LoRA term added in place with ``addmm_``), and the scale and bias are one
more in-place pass (``addcmul``) — a dense fused-epilogue kernel is a GPU measurement away. With dropout,
the forward takes two base products, as PEFT's does, and adds the DoRA term to the base output last, as PEFT
does: an adapter at initialisation (``c = 1``, ``B = 0``) leaves the base output bit for bit.

Dtypes, as PEFT's DoRA (fp32 adapters on a bf16 / fp16 model): the base product ``x Wᵀ`` runs in
``x.dtype``; everything of the adapter — ``h``, the LoRA term, the norm ``n`` (fp32 from the stored values,
rounded to the adapter dtype ``lora_a.dtype``), ``c = m / n`` in ``magnitude``'s dtype — is computed in the
adapter dtype; ``c ⊙ (x Wᵀ + s·h Bᵀ) + b`` is formed in the promoted dtype (the NF4 kernel: its fp32
epilogue) and rounded once to ``x.dtype``. With dropout, ``x'`` is cast to the adapter dtype and its two
products run there, as PEFT's ``F.linear(x', W.to(x'.dtype))``. Backward: ``dy ⊙ c``, ``g``, ``dA``, ``dB``,
``dm`` in the adapter dtype; the base part of ``dx`` takes ``dy ⊙ c`` rounded to ``x.dtype`` (PEFT's
base-layer gradient) with the LoRA part added before the one rounding.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..nf4 import NF4Weight
from .dispatch import backend_for, run_kernel
from .ia3 import ia3_matmul, weight_from_op_args, weight_op_args
from .inputs import Weight, autocast_dtype, check_linear_inputs, check_lora_factors, fusable_scaling
from .lora import _base_matmul


@torch.library.custom_op("fastpeft::dora_weight_norm", mutates_args=())
def _dora_weight_norm_op(
    dense: Optional[torch.Tensor],
    packed: Optional[torch.Tensor],
    absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    nested_absmax: Optional[torch.Tensor],
    nested_offset: Optional[torch.Tensor],
    out_features: int,
    in_features: int,
    blocksize: int,
    weight_dtype: torch.dtype,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    weight = weight_from_op_args(dense, packed, absmax, nested_code, nested_absmax, nested_offset,
                                 out_features, in_features, blocksize, weight_dtype)
    def torch_path():
        return reference.dora_weight_norm(weight, lora_a, lora_b, scaling, dtype=dtype, scratch=True)

    if backend_for(lora_a.device) == "triton":
        from ..kernels.dora import dora_weight_norm as kernel

        return run_kernel("dora_weight_norm", lambda: kernel(weight, lora_a, lora_b, scaling, dtype=dtype), torch_path)
    return torch_path()


@_dora_weight_norm_op.register_fake
def _(dense, packed, absmax, nested_code, nested_absmax, nested_offset, out_features, in_features, blocksize,
      weight_dtype, lora_a, lora_b, scaling, dtype):
    return lora_a.new_empty((out_features,), dtype=dtype)


def dora_weight_norm(
    weight: Weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """``‖W + s·B A‖₂`` per output row as ``(out,)`` in ``dtype`` (default ``lora_a.dtype``), detached."""
    if not isinstance(weight, (torch.Tensor, NF4Weight)):
        raise TypeError(f"weight must be a 2-D tensor or an NF4Weight, got {type(weight).__name__}")
    dtype = lora_a.dtype if dtype is None else dtype
    return _dora_weight_norm_op(*weight_op_args(weight), lora_a.detach(), lora_b.detach(), float(scaling), dtype)


def _scaled_product(a, weight: Weight, bias, lora_h, lora_expand, scaling: float, col_scale):
    """``col_scale ⊙ (a Wᵀ + s · h E) + b`` in ``a.dtype``: one fused kernel on NF4, cuBLAS plus one
    in-place pass dense. ``h``, ``E`` and ``col_scale`` may be wider than ``a`` (fp32 adapters): their terms
    are then computed in the promoted dtype and the result rounded once."""
    if isinstance(weight, NF4Weight):
        from .lora import nf4_lora_matmul

        return nf4_lora_matmul(a, weight, bias=bias, lora_h=lora_h, lora_expand=lora_expand, scaling=scaling,
                               col_scale=col_scale)
    if (lora_h is None or lora_h.dtype == a.dtype) and col_scale.dtype == a.dtype:
        z = _base_matmul(a, weight, False, None, lora_h, lora_expand, scaling)
        return z.mul_(col_scale) if bias is None else torch.addcmul(bias, z, col_scale)
    z = a @ weight.to(a.dtype).t()
    if lora_h is not None:
        z = torch.add(z, (lora_h @ lora_expand).mul_(scaling))
    y = z * col_scale
    return (y if bias is None else y + bias).to(a.dtype)


class DoraLinearFunction(torch.autograd.Function):
    """The DoRA layer on 2-D ``x2d`` ``(M, in)``, returning ``(M, out)``; see the module docstring. ``x2d``
    and ``bias`` share one dtype, ``lora_a`` and ``lora_b`` the adapter dtype, ``magnitude`` keeps its own
    (``dora_linear`` casts them and reshapes outside, so the output can be changed in place)."""

    @staticmethod
    def forward(ctx, x2d, x_dropped, weight, bias, lora_a, lora_b, scaling, magnitude):
        adapter_dtype = lora_a.dtype
        x_lora = x2d if x_dropped is None else x_dropped
        # the norm in the wider of the adapter's and the magnitude's dtypes (fp32 for PEFT's fp32 magnitude,
        # also when autocast runs the factors in bf16)
        norm = dora_weight_norm(weight, lora_a, lora_b, scaling,
                                dtype=torch.promote_types(adapter_dtype, magnitude.dtype))
        col_scale = magnitude / norm
        h = x_lora.to(adapter_dtype) @ lora_a.t()
        if x_dropped is None:
            y = _scaled_product(x2d, weight, bias, h, lora_b.t(), scaling, col_scale)
        else:
            # PEFT: base(x) + ((c − 1) ⊙ x'Wᵀ + c ⊙ s·h Bᵀ), x' and its products in the adapter dtype
            x_drop = x_lora.to(adapter_dtype)
            dora_term = _scaled_product(x_drop, weight, None, None, None, scaling, col_scale - 1)
            dora_term = dora_term.to(torch.promote_types(adapter_dtype, col_scale.dtype))
            dora_term.addmm_(h.to(dora_term.dtype), (lora_b * col_scale.unsqueeze(1)).t().to(dora_term.dtype),
                             alpha=scaling)
            y = _base_matmul(x2d, weight, False, bias, None, None, scaling).add_(dora_term)
        ctx.weight = weight if isinstance(weight, NF4Weight) else None
        ctx.scaling = scaling
        ctx.has_dropout = x_dropped is not None
        ctx.dtypes = (x2d.dtype, magnitude.dtype)
        ctx.save_for_backward(None if isinstance(weight, NF4Weight) else weight, x_lora, h, lora_a, lora_b,
                              norm, col_scale)
        return y

    @staticmethod
    def backward(ctx, dy):
        dense_weight, x_lora, h, lora_a, lora_b, norm, col_scale = ctx.saved_tensors
        weight = ctx.weight if ctx.weight is not None else dense_weight
        s = ctx.scaling
        x_dtype, magnitude_dtype = ctx.dtypes
        needs_dx, needs_dx_dropped, _, needs_bias, needs_a, needs_b, _, needs_m = ctx.needs_input_grad
        dy_adapter = dy.to(lora_a.dtype)  # exact widening, as PEFT's final cast gives it back
        dz = dy_adapter * col_scale
        g = dz @ lora_b if (needs_dx or needs_dx_dropped or needs_a) else None
        dx = dx_dropped = dbias = da = db = dm = None
        if ctx.has_dropout:
            if needs_dx:
                dx = _base_matmul(dy, weight, True, None, None, None, s)
            if needs_dx_dropped:
                dx_dropped = _base_matmul(dy_adapter * (col_scale - 1), weight, True, None, g, lora_a, s)
                dx_dropped = dx_dropped.to(x_lora.dtype)
        elif needs_dx:
            # the base part sees dy ⊙ c in x's dtype, as PEFT's base layer gets its gradient
            dx = _base_matmul(dz.to(x_dtype), weight, True, None, g, lora_a, s)
        if needs_bias:
            dbias = dy.sum(0)
        if needs_a:  # s on the (M, r) factor, as in fastpeft.ops.lora: fewer elements than the (r, in) product
            da = (g * s).t() @ x_lora.to(lora_a.dtype)
        if needs_b or needs_m:
            dy_h = dy_adapter.t() @ h  # (out, r)
        if needs_b:
            db = dy_h * (s * col_scale).unsqueeze(1)  # one pass over (out, r)
        if needs_m:
            # Σ_t dy ⊙ (x'Wᵀ + s·h Bᵀ): the base part reduced inside the matmul (x'Wᵀ never stored), the
            # LoRA part is Σ_r B ⊙ (dyᵀ h), from the (out, r) product dB uses anyway
            base_part = ia3_matmul(x_lora, weight, reduce_rows=dy, store_out=False)[1]
            dm = ((base_part.to(dy_h.dtype) + s * (lora_b * dy_h).sum(1)) / norm).to(magnitude_dtype)
        return dx, dx_dropped, None, dbias, da, db, None, dm


def dora_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    x_dropped: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DoRA ``(..., out)`` in ``x.dtype``; see the module docstring for shapes, dropout and dtypes.

    Under ``torch.autocast`` (dtype ``c``), as PEFT's DoRA there: the linear products in ``c`` (``x``, a
    dense ``W``, ``b``, ``A``, ``B`` cast to it), the norm and ``m / n`` in fp32 (``magnitude``'s dtype),
    the output in ``c``; over an NF4 base the base product keeps ``x``'s dtype."""
    cast_to = autocast_dtype(x)
    if cast_to is not None:
        with torch.autocast(x.device.type, enabled=False):
            dense = not isinstance(weight, NF4Weight)
            return dora_linear(
                x.to(cast_to) if dense else x, weight.to(cast_to) if dense else weight,
                None if bias is None else bias.to(cast_to) if dense else bias,
                lora_a.to(cast_to), lora_b.to(cast_to), scaling, magnitude,
                None if x_dropped is None else x_dropped.to(cast_to) if dense else x_dropped,
            )
    out_features, in_features = check_linear_inputs("dora_linear", x, weight, bias)
    check_lora_factors(lora_a, lora_b, out_features, in_features, x.device)
    if tuple(magnitude.shape) != (out_features,):
        raise ValueError(f"magnitude must be ({out_features},), got {tuple(magnitude.shape)}")
    if x_dropped is not None and x_dropped.shape != x.shape:
        raise ValueError(f"x_dropped shape {tuple(x_dropped.shape)} must equal x's {tuple(x.shape)}")
    if not fusable_scaling(scaling, lora_a.dtype):
        # PEFT's ops in PEFT's order (the reference, differentiated by autograd): see fusable_scaling
        return reference.dora_linear(x, weight, bias, lora_a, lora_b, scaling, magnitude, x_dropped)
    bias = None if bias is None else bias.to(x.dtype)
    lora_b = lora_b.to(lora_a.dtype)
    if x_dropped is not None:
        x_dropped = x_dropped.reshape(-1, in_features)
    y = DoraLinearFunction.apply(x.reshape(-1, in_features), x_dropped, weight, bias, lora_a, lora_b, float(scaling),
                                 magnitude)
    return y.view(*x.shape[:-1], out_features)  # a view made outside the Function: in-place changes allowed
