"""IA3 as autograd ops over a dense or NF4 base; the same semantics as ``fastpeft.reference.ia3_linear``.

Public API:

- ``ia3_linear(x, weight, bias, ia3_scale, is_feedforward)``: ``x`` ``(..., in)`` (any strides, fp32 /
  fp16 / bf16), ``weight`` a frozen dense ``(out, in)`` tensor or an :class:`~fastpeft.nf4.NF4Weight`,
  ``bias`` ``(out,)`` or None, ``ia3_scale`` ``l``: ``(in,)`` when ``is_feedforward``
  (``y = (x ⊙ l) Wᵀ + b``), else ``(out,)`` (``y = (x Wᵀ + b) ⊙ l``, PEFT's rule: the bias is scaled
  too). Gradients for ``x``, ``ia3_scale`` and ``bias``.
- ``ia3_matmul(a, weight, ...)``: the building block ``out_scale ⊙ ((a ⊙ in_scale) · op(W) + b)`` with an
  optional fused row reduction (``fastpeft::ia3_matmul``, a ``torch.library`` custom op: Triton kernel
  ``fastpeft.kernels.ia3`` or the reference).

Every pass is one kernel launch except the output-scaling backward on the Triton backend, which recomputes
``z = x Wᵀ + b`` for ``dl = Σ_t dy ⊙ z`` in a second launch (reduced on the fly, never stored: the GPU trades a
second pass over ``W`` for an ``(M, out)`` activation). Off it (the CPU path), where recomputing would be a
second full matmul per backward and slower than PEFT, ``z`` is kept, as autograd keeps it for PEFT's
``result * l``: over a dense base autograd differentiates the forward's plain PyTorch ops directly (no
autograd Function, whose per-call Python cost exceeds a small layer's math); over an NF4 base the Function
keeps ``z`` (and never the dequantised weight).

    feed-forward  forward  y  = (x ⊙ l) Wᵀ + b        backward  dx = (dy W) ⊙ l,  dl = Σ_t x ⊙ (dy W)  (one pass)
    output        forward  y  = (x Wᵀ + b) ⊙ l        backward  dx = (dy ⊙ l) W,  dl = Σ_t dy ⊙ (x Wᵀ + b)

Dtypes: computed in ``x.dtype`` with fp32 accumulation; ``l`` is read in its own dtype and ``dl`` is
returned in it (the reduction is fp32). PEFT computes the feed-forward ``x ⊙ l`` in ``l``'s dtype and casts
back; the two agree when the dtypes match.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import reference
from ..nf4 import NF4Weight
from .dispatch import backend_for, run_kernel
from .inputs import Weight, as_rows, autocast_dtype, check_linear_inputs, check_vector, rows_like
from .lora import lora_linear


def weight_op_args(weight: Weight) -> tuple:
    """A dense or NF4 base weight as the flat arguments a ``torch.library`` op can take:
    ``(dense, packed, absmax, nested_code, nested_absmax, nested_offset, out, in, blocksize, dtype)``."""
    if isinstance(weight, NF4Weight):
        return (None, *weight.op_args())
    return (weight, None, None, None, None, None, weight.shape[0], weight.shape[1], 64, weight.dtype)


def weight_from_op_args(dense, packed, absmax, nested_code, nested_absmax, nested_offset, out_features,
                        in_features, blocksize, weight_dtype) -> Weight:
    """Inverse of :func:`weight_op_args`."""
    if dense is not None:
        return dense
    return NF4Weight.from_op_args(packed, absmax, nested_code, nested_absmax, nested_offset, out_features,
                                  in_features, blocksize, weight_dtype)


@torch.library.custom_op("fastpeft::ia3_matmul", mutates_args=())
def _ia3_matmul_op(
    a: torch.Tensor,
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
    transpose_weight: bool,
    in_scale: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    out_scale: Optional[torch.Tensor],
    reduce_rows: Optional[torch.Tensor],
    store_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    weight = weight_from_op_args(dense, packed, absmax, nested_code, nested_absmax, nested_offset,
                                 out_features, in_features, blocksize, weight_dtype)

    def torch_path():
        return _ia3_matmul_reference(a, weight, transpose_weight, in_scale, bias, out_scale, reduce_rows, store_out)

    if backend_for(a.device) == "triton":
        from ..kernels.ia3 import ia3_matmul as kernel

        out, reduced = run_kernel("ia3_matmul", lambda: kernel(
            a, weight if dense is None else dense.to(a.dtype), transpose_weight=transpose_weight, in_scale=in_scale,
            bias=bias, out_scale=out_scale, reduce_rows=reduce_rows, store_out=store_out), torch_path)
    else:
        out, reduced = torch_path()
    # a custom op returns tensors only: empty stand-ins for the parts not asked for
    return (out if out is not None else a.new_empty(0),
            reduced if reduced is not None else a.new_empty(0, dtype=_reduction_dtype(a.dtype)))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the dispatch when it is a no-op (it costs as much as a small layer's math at M = 1)."""
    return t if t.dtype == dtype else t.to(dtype)


