"""DoRA as autograd ops over a dense or NF4 base; the same semantics as ``fastpeft.reference.dora_linear``
(PEFT's ``lora.Linear`` / ``lora.Linear4bit`` with ``use_dora=True``).

Public API:

- ``dora_weight_norm(weight, lora_a, lora_b, scaling, dtype=None)``: ``‖W + s·B A‖₂`` per output row,
  ``(out,)``, detached: on the Triton backend the cached-‖W‖² identity below (one skinny ``A Wᵀ`` product per
  call and no ``B A``), on the reference backend ``fastpeft.reference.dora_weight_norm``.
- ``dora_linear(x, weight, bias, lora_a, lora_b, scaling, magnitude, x_dropped=None)``: the layer.
  ``x`` ``(..., in)``, ``weight`` frozen dense ``(out, in)`` or :class:`~fastpeft.nf4.NF4Weight`, ``bias``
  ``(out,)`` or None, ``lora_a`` ``(r, in)``, ``lora_b`` ``(out, r)``, ``magnitude`` ``(out,)``;
  ``x_dropped = dropout(x)`` when dropout is active (then autograd carries the ``x'`` gradient back
  through the caller's dropout). Gradients for ``x``, ``bias``, ``lora_a``, ``lora_b``, ``magnitude``.

Math, with ``c = m / n`` per output column, ``h = x' Aᵀ``, in PEFT's order of operations
(peft/tuners/lora/dora.py):

    y = base(x) + ((c − 1) ⊙ p + s · h (c ⊙ B)ᵀ),   base(x) = x Wᵀ + b
    p = base(x) − b    without dropout (x' = x: PEFT reuses the base layer's output)
    p = x' Wᵀ          with dropout (a second base product, on x' = drop(x))

The base layer's output is computed first, exactly as the base layer computes it, and DoRA's term is added
to it last: an adapter at initialisation (``c = 1``, ``B = 0``) adds an exact 0 and leaves the base layer's
output bit for bit, as PEFT's does.

Backward (``n`` detached; ``dz = dy ⊙ c``, ``g = dz B``): ``dB = s · c ⊙ (dyᵀ h)``, ``dA = s · gᵀ x'``,
``dm = (Σ_t dy ⊙ x'Wᵀ + s · Σ_r B ⊙ (dyᵀ h)) / n``; ``dx = dz W + s · g A`` without dropout, else
``dx = dy W`` and ``dx' = ((c − 1) ⊙ dy) W + s · g A``. Only ``x'``, ``h`` ``(M, r)`` and the ``(out,)``
vectors are kept: ``Σ_t dy ⊙ x'Wᵀ`` recomputes the base product with the row reduction fused into it
(``fused_linear``'s ``reduce_rows``, dense or NF4), so no ``(M, out)`` tensor is stored for ``dm``; for a half
precision ``x`` without dropout it recomputes PEFT's ``base(x) − b`` itself (both roundings to ``x.dtype``).

Products: every product of ``W`` is the ``fused_linear`` primitive (``fastpeft.ops.fused_linear``: cuBLAS on a
dense base, the NF4 kernels on NF4, whose ``dx`` carries the LoRA term in its epilogue); DoRA's term is PEFT's ``(c − 1) ⊙ p + (c ⊙ h Bᵀ) · s`` with the
same roundings (in place where the dtypes allow), added into the base output in place.

Dtypes, as PEFT's DoRA (fp32 adapters on a bf16 / fp16 model): the base product runs in ``x.dtype``;
everything of the adapter — ``h``, the LoRA term, the norm ``n`` (fp32 from the stored values, in the wider of
the adapter's and the magnitude's dtypes), ``c = m / n`` — in the adapter dtype; DoRA's term in the promoted
dtype, added to the base output and rounded once to ``x.dtype``. ``base(x) − b`` takes the bias as it is (fp32
under autocast, as PEFT's ``result - bias``). With dropout, ``x'`` comes in the adapter dtype (PEFT casts
``x`` before its dropout) and ``x' Wᵀ`` runs there over the base as PEFT's DoRA reads it: an NF4 base stored
in half precision is dequantised in that dtype, then widened (``dequantize_module_weight``). Backward:
``dy ⊙ c`` in the promoted dtype, ``g``, ``dA``, ``dB``, ``dm`` in the adapter dtype; the base part of ``dx``
takes ``dy ⊙ c`` rounded to ``x.dtype`` (PEFT's base-layer gradient) with the LoRA part added before the one
rounding.

The weight norm by the cached-‖W‖² identity (``W`` dense or NF4, ``A`` ``(r, in)``, ``B`` ``(out, r)``)::

    n²[o] = ‖W[o]‖² + 2s · (W Aᵀ)[o] · B[o] + s² · B[o] (A Aᵀ) B[o]ᵀ

The base is frozen and the norm detached (DoRA paper §4.3), so ``‖W‖²`` per row is computed once and cached (keyed
by the weight's storage, shape, dtype and version counter: an in-place change of the base recomputes it). Each
call then needs one skinny product ``Pᵀ = A Wᵀ`` ``(r, out)``, a ``fused_linear`` with ``M = r`` (cuBLAS on a dense
base; on NF4 the kernels ``fastpeft.kernels.nf4_matmul``'s plan picks for ``M = r``), plus rank-sized work:
``G = A Aᵀ`` ``(r, r)`` and ``B G`` ``(out, r)``, in fp32. Neither ``B A`` nor a dense ``W`` copy is formed on a
dense base.

Its precision: the inputs are rounded to the compute dtype (``dtype``, as the reference and PEFT compute in it);
``P``, ``G``, ``B G`` and the row sums are accumulated and kept in fp32 (``P`` from bf16/fp16 tensor cores with fp32
output). The three terms cancel when ``s B A`` nearly cancels ``W``: with fp32 unit roundoff ``u = 2⁻²⁴`` the
relative error of ``n[o]`` is bounded by ``4 u (‖W[o]‖² + ‖s B[o] A‖²) / n[o]²`` (measured constant 1.0-2.3
against float64 at ``n / ‖W‖`` from 7e-2 to 7e-4, tested at 7e-3): 1e-4 at ``n / ‖W‖ = 0.1``, 1e-2 at 0.007, and
no correct digit below ~1e-3 (``n²`` is clamped at 0 before the square root). Forming ``W + s B A`` in bf16 first,
as PEFT does, has relative error ``2⁻⁸ ‖W[o]‖ / n[o]``, worse than this in every case; in fp32, PEFT's direct form
keeps ``u ‖W[o]‖ / n[o]``.
"""

