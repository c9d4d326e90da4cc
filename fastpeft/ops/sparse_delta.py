"""DiffPruning's served layer as ops: ``y = x Wᵀ + b + x δᵀ`` with a stored sparse ``δ``
(:class:`~fastpeft.sparse_delta.SparseDelta`) over a frozen dense or NF4 base.

Public API:

- ``sparse_delta_add_(y, x, delta)``: ``y += x δᵀ`` in place for 2-D ``x`` ``(M, in)``, ``y`` ``(M, out)`` (one
  dtype), the primitive (``fastpeft::sparse_delta_add_``, a ``torch.library`` custom op; the Triton kernel of
  ``fastpeft.kernels.sparse_delta`` on CUDA, torch's CSR matmul elsewhere). No autograd.
  ``sparse_delta_add_(y, x, bank, row_ids)``: a mixed batch, row ``m`` with delta ``row_ids[m]`` of a
  :class:`~fastpeft.sparse_delta.SparseDeltaBank` (``-1``: none; ``fastpeft::sparse_delta_bank_add_``; off CUDA
  each delta the batch names runs the CSR product over its own rows).
- ``sparse_delta_linear(x, weight, bias, delta)``: the layer, ``(..., out)`` in ``x.dtype``, the semantics of
  ``fastpeft.reference.sparse_delta_linear`` with ``δ = delta.to_dense()``. Differentiable in ``x``, ``bias``
  and ``delta.values`` (a trainable values tensor, e.g. from ``delta.with_values(param)``, gets its gradient);
  the base and the pattern are frozen.

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

from ..nf4 import NF4Weight
from ..sparse_delta import SparseDelta, SparseDeltaBank
from .compile_compat import fresh_output_when_compiling
from .dispatch import backend_for, run_kernel
from .inputs import Weight, as_rows, autocast_dtype, check_linear_inputs, rows_like
from .fused_linear import fused_linear

_ADD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# what the Triton kernels take; fp64 (the tests' oracle dtype) runs torch's CSR products on any device
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _term_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the sparse term accumulates in: fp64 where any operand is fp64, else fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _csr(delta: SparseDelta, values: torch.Tensor) -> torch.Tensor:
    """``delta``'s pattern with ``values`` as a torch CSR tensor (torch's CSR takes one index dtype: int64)."""
    # the pattern is validated once (SparseDelta.validate), not at every product
    return torch.sparse_csr_tensor(delta.row_ptr, delta.col_idx_int64, values, delta.shape, check_invariants=False)


def _torch_add_(y: torch.Tensor, x: torch.Tensor, delta: SparseDelta) -> None:
    """``y += x δᵀ`` by torch's CSR matmul in the term dtype, one rounding into ``y``."""
    if delta.nnz == 0 or x.shape[0] == 0:
        return
    term_dtype = _term_dtype(x.dtype, delta.dtype)
    csr = _csr(delta, delta.values.detach().to(term_dtype))
    x_t = x.t() if x.dtype == term_dtype else x.t().to(term_dtype)
    # the product as (out, M), then added: MKL's CSR product accumulating into a transposed view of y instead
    # (``y.t().addmm_``) runs 2-4x slower (CPU, 2048x2048, M = 16 / 256)
    term = (csr @ x_t).t()
    if y.dtype == term_dtype:
        y.add_(term)
    else:
        y.copy_(term.add_(y))


@torch.library.custom_op("fastpeft::sparse_delta_add_", mutates_args=("y",))
def _sparse_delta_add_op(y: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                         values: torch.Tensor, in_features: int) -> None:
    def torch_path():
        _torch_add_(y, x, SparseDelta(row_ptr, col_idx, values, (y.shape[1], in_features)))

    if backend_for(x.device) == "triton" and x.dtype in _KERNEL_DTYPES and values.dtype in _KERNEL_DTYPES:
        from ..kernels.sparse_delta import sparse_delta_add_ as kernel

        run_kernel("sparse_delta_add_", lambda: kernel(y, x, row_ptr, col_idx, values, in_features), torch_path)
        return
    torch_path()


@_sparse_delta_add_op.register_fake
def _(y, x, row_ptr, col_idx, values, in_features):
    return None


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
    if backend_for(x.device) == "reference" and not torch.compiler.is_compiling():
        # eager, off the Triton backend: the delta's cached int64 columns, no custom-op dispatch
        _torch_add_(y, x, delta)
        return y
    _sparse_delta_add_op(y, x, delta.row_ptr, delta.col_idx, delta.values.detach(), delta.shape[1])
    return y


def _torch_bank_add_(y: torch.Tensor, x: torch.Tensor, bank: SparseDeltaBank, row_ids: torch.Tensor) -> None:
    """The bank's update by torch's CSR products: per delta the batch names, over that delta's rows."""
    for k in torch.unique(row_ids[row_ids >= 0]).tolist():
        delta = bank.delta(k)
        rows = (row_ids == k).nonzero().squeeze(1)
        if rows.numel() == x.shape[0]:
            _torch_add_(y, x, delta)
            continue
        part = y.index_select(0, rows)
        _torch_add_(part, x.index_select(0, rows), delta)
        y.index_copy_(0, rows, part)


@torch.library.custom_op("fastpeft::sparse_delta_bank_add_", mutates_args=("y",))
def _sparse_delta_bank_add_op(y: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                              values: torch.Tensor, row_ids: torch.Tensor, in_features: int) -> None:
    def torch_path():
        offsets = (*row_ptr[:, 0].tolist(), col_idx.numel())
        _torch_bank_add_(y, x, SparseDeltaBank(row_ptr, col_idx, values, (y.shape[1], in_features), offsets), row_ids)

    if backend_for(x.device) == "triton" and x.dtype in _KERNEL_DTYPES and values.dtype in _KERNEL_DTYPES:
        from ..kernels.sparse_delta import sparse_delta_bank_add_ as kernel

        run_kernel("sparse_delta_bank_add_", lambda: kernel(y, x, row_ptr, col_idx, values, row_ids, in_features),
                   torch_path)
        return
    torch_path()


@_sparse_delta_bank_add_op.register_fake
def _(y, x, row_ptr, col_idx, values, row_ids, in_features):
    return None


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
    if backend_for(x.device) == "reference" and not torch.compiler.is_compiling():
        _torch_bank_add_(y, x, bank, row_ids)
        return y
    _sparse_delta_bank_add_op(y, x, bank.row_ptr, bank.col_idx, bank.values, row_ids.to(torch.int32).contiguous(),
                              bank.shape[1])
    return y


def _sampled_product(dy: torch.Tensor, x: torch.Tensor, delta: SparseDelta) -> torch.Tensor:
    """``(nnz,)`` with entry ``j`` = ``Σ_m dy[m, row(j)] · x[m, col(j)]`` (``dyᵀ x`` at ``delta``'s pattern), in the
    values' dtype, accumulated in the term dtype."""
    term_dtype = _term_dtype(dy.dtype, x.dtype, delta.dtype)
    if delta.nnz == 0 or dy.shape[0] == 0:
        return delta.values.new_zeros(delta.nnz)
    pattern = _csr(delta, torch.zeros(delta.nnz, dtype=term_dtype, device=delta.device))
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
        ctx.save_for_backward(None if isinstance(weight, NF4Weight) else weight,
                              x2d if ctx.needs_input_grad[3] else None)
        return _forward(x2d, weight, bias, delta)

    @staticmethod
    def backward(ctx, dy):
        dense_weight, x_saved = ctx.saved_tensors
        weight = ctx.weight if ctx.weight is not None else dense_weight
        delta = ctx.delta
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
