"""DiffPruning's served layer as ops: ``y = x Wᵀ + b + x δᵀ`` with a stored sparse ``δ``
(:class:`~fastpeft.sparse_delta.SparseDelta`) over a frozen dense or NF4 base.

Public API:

- ``sparse_delta_add_(y, x, delta)``: ``y += x δᵀ`` in place for 2-D ``x`` ``(M, in)``, ``y`` ``(M, out)`` (one
  dtype), the primitive ``fastpeft::sparse_delta_add_``. No autograd.
  ``sparse_delta_add_(y, x, bank, row_ids)``: a mixed batch, row ``m`` with delta ``row_ids[m]`` of a
  :class:`~fastpeft.sparse_delta.SparseDeltaBank` (``-1``: none), the primitive ``fastpeft::sparse_delta_bank_add_``.
- ``sparse_delta_linear(x, weight, bias, delta)``: the layer, ``(..., out)`` in ``x.dtype``, the semantics of
  ``fastpeft.reference.sparse_delta_linear`` with ``δ = delta.to_dense()``. Differentiable in ``x``, ``bias``
  and ``delta.values`` (a trainable values tensor, e.g. from ``delta.with_values(param)``, gets its gradient);
  the base and the pattern are frozen.

Both primitives are declared once (:func:`fastpeft.ops.dispatch.register_primitive`): the CUDA kernel is the Triton
launcher of ``fastpeft.kernels.sparse_delta``, the CPU kernel the ``fastpeft.reference`` function of the same name
(torch's CSR matmul; for the bank, per delta the batch names over its own rows). fp64 operands, which the Triton
kernels do not take, run the reference on any device. Eager calls that run the reference call it directly
(:func:`fastpeft.ops.dispatch.eager_reference`).

Forward: the base product as the LoRA op runs it (one cuBLAS ``addmm`` on a dense base, fastpeft's NF4 matmul
on an NF4 one), then ``x δᵀ`` added into it in place. Backward: ``dx = dy W + dy δ`` (the base's transposed
product, then the same primitive over ``δᵀ``: the transposed pattern is built once per delta and cached, the
values permuted per call so that trained values are read as they are), ``dvalues[j] = Σ_m dy[m, row(j)] ·
x[m, col(j)]`` (a sampled dense-dense product at the pattern: ``torch.sparse.sampled_addmm``), ``db = Σ_m dy``.

Precision: the sparse term accumulates in fp32 (fp64 where ``x`` or the values are fp64) and is added to the
base output with one rounding into ``x``'s dtype; ``dvalues`` is formed in the same precision and returned in the
values' dtype.

CPU path, measured (CPU, one thread, ``OMP_NUM_THREADS=1``; 5632x2048, ms per call, the sparse term alone):
torch's CSR matmul (MKL, fp32) against a gather ``x[:, col] * values`` with ``index_add_`` over rows: at 0.5 %
density 0.09 vs 0.22 (M = 1), 0.40 vs 5.1 (M = 16), 21 vs 280 (M = 512); at 5 %: 0.74 vs 3.4, 1.3 vs 85,
51 vs 5037. The gather materialises ``(M, nnz)``; CSR wins everywhere. ``dy δ``: CSR of ``δᵀ`` times ``dyᵀ``
(0.44 ms at M = 16, 0.5 %) against torch's CSC (``csr.t()``, 3.7 ms) and ``dense @ csr`` (7.0 ms); ``dvalues``:
``sampled_addmm`` (0.29 ms) against the gather-and-sum (5.1 ms).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..nf4 import NF4Weight
from ..sparse_delta import SparseDelta, SparseDeltaBank
from .compile_compat import fresh_output_when_compiling
from .dispatch import eager_reference, register_primitive
from .inputs import Weight, as_rows, autocast_dtype, check_linear_inputs, rows_like
from .fused_linear import fused_linear

_ADD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# what the Triton kernels take; fp64 (the tests' oracle dtype) runs the reference's CSR products on any device
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel_takes(x: torch.Tensor, values: torch.Tensor) -> bool:
    """True when the Triton kernels take ``x`` and ``values`` (neither is fp64)."""
    return x.dtype in _KERNEL_DTYPES and values.dtype in _KERNEL_DTYPES


def _no_result(result, args) -> None:
    return None


# ------------------------------------------------------------------------------------------------ sparse_delta_add_
def _add_reference(y, x, row_ptr, col_idx, values, in_features) -> None:
    reference.sparse_delta_add_(y, x, SparseDelta(row_ptr, col_idx, values, (y.shape[1], in_features)))


def _add_launch(y, x, row_ptr, col_idx, values, in_features) -> None:
    if not _kernel_takes(x, values):
        _add_reference(y, x, row_ptr, col_idx, values, in_features)
        return
    from ..kernels.sparse_delta import sparse_delta_add_ as kernel

    kernel(y, x, row_ptr, col_idx, values, in_features)


def _fake_add(y, x, row_ptr, col_idx, values, in_features):
    return None


_add_op = register_primitive(
    "sparse_delta_add_",
    "(Tensor(a!) y, Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, SymInt in_features) -> ()",
    _fake_add, _add_launch, _add_reference, lambda *args: args, _no_result)


def _check_add(y, x, shape: tuple, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"x and y must be 2-D (M, in) and (M, out), got {tuple(getattr(x, 'shape', ()))} and "
                         f"{tuple(getattr(y, 'shape', ()))}")
    if x.dtype not in _ADD_DTYPES or y.dtype != x.dtype:
        raise TypeError(f"x and y must share one floating dtype of {_ADD_DTYPES}, got {x.dtype} and {y.dtype}")
    out_features, in_features = shape
    if x.shape[0] != y.shape[0] or x.shape[1] != in_features or y.shape[1] != out_features:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} do not fit a delta of shape {shape}")
    if not (x.device == y.device == device):
        raise ValueError(f"x ({x.device}), y ({y.device}) and the delta ({device}) must share one device")


def sparse_delta_add_(y: torch.Tensor, x: torch.Tensor, delta, row_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y += x δᵀ`` in place for ``x`` ``(M, in)``, ``y`` ``(M, out)`` (one dtype: fp32 / fp16 / bf16 / fp64, any
    strides), ``delta`` ``(out, in)`` on their device (values in any floating dtype); returns ``y``. fp32
    accumulation (fp64 with fp64 operands), one rounding into ``y``; ``y``'s entries are read and written once.

    With a :class:`~fastpeft.sparse_delta.SparseDeltaBank` as ``delta``, ``row_ids`` (integer ``(M,)`` in
    ``[-1, D)``) picks each row's delta: ``y[m] += x[m] δ_kᵀ``, ``k = row_ids[m]``, nothing for ``-1``."""
    if isinstance(delta, SparseDeltaBank):
        return _bank_add_(y, x, delta, row_ids)
    if not isinstance(delta, SparseDelta):
        raise TypeError(f"delta must be a SparseDelta or a SparseDeltaBank, got {type(delta).__name__}")
    if row_ids is not None:
        raise ValueError("row_ids pick deltas of a SparseDeltaBank; a SparseDelta applies to every row")
    _check_add(y, x, delta.shape, delta.device)
    if eager_reference(x.device, torch_route=not _kernel_takes(x, delta.values)):
        # the delta as it is (its cached int64 columns), no op dispatch
        return reference.sparse_delta_add_(y, x, delta)
    _add_op(y, x, delta.row_ptr, delta.col_idx, delta.values.detach(), delta.shape[1])
    return y