from __future__ import annotations

from typing import Optional

import torch

from torch.utils.weak import WeakTensorKeyDictionary

from .. import reference
from ..nf4 import NF4Weight
from .compile_compat import fresh_output_when_compiling
from .dispatch import backend_for
from .fused_linear import fused_linear
from .inputs import Weight, autocast_dtype, check_linear_inputs, check_lora_factors, fusable_scaling
from .nf4_dequantize import nf4_dequantize


MAX_RANK = 256
_NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# ‖W‖² per row, fp32 (out,), per base weight: {key tensor: (version key, norms)}
_weight_sq_norms: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def _version_key(weight: Weight, dtype: torch.dtype):
    """What identifies the base's values: shape, dtype, storage and version counters; None for an inference
    tensor, which has no version counter (its norm is then never cached)."""
    tensors = (weight,) if isinstance(weight, torch.Tensor) else (weight.packed, weight.absmax)
    if any(t.is_inference() for t in tensors):
        return None
    return (tuple(weight.shape), dtype, *((t.data_ptr(), t._version) for t in tensors))


def _stored_rounding(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The NF4 base in ``dtype`` as PEFT's DoRA reads it: dequantised to its stored dtype (bitsandbytes'
    ``dequantize_4bit``), then cast (one rounding of the fp32 products where the stored dtype is fp32)."""
    stored = dtype if weight.dtype == torch.float32 else weight.dtype
    dense = nf4_dequantize(weight, stored)
    return dense if stored == dtype else dense.to(dtype)


def weight_sq_norms(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``(out,)`` ``‖W[o]‖²`` of the base rounded to ``dtype`` (an NF4 base to its stored dtype first, see
    :func:`_stored_rounding`), computed once per base and cached (not while dynamo traces: in the graph)."""
    key_tensor = weight if isinstance(weight, torch.Tensor) else weight.packed
    version = None if torch.compiler.is_compiling() else _version_key(weight, dtype)
    cached = None if version is None else _weight_sq_norms.get(key_tensor)
    if cached is not None and cached[0] == version:
        return cached[1]
    dense = _stored_rounding(weight, dtype) if isinstance(weight, NF4Weight) else weight.to(dtype)
    norms = torch.linalg.vector_norm(dense, dim=1, dtype=torch.float32).square_()
    if version is not None:
        _weight_sq_norms[key_tensor] = (version, norms)
    return norms