def _reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation, or fp64 for fp64 inputs (the reference backend's exact mode: an fp32 sum would
    lose what the caller asked fp64 for)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ia3_matmul_reference(a, weight: Weight, transpose_weight: bool, in_scale, bias, out_scale, reduce_rows,
                          store_out: bool, in_place: bool = False) -> tuple:
    """The op off the Triton backend, ``(out or None, reduced or None)``: the dequantised or dense weight
    (``reference.base_weight``) in a matmul. ``in_place``: no autograd records these ops (inference), so the bias
    and an output scale of ``z``'s dtype are applied to ``z`` in place (the same values, no temporaries; the scale
    only without ``reduce_rows``, which reads ``z`` unscaled)."""
    w = reference.base_weight(weight, a.dtype, scratch=True)  # consumed here: the thread's reusable buffer
    scaled = a if in_scale is None else _cast(a * in_scale, a.dtype)
    z = scaled @ w if transpose_weight else F.linear(scaled, w)
    if bias is not None:
        z = z.add_(bias) if in_place else z + bias
    if not store_out:
        out = None
    elif out_scale is None:
        out = z
    elif in_place and reduce_rows is None and out_scale.dtype == z.dtype:
        out = z.mul_(out_scale)
    else:
        out = _cast(z * out_scale, a.dtype)
    if reduce_rows is None:
        return out, None
    acc = _reduction_dtype(a.dtype)
    return out, (reduce_rows.to(acc) * z.to(acc)).sum(0)


@_ia3_matmul_op.register_fake
def _(a, dense, packed, absmax, nested_code, nested_absmax, nested_offset, out_features, in_features, blocksize,
      weight_dtype, transpose_weight, in_scale, bias, out_scale, reduce_rows, store_out):
    n = in_features if transpose_weight else out_features
    out = a.new_empty((a.shape[0], n)) if store_out else a.new_empty(0)
    reduced = a.new_empty(n if reduce_rows is not None else 0, dtype=_reduction_dtype(a.dtype))
    return out, reduced