# ------------------------------------------------------------------------------------------- sparse_delta_bank_add_
def _bank_reference(y, x, row_ptr, col_idx, values, row_ids, in_features) -> None:
    offsets = (*row_ptr[:, 0].tolist(), col_idx.numel())
    reference.sparse_delta_bank_add_(
        y, x, SparseDeltaBank(row_ptr, col_idx, values, (y.shape[1], in_features), offsets), row_ids)


def _bank_launch(y, x, row_ptr, col_idx, values, row_ids, in_features) -> None:
    if not _kernel_takes(x, values):
        _bank_reference(y, x, row_ptr, col_idx, values, row_ids, in_features)
        return
    from ..kernels.sparse_delta import sparse_delta_bank_add_ as kernel

    kernel(y, x, row_ptr, col_idx, values, row_ids, in_features)


def _fake_bank_add(y, x, row_ptr, col_idx, values, row_ids, in_features):
    return None


_bank_add_op = register_primitive(
    "sparse_delta_bank_add_",
    "(Tensor(a!) y, Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, Tensor row_ids, SymInt in_features) "
    "-> ()",
    _fake_bank_add, _bank_launch, _bank_reference, lambda *args: args, _no_result)


def _bank_add_(y: torch.Tensor, x: torch.Tensor, bank: SparseDeltaBank, row_ids) -> torch.Tensor:
    _check_add(y, x, bank.shape, bank.device)
    if not isinstance(row_ids, torch.Tensor) or row_ids.dtype.is_floating_point or row_ids.dtype == torch.bool \
            or tuple(row_ids.shape) != (x.shape[0],):
        raise ValueError(f"row_ids must be an integer tensor ({x.shape[0]},), got "
                         f"{getattr(row_ids, 'dtype', type(row_ids))} {tuple(getattr(row_ids, 'shape', ()))}")
    if row_ids.device != x.device:
        raise ValueError(f"x is on {x.device}, row_ids on {row_ids.device}")
    if row_ids.numel() and (int(row_ids.min()) < -1 or int(row_ids.max()) >= bank.num_deltas):
        raise ValueError(f"delta ids must be in [-1, {bank.num_deltas - 1}], got range "
                         f"[{int(row_ids.min())}, {int(row_ids.max())}]")
    if eager_reference(x.device, torch_route=not _kernel_takes(x, bank.values)):
        return reference.sparse_delta_bank_add_(y, x, bank, row_ids)
    _bank_add_op(y, x, bank.row_ptr, bank.col_idx, bank.values, row_ids.to(torch.int32).contiguous(), bank.shape[1])
    return y