def weight_norm_by_identity(
    weight: Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dtype: Optional[torch.dtype] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``‖W + s·B A‖₂`` per output row as ``(out,)`` in ``dtype`` (default ``lora_a.dtype``) by the cached-‖W‖²
    identity (the module docstring), the GPU path of :func:`dora_weight_norm`.

    ``weight``: dense ``(out, in)`` tensor (any strides) or :class:`NF4Weight`; ``lora_a`` ``(r, in)`` and
    ``lora_b`` ``(out, r)`` float tensors (any strides, any of fp32/fp16/bf16), ``1 <= r <= MAX_RANK``.
    ``out``: an optional contiguous ``(out,)`` buffer of ``dtype``. No autograd (the norm is detached)."""
    is_nf4 = isinstance(weight, NF4Weight)
    if not is_nf4 and not (isinstance(weight, torch.Tensor) and weight.dim() == 2):
        raise TypeError(f"weight must be a 2-D tensor or an NF4Weight, got {type(weight).__name__}")
    out_features, in_features = weight.shape
    check_lora_factors(lora_a, lora_b, out_features, in_features, weight.device)
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)) + ((("weight", weight),) if not is_nf4 else ()):
        if t.dtype not in _NORM_DTYPES:
            raise TypeError(f"{name} dtype must be one of {_NORM_DTYPES}, got {t.dtype}")
    rank = lora_a.shape[0]
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank must be in [1, {MAX_RANK}], got {rank}")
    dtype = lora_a.dtype if dtype is None else dtype
    if dtype not in _NORM_DTYPES:
        raise TypeError(f"dtype must be one of {_NORM_DTYPES}, got {dtype}")
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
        # Pᵀ = A Wᵀ, (r, out) in fp32: a fused_linear with M = r rows (an NF4 base stored in another half precision
        # than dtype: its rounding first, as PEFT's)
        base = _stored_rounding(weight, dtype) if is_nf4 and weight.dtype not in (dtype, torch.float32) else weight
        projected = fused_linear(lora_a, base, out_dtype=torch.float32)[0].t()
        gram = lora_a.float() @ lora_a.float().t()
        sq = weight_sq_norms(weight, dtype).clone()
        sq.add_((projected * lora_b32).sum(1), alpha=2.0 * scaling)
        sq.add_(((lora_b32 @ gram) * lora_b32).sum(1), alpha=scaling * scaling)
        torch.sqrt(sq.clamp_(min=0.0), out=sq)
        out.copy_(sq)
    return out


def dora_weight_norm(
    weight: Weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """``‖W + s·B A‖₂`` per output row as ``(out,)`` in ``dtype`` (default ``lora_a.dtype``), detached.

    On the Triton backend :func:`weight_norm_by_identity` (one skinny product a call); on the reference backend
    ``fastpeft.reference.dora_weight_norm``'s direct form, PEFT's (a composition, so the backend is chosen here:
    the two forms round differently, and the CPU path is the reference's). While dynamo traces, an NF4 base is
    dequantised by the ``nf4_dequantize`` primitive (the op in the graph) and no reusable buffer is written."""
    if not isinstance(weight, (torch.Tensor, NF4Weight)):
        raise TypeError(f"weight must be a 2-D tensor or an NF4Weight, got {type(weight).__name__}")
    dtype = lora_a.dtype if dtype is None else dtype
    lora_a, lora_b = lora_a.detach(), lora_b.detach()
    if backend_for(lora_a.device) == "triton":
        return weight_norm_by_identity(weight, lora_a, lora_b, float(scaling), dtype)
    if torch.compiler.is_compiling():
        base = nf4_dequantize(weight) if isinstance(weight, NF4Weight) else weight
        return reference.dora_weight_norm(base, lora_a, lora_b, scaling, dtype=dtype)
    return reference.dora_weight_norm(weight, lora_a, lora_b, scaling, dtype=dtype, scratch=True)


def _dora_base(weight: Weight, dtype: torch.dtype) -> Weight:
    """The base as PEFT's DoRA multiplies ``x'`` by with dropout (``dequantize_module_weight(base).to(x'.dtype)``):
    bitsandbytes dequantises an NF4 base to its stored dtype, so one stored in half precision under ``x'`` of
    another dtype is that rounding widened (a dense ``(out, in)`` tensor, as PEFT's); otherwise the base itself
    (an fp32-stored NF4 cast once is what the NF4 ops compute)."""
    if isinstance(weight, NF4Weight) and weight.dtype not in (dtype, torch.float32):
        return nf4_dequantize(weight).to(dtype)
    return weight


@fresh_output_when_compiling
class DoraLinearFunction(torch.autograd.Function):
    """The DoRA layer on 2-D ``x2d`` ``(M, in)``, returning ``(M, out)``; see the module docstring. ``lora_a``
    and ``lora_b`` share the adapter dtype, ``bias`` and ``magnitude`` keep their own (``dora_linear`` casts and
    reshapes outside, so the output can be changed in place)."""

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
        # PEFT's order: the base layer's output, DoRA's term added to it last (so an adapter at initialisation,
        # c = 1 and B = 0, adds an exact 0 and leaves the base layer's output bit for bit)
        y = fused_linear(x2d, weight, bias=None if bias is None else bias.to(x2d.dtype))[0]
        if x_dropped is None:
            base_product = y if bias is None else y - bias  # PEFT's `result - bias`, in their promoted dtype
        else:  # PEFT recomputes x'Wᵀ in the adapter dtype
            x_drop = x_lora.to(adapter_dtype)
            base_product = fused_linear(x_drop, _dora_base(weight, adapter_dtype))[0]
        # PEFT's (c − 1) ⊙ p + (c ⊙ lora) · s, each product rounded in its promoted dtype as PEFT's
        dora_term = base_product * (col_scale - 1)
        lora_term = (h @ lora_b.t()) * col_scale
        lora_term.mul_(scaling)
        dora_term = dora_term.add_(lora_term) if dora_term.dtype == torch.promote_types(
            dora_term.dtype, lora_term.dtype) else dora_term + lora_term
        y = y.add_(dora_term)  # computed in the promoted dtype, rounded once to x's
        ctx.weight = weight if isinstance(weight, NF4Weight) else None
        ctx.scaling = scaling
        ctx.has_dropout = x_dropped is not None
        ctx.dtypes = (x2d.dtype, magnitude.dtype)
        ctx.save_for_backward(None if isinstance(weight, NF4Weight) else weight, x_lora, h, lora_a, lora_b,
                              norm, col_scale, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        dense_weight, x_lora, h, lora_a, lora_b, norm, col_scale, bias = ctx.saved_tensors
        weight = ctx.weight if ctx.weight is not None else dense_weight
        s = ctx.scaling
        x_dtype, magnitude_dtype = ctx.dtypes
        needs_dx, needs_dx_dropped, _, needs_bias, needs_a, needs_b, _, needs_m = ctx.needs_input_grad
        dy_adapter = dy.to(lora_a.dtype)  # exact widening, as PEFT's final cast gives it back
        dz = dy_adapter * col_scale  # in the promoted dtype: wider than the factors under autocast
        g = dz.to(lora_b.dtype) @ lora_b if (needs_dx or needs_dx_dropped or needs_a) else None
        # the product x'Wᵀ of the forward: over the base as PEFT's DoRA reads it when dropout recomputed it
        dora_base = _dora_base(weight, x_lora.dtype) if ctx.has_dropout else weight
        dx = dx_dropped = dbias = da = db = dm = None
        if ctx.has_dropout:
            if needs_dx:
                dx = fused_linear(dy, weight, transpose_weight=True)[0]
            if needs_dx_dropped:
                dx_dropped = fused_linear(dy_adapter * (col_scale - 1), dora_base, transpose_weight=True, lora_h=g,
                                          lora_expand=lora_a, scaling=s)[0]
                dx_dropped = dx_dropped.to(x_lora.dtype)
        elif needs_dx:
            # the base part sees dy ⊙ c in x's dtype, as PEFT's base layer gets its gradient
            dx = fused_linear(dz.to(x_dtype), weight, transpose_weight=True, lora_h=g, lora_expand=lora_a,
                              scaling=s)[0]
        if needs_bias:
            # PEFT's: the base layer's Σ (dy + (c − 1) ⊙ dy) less the Σ (c − 1) ⊙ dy of its `result - bias`
            # (Σ dy, but NaN where c is infinite, as PEFT's); with dropout the bias is in the base alone
            if ctx.has_dropout:
                dbias = dy.sum(0)
            else:
                base_part = dy_adapter * (col_scale - 1)
                dbias = (dy + base_part).sum(0) - base_part.sum(0)
        if needs_a:  # s on the (M, r) factor, as in fastpeft.ops.lora: fewer elements than the (r, in) product
            da = (g * s).t() @ x_lora.to(lora_a.dtype)
        if needs_b or needs_m:
            dy_h = dy_adapter.t() @ h  # (out, r)
        if needs_b:
            db = dy_h * (s * col_scale).unsqueeze(1)  # one pass over (out, r)
        if needs_m:
            # Σ_t dy ⊙ (x'Wᵀ + s·h Bᵀ): the base part reduced inside the matmul (x'Wᵀ never stored), the
            # LoRA part is Σ_r B ⊙ (dyᵀ h), from the (out, r) product dB uses anyway
            if ctx.has_dropout or x_dtype not in (torch.float16, torch.bfloat16):
                base_part = fused_linear(x_lora, dora_base, reduce_rows=dy, store_out=False)[1]
            else:
                # PEFT's x Wᵀ is the base output minus the bias, each rounded to x's half precision (a rounding a
                # product recomputed without the bias would not repeat): the forward's ops again
                base_product = fused_linear(x_lora, weight, bias=None if bias is None else bias.to(x_dtype))[0]
                base_product = base_product if bias is None else base_product - bias
                base_part = (dy.float() * base_product.float()).sum(0)
            dm = ((base_part.to(dy_h.dtype) + s * (lora_b * dy_h).sum(1)) / norm).to(magnitude_dtype)
        return dx, dx_dropped, None, dbias, da, db, None, dm


# the signature of fastpeft.reference.dora_linear, the oracle this op is held to
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
    dense ``W``, ``A``, ``B`` cast to it; the bias cast for the base product, while ``result - bias`` sees it
    as it is), the norm and ``m / n`` in fp32 (``magnitude``'s dtype), the output in ``c``; over an NF4 base
    the base product keeps ``x``'s dtype."""
    cast_to = autocast_dtype(x)
    if cast_to is not None:
        with torch.autocast(x.device.type, enabled=False):
            dense = not isinstance(weight, NF4Weight)
            return dora_linear(
                x.to(cast_to) if dense else x, weight.to(cast_to) if dense else weight, bias,
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
    lora_b = lora_b.to(lora_a.dtype)
    if x_dropped is not None:
        x_dropped = x_dropped.reshape(-1, in_features)
    y = DoraLinearFunction.apply(x.reshape(-1, in_features), x_dropped, weight, bias, lora_a, lora_b, float(scaling),
                                 magnitude)
    return y.view(*x.shape[:-1], out_features)  # a view made outside the Function: in-place changes allowed