def ia3_matmul(
    a: torch.Tensor,
    weight: Weight,
    *,
    transpose_weight: bool = False,
    in_scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_scale: Optional[torch.Tensor] = None,
    reduce_rows: Optional[torch.Tensor] = None,
    store_out: bool = True,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(out_scale ⊙ z, Σ_m reduce_rows ⊙ z)`` with ``z = (a ⊙ in_scale) · op(W) + bias``; see
    ``fastpeft.kernels.ia3.ia3_matmul`` for shapes. ``out`` is None unless ``store_out``, the reduction
    (fp32; fp64 for fp64 ``a``) None unless ``reduce_rows``. No autograd (``ia3_linear`` differentiates through it)."""
    if not isinstance(weight, (torch.Tensor, NF4Weight)):
        raise TypeError(f"weight must be a 2-D tensor or an NF4Weight, got {type(weight).__name__}")
    if backend_for(a.device) == "reference" and not torch.compiler.is_compiling():
        # eager, off the Triton backend: no custom-op dispatch (more than a small layer's matmul at M = 1);
        # the op is what torch.compile traces
        return _ia3_matmul_reference(a, weight, transpose_weight, in_scale, bias, out_scale, reduce_rows, store_out)
    out, reduced = _ia3_matmul_op(a, *weight_op_args(weight), transpose_weight, in_scale, bias, out_scale,
                                  reduce_rows, store_out)
    return (out if store_out else None), (reduced if reduce_rows is not None else None)


def _ia3_forward(x2d, weight: Weight, bias, ia3_scale, is_feedforward: bool) -> torch.Tensor:
    """The forward on 2-D ``x2d`` ``(M, in)``: ``(M, out)``."""
    if is_feedforward:
        return ia3_matmul(x2d, weight, in_scale=ia3_scale, bias=bias)[0]
    return ia3_matmul(x2d, weight, bias=bias, out_scale=ia3_scale)[0]


class IA3LinearFunction(torch.autograd.Function):
    """IA3 over a frozen base on 2-D ``x2d`` ``(M, in)``, returning ``(M, out)``; see the module docstring.
    ``x`` and ``bias`` share one dtype (``ia3_linear`` casts them and reshapes outside, so the output can be
    changed in place); ``ia3_scale`` keeps its own."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, ia3_scale, is_feedforward):
        base_out = None  # z = x Wᵀ + b of the output scaling, kept for dl off the Triton backend
        if not is_feedforward and ctx.needs_input_grad[3] and backend_for(x2d.device) == "reference":
            base_out = ia3_matmul(x2d, weight, bias=bias)[0]
            y = _cast(base_out * ia3_scale, x2d.dtype)  # _ia3_matmul_reference's out_scale arithmetic
        else:
            y = _ia3_forward(x2d, weight, bias, ia3_scale, is_feedforward)
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
        if ctx.is_feedforward:
            if needs_dx or needs_scale:
                dx, dscale = ia3_matmul(dy, weight, transpose_weight=True, out_scale=ia3_scale,
                                        reduce_rows=x2d if needs_scale else None, store_out=needs_dx)
            if needs_bias:
                dbias = dy.sum(0)
        else:
            if needs_dx:
                dx, _ = ia3_matmul(dy, weight, transpose_weight=True, in_scale=ia3_scale)
            if needs_scale and base_out is not None:
                acc = _reduction_dtype(dy.dtype)
                dscale = (dy.to(acc) * base_out.to(acc)).sum(0)
            elif needs_scale:
                _, dscale = ia3_matmul(x2d, weight, bias=bias, reduce_rows=dy, store_out=False)
            if needs_bias:
                dbias = (dy * ia3_scale).sum(0)
        if dscale is not None:
            dscale = dscale.to(ia3_scale.dtype)
        return dx, None, dbias, dscale, None


class IA3Plan(NamedTuple):
    """What :func:`ia3_linear` runs for one call, decided by :func:`ia3_plan` after every check of its inputs."""

    out_features: int
    in_features: int
    plain: bool  # eager plain-PyTorch forward (autograd differentiates it); else the custom op or IA3LinearFunction
    differentiable: bool  # autograd records the call (then IA3LinearFunction where not ``plain``)


def ia3_plan(x: torch.Tensor, weight: Weight, bias: Optional[torch.Tensor], ia3_scale: torch.Tensor,
             is_feedforward: bool) -> IA3Plan:
    """Check :func:`ia3_linear`'s inputs (raising ``ValueError`` / ``TypeError`` on a bad one) and decide what runs
    (autocast is the caller's: ``ia3_linear`` handles it before planning).

    The plan depends on ``x``'s shape, dtype, device and ``requires_grad``, the grad mode, ``FASTPEFT_BACKEND``,
    ``torch.compile`` tracing, the weight object (its kind, shape, device and ``requires_grad``), the bias (present,
    shape, ``requires_grad``), ``ia3_scale``'s shape and ``requires_grad`` and ``is_feedforward`` — on no tensor's
    values: a caller may run :func:`ia3_apply` with it again while all of these are unchanged (``IA3Linear`` does)."""
    out_features, in_features = check_linear_inputs("ia3_linear", x, weight, bias)
    check_vector("ia3_scale", ia3_scale, (in_features if is_feedforward else out_features,), x.device,
                 f" for is_feedforward={is_feedforward}")
    differentiable = torch.is_grad_enabled() and (x.requires_grad or ia3_scale.requires_grad
                                                  or (bias is not None and bias.requires_grad))
    # eager, off the Triton backend, with nothing to differentiate or a dense base: the plain PyTorch forward,
    # without the custom op's dispatch or the autograd Function's per-call Python (each more than the layer's math
    # at M = 1 on CPU). Over a dense base autograd differentiates it, keeping what PEFT's layer keeps
    # (z = x Wᵀ + b for dl, the weight itself, no copy); over an NF4 base the Function runs, as autograd would store
    # the dequantised weight.
    plain = (backend_for(x.device) == "reference" and not torch.compiler.is_compiling()
             and not (differentiable and isinstance(weight, NF4Weight)))
    return IA3Plan(out_features, in_features, plain, differentiable)


def ia3_apply(plan: IA3Plan, x: torch.Tensor, weight: Weight, bias: Optional[torch.Tensor], ia3_scale: torch.Tensor,
              is_feedforward: bool) -> torch.Tensor:
    """:func:`ia3_linear` of inputs ``plan`` was made for (:func:`ia3_plan`), without checking them again.

    A plain plan over a dense base runs PEFT's IA3 forward op for op (:func:`peft_ia3_ops`, the weight and bias in
    ``x``'s dtype), which autograd differentiates as it does PEFT's; without autograd an output scale of ``z``'s dtype
    multiplies ``z`` in place."""
    out_features, in_features, plain, differentiable = plan
    if bias is not None:
        bias = _cast(bias, x.dtype)
    if plain and not isinstance(weight, NF4Weight):
        return peft_ia3_ops(x, _cast(weight, x.dtype), bias, ia3_scale, is_feedforward, in_place=not differentiable)
    x2d = as_rows(x, in_features)
    if not ia3_scale.is_contiguous():
        ia3_scale = ia3_scale.contiguous()
    if plain:
        scales = (ia3_scale, None) if is_feedforward else (None, ia3_scale)
        y = _ia3_matmul_reference(x2d, weight, False, scales[0], bias, scales[1], None, True,
                                  in_place=not differentiable)[0]
    elif not differentiable:
        y = _ia3_forward(x2d, weight, bias, ia3_scale, is_feedforward)
    else:
        y = IA3LinearFunction.apply(x2d, weight, bias, ia3_scale, is_feedforward)
    return rows_like(y, x, out_features)


def peft_ia3_ops(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ia3_scale: torch.Tensor,
                 is_feedforward: bool, in_place: bool = False) -> torch.Tensor:
    """PEFT's IA3 forward op for op over a dense ``weight`` (and ``bias``) of ``x``'s dtype, without checks: ``x ⊙ l``
    in the promoted dtype and back, then the matmul with the bias inside; or the matmul, then ``⊙ l`` in the promoted
    dtype and back to the matmul's. Under autocast the matmul casts as PEFT's base ``nn.Linear`` does. ``in_place``
    (nothing to differentiate): an output scale of ``z``'s dtype multiplies ``z`` in place."""
    if is_feedforward:
        return F.linear(_cast(x * ia3_scale, x.dtype), weight, bias)
    z = F.linear(x, weight, bias)
    if in_place and ia3_scale.dtype == z.dtype:
        return z.mul_(ia3_scale)
    return _cast(z * ia3_scale, z.dtype)


def ia3_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: Optional[torch.Tensor],
    ia3_scale: torch.Tensor,
    is_feedforward: bool,
) -> torch.Tensor:
    """IA3 ``(x ⊙ l) Wᵀ + b`` (feed-forward) or ``(x Wᵀ + b) ⊙ l`` as ``(..., out)`` in ``x.dtype``; see the
    module docstring."""
    cast_to = autocast_dtype(x)
    if cast_to is not None and not isinstance(weight, NF4Weight):
        # PEFT's IA3 under autocast: the base nn.Linear runs in the autocast dtype; a feed-forward layer's
        # input x ⊙ l is formed first (in the promoted dtype, back to x's) and cast by autocast
        with torch.autocast(x.device.type, enabled=False):
            if is_feedforward:
                scaled = (x * ia3_scale).to(x.dtype).to(cast_to)
                return lora_linear(scaled, weight.to(cast_to), None if bias is None else bias.to(cast_to),
                                   None, None, 0.0)
            return ia3_linear(x.to(cast_to), weight.to(cast_to), None if bias is None else bias.to(cast_to),
                              ia3_scale, False)
    is_feedforward = bool(is_feedforward)
    return ia3_apply(ia3_plan(x, weight, bias, ia3_scale, is_feedforward), x, weight, bias, ia3_scale, is_feedforward)