def _sampled_product(dy: torch.Tensor, x: torch.Tensor, delta: SparseDelta) -> torch.Tensor:
    """``(nnz,)`` with entry ``j`` = ``Σ_m dy[m, row(j)] · x[m, col(j)]`` (``dyᵀ x`` at ``delta``'s pattern), in the
    values' dtype, accumulated in the term dtype."""
    term_dtype = reference.sparse_term_dtype(dy.dtype, x.dtype, delta.dtype)
    if delta.nnz == 0 or dy.shape[0] == 0:
        return delta.values.new_zeros(delta.nnz)
    pattern = reference.sparse_delta_csr(delta, torch.zeros(delta.nnz, dtype=term_dtype, device=delta.device))
    sampled = torch.sparse.sampled_addmm(pattern, dy.t().to(term_dtype), x.to(term_dtype), beta=0.0)
    return sampled.values().to(delta.dtype)


def _forward(x2d: torch.Tensor, weight: Weight, bias: Optional[torch.Tensor], delta: SparseDelta) -> torch.Tensor:
    y = fused_linear(x2d, weight, bias=bias)[0]
    return sparse_delta_add_(y, x2d, delta)


@fresh_output_when_compiling
class SparseDeltaLinearFunction(torch.autograd.Function):
    """The layer on 2-D ``x2d`` ``(M, in)``, returning ``(M, out)``; ``values`` is ``delta.values`` passed as an
    argument of its own so that autograd routes its gradient; ``bias`` is in ``x2d``'s dtype or None."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, values, delta):
        ctx.weight = weight if isinstance(weight, NF4Weight) else None
        ctx.delta = delta
        # the values saved as well (dx reads them): an in-place change before backward is then an autograd error
        ctx.save_for_backward(None if isinstance(weight, NF4Weight) else weight,
                              x2d if ctx.needs_input_grad[3] else None,
                              values if ctx.needs_input_grad[0] else None)
        return _forward(x2d, weight, bias, delta)

    @staticmethod
    def backward(ctx, dy):
        dense_weight, x_saved, values = ctx.saved_tensors
        weight = ctx.weight if ctx.weight is not None else dense_weight
        delta = ctx.delta if values is None else ctx.delta.with_values(values)
        needs_dx, _, needs_bias, needs_values = ctx.needs_input_grad[:4]
        dx = dbias = dvalues = None
        if needs_dx:
            dx = fused_linear(dy, weight, transpose_weight=True)[0]
            sparse_delta_add_(dx, dy, delta.transpose())
        if needs_bias:
            dbias = dy.sum(0)
        if needs_values:
            dvalues = _sampled_product(dy, x_saved, delta)
        return dx, None, dbias, dvalues, None


def sparse_delta_linear(x: torch.Tensor, weight: Weight, bias: Optional[torch.Tensor],
                        delta: SparseDelta) -> torch.Tensor:
    """``y = x Wᵀ + b + x δᵀ`` as ``(..., out)`` in ``x.dtype`` for ``x`` ``(..., in)`` (fp32 / fp16 / bf16 / fp64,
    any strides), ``weight`` a frozen dense ``(out, in)`` tensor or an :class:`~fastpeft.nf4.NF4Weight`, ``bias``
    ``(out,)`` or None (cast to ``x``'s dtype), ``delta`` a :class:`~fastpeft.sparse_delta.SparseDelta` of the
    weight's shape on ``x``'s device (values in any floating dtype; they get a gradient when they require one).
    See the module docstring for the precision.

    Under ``torch.autocast`` (dtype ``c``) a dense base runs as an autocast ``nn.Linear`` would: ``x``, ``W`` and
    ``b`` cast to ``c``; an NF4 base keeps ``x``'s dtype (a 4-bit layer is not autocast)."""
    cast_to = autocast_dtype(x)
    if cast_to is not None:
        with torch.autocast(x.device.type, enabled=False):
            if isinstance(weight, NF4Weight):
                return sparse_delta_linear(x, weight, bias, delta)
            return sparse_delta_linear(x.to(cast_to), weight.to(cast_to),
                                       None if bias is None else bias.to(cast_to), delta)
    out_features, in_features = check_linear_inputs("sparse_delta_linear", x, weight, bias)
    if not isinstance(delta, SparseDelta):
        raise TypeError(f"delta must be a SparseDelta, got {type(delta).__name__}")
    if delta.shape != (out_features, in_features):
        raise ValueError(f"delta shape {delta.shape} != weight shape {(out_features, in_features)}")
    if delta.device != x.device:
        raise ValueError(f"x is on {x.device}, the delta on {delta.device}")
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    x2d = as_rows(x, in_features)
    values = delta.values
    if not torch.is_grad_enabled() or not (x.requires_grad or values.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        y = _forward(x2d, weight, bias, delta)
    else:
        y = SparseDeltaLinearFunction.apply(x2d, weight, bias, values, delta)
    return rows_like(y, x, out_features)
