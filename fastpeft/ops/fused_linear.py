"""The fused linear primitive (``fastpeft::fused_linear``): one product over a dense or NF4 weight with the
epilogues the adapter layers need,

    z       = (a ⊙ in_scale) · op(W) + s · lora_h · lora_expand   (+ bias when scale_bias)
    out     = col_scale ⊙ z                                        (+ bias when not scale_bias)
    reduced = Σ_m reduce_rows ⊙ z

(``op(W)`` is ``Wᵀ``, or ``W`` with ``transpose_weight``). LoRA / QLoRA use the LoRA term (forward and ``dx``), IA3
the scales and the row reduction (its ``dl``), DoRA all of them. No autograd: the layers' autograd Functions
differentiate through it.

CPU kernel: ``fastpeft.reference.fused_linear``. CUDA kernel, picked by the arguments: ``scale_bias`` or an input
scale, a row reduction or no stored output without a LoRA term: the IA3 kernel (``fastpeft.kernels.ia3.ia3_matmul``,
dense or NF4); an NF4 weight otherwise: the NF4 kernel with the LoRA epilogue
(``fastpeft.kernels.nf4_matmul.nf4_lora_matmul``); a dense weight otherwise: cuBLAS (``F.linear`` / ``addmm``, the
LoRA term by ``addmm_(alpha=s)``: the reference's own torch ops, which are the CUDA path for a dense product). Eager
calls that take that path, and every eager call on the reference backend, run ``fastpeft.reference.fused_linear``
directly (``fastpeft.ops.dispatch.eager_reference``); the op is what ``torch.compile`` traces.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..nf4 import WEIGHT_OP_SCHEMA, NF4Weight, weight_from_op_args, weight_op_args
from .dispatch import eager_reference, register_primitive
from .inputs import Weight

_OUT_DTYPES = (None, torch.float32)


def _route(weight: Weight, a_dtype: torch.dtype, in_scale, bias, scale_bias: bool, lora_h, col_scale, reduce_rows,
           store_out: bool, out_dtype) -> str:
    """Which CUDA implementation these arguments take (see the module docstring): ``"ia3"``, ``"nf4"``, ``"mm_fp32"``
    (a bare dense product with its fp32 accumulator kept) or ``"torch"`` (the reference's torch ops: cuBLAS)."""
    is_nf4 = isinstance(weight, NF4Weight)
    wide_out = out_dtype is not None and out_dtype != a_dtype
    ia3_form = scale_bias or in_scale is not None or reduce_rows is not None or not store_out
    if ia3_form and lora_h is None and not wide_out and not (bias is not None and col_scale is not None
                                                             and not scale_bias):
        return "ia3"
    if is_nf4 and not ia3_form:
        return "nf4"
    if not is_nf4 and wide_out and not ia3_form and lora_h is None and col_scale is None and bias is None:
        return "mm_fp32"
    return "torch"


def _launch(a, weight: Weight, transpose_weight, in_scale, bias, scale_bias, lora_h, lora_expand, scaling, col_scale,
            reduce_rows, store_out, out_dtype) -> tuple:
    """The CUDA kernel (and the Triton backend's): the launcher :func:`_route` picks."""
    route = _route(weight, a.dtype, in_scale, bias, scale_bias, lora_h, col_scale, reduce_rows, store_out, out_dtype)
    if route == "ia3":
        from ..kernels.ia3 import ia3_matmul

        dense_or_nf4 = weight if isinstance(weight, NF4Weight) or weight.dtype == a.dtype else weight.to(a.dtype)
        return ia3_matmul(a, dense_or_nf4, transpose_weight=transpose_weight, in_scale=in_scale, bias=bias,
                          out_scale=col_scale, reduce_rows=reduce_rows, store_out=store_out)
    if route == "nf4":
        from ..kernels.nf4_matmul import nf4_lora_matmul

        n = weight.in_features if transpose_weight else weight.out_features
        wide_out = out_dtype is not None and out_dtype != a.dtype
        out = torch.empty((a.shape[0], n), dtype=out_dtype, device=a.device) if wide_out else None
        return nf4_lora_matmul(a, weight, transpose_weight=transpose_weight, bias=bias, lora_h=lora_h,
                               lora_expand=lora_expand, scaling=scaling, col_scale=col_scale, out=out), None
    if route == "mm_fp32":
        from ..kernels.nf4_matmul import mm_fp32

        # bf16 / fp16 tensor cores with fp32 output, no fp32 copy of W
        w = weight if weight.dtype == a.dtype else weight.to(a.dtype)
        return mm_fp32(a, w if transpose_weight else w.t()), None
    return reference.fused_linear(a, weight, transpose_weight, in_scale, bias, scale_bias, lora_h, lora_expand,
                                  scaling, col_scale, reduce_rows, store_out, out_dtype)


def _from_op_args(a, *args) -> tuple:
    return (a, weight_from_op_args(*args[:10]), *args[10:])


def _to_op_result(result: tuple, args: tuple) -> tuple:
    """The op's two tensors: empty stand-ins for the parts not asked for (a custom op returns tensors only)."""
    out, reduced = result
    a = args[0]
    return (out if out is not None else a.new_empty(0),
            reduced if reduced is not None else a.new_empty(0, dtype=reference.reduction_dtype(a.dtype)))


def _fake(a, dense, packed, absmax, nested_code, nested_absmax, nested_offset, out_features, in_features, blocksize,
          weight_dtype, transpose_weight, in_scale, bias, scale_bias, lora_h, lora_expand, scaling, col_scale,
          reduce_rows, store_out, out_dtype):
    n = in_features if transpose_weight else out_features
    out = a.new_empty((a.shape[0], n), dtype=out_dtype or a.dtype) if store_out else a.new_empty(0)
    reduced = a.new_empty(n if reduce_rows is not None else 0, dtype=reference.reduction_dtype(a.dtype))
    return out, reduced


_fused_linear_op = register_primitive(
    "fused_linear",
    f"(Tensor a, {WEIGHT_OP_SCHEMA}, bool transpose_weight, Tensor? in_scale, Tensor? bias, bool scale_bias, "
    "Tensor? lora_h, Tensor? lora_expand, float scaling, Tensor? col_scale, Tensor? reduce_rows, bool store_out, "
    "ScalarType? out_dtype) -> (Tensor, Tensor)",
    _fake, _launch, reference.fused_linear, _from_op_args, _to_op_result)


# the arguments of fastpeft.reference.fused_linear (keyword-only here): the op's CPU kernel takes them as they are
def fused_linear(
    a: torch.Tensor,
    weight: Weight,
    *,
    transpose_weight: bool = False,
    in_scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    scale_bias: bool = False,
    lora_h: Optional[torch.Tensor] = None,
    lora_expand: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    col_scale: Optional[torch.Tensor] = None,
    reduce_rows: Optional[torch.Tensor] = None,
    store_out: bool = True,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(out, reduced)`` of the module docstring's math; shapes, dtypes and roundings as
    ``fastpeft.reference.fused_linear``.

    ``a`` 2-D ``(M, K)``; ``weight`` a dense ``(out, in)`` tensor or an :class:`~fastpeft.nf4.NF4Weight`;
    ``in_scale`` ``(K,)``; ``bias`` (``a``'s dtype) and ``col_scale`` ``(N,)``; ``lora_h`` ``(M, r)`` and
    ``lora_expand`` ``(r, N)`` of one dtype, given together; ``reduce_rows`` ``(M, N)``. ``out`` ``(M, N)`` in
    ``a.dtype`` (``out_dtype=torch.float32``: the accumulator unrounded), None unless ``store_out``; ``reduced``
    ``(N,)`` fp32 (fp64 for fp64 ``a``), None without ``reduce_rows``. The launchers check every shape, dtype,
    device and stride they need before launching."""
    if not isinstance(weight, (torch.Tensor, NF4Weight)):
        raise TypeError(f"weight must be a 2-D tensor or an NF4Weight, got {type(weight).__name__}")
    if (lora_h is None) != (lora_expand is None):
        raise ValueError("lora_h and lora_expand must be given together")
    if not store_out and reduce_rows is None:
        raise ValueError("nothing to compute: store_out=False and no reduce_rows")
    if out_dtype not in _OUT_DTYPES and out_dtype != a.dtype:
        raise TypeError(f"out_dtype must be a's dtype {a.dtype} or torch.float32, got {out_dtype}")
    torch_route = not isinstance(weight, NF4Weight) and _route(
        weight, a.dtype, in_scale, bias, scale_bias, lora_h, col_scale, reduce_rows, store_out, out_dtype) == "torch"
    if eager_reference(a.device, torch_route):
        return reference.fused_linear(a, weight, transpose_weight, in_scale, bias, scale_bias, lora_h, lora_expand,
                                      float(scaling), col_scale, reduce_rows, store_out, out_dtype)
    out, reduced = _fused_linear_op(a, *weight_op_args(weight), transpose_weight, in_scale, bias, scale_bias, lora_h,
                                    lora_expand, float(scaling), col_scale, reduce_rows, store_out, out_dtype)
    return (out if store_out else None), (reduced if reduce_rows is not None else None)
