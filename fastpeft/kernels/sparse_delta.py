"""DiffPruning's sparse delta in Triton: ``y += x δᵀ`` in place, ``δ`` ``(out, in)`` stored as CSR
(``fastpeft.sparse_delta.SparseDelta``), and the same over a bank of deltas chosen per row.

Math: ``y[m, o] += Σ_{j ∈ row o} x[m, col_j] · v_j`` (``j`` runs over ``row_ptr[o] : row_ptr[o + 1]``); fp32
accumulation, ``y`` rounded once. Rows of ``δ`` without entries are not written at all (``y`` keeps its bits
there, a ``-0.0`` included).

Where the term goes: into ``y`` after the base product, in place, not into the base GEMM's tile loop. The dense
base product is cuBLAS, which takes no epilogue; an NF4 base at prefill sizes is dequantised and handed to cuBLAS
as well (``fastpeft.kernels.nf4_dispatch``); only small ``M`` (decode to a few dozen tokens) runs fastpeft's own
NF4 kernels, whose epilogue could take the term (not done: only a GPU timing can show it pays). The price of a
separate pass is one more read and write of ``y``'s touched row blocks: ``4 · M · out`` bytes in bf16, against
the base product's ``2 · out · in`` weight bytes (decode: ``y`` is a few kB, the pass is one launch) or its
``2 · M · out · in`` FLOPs (prefill, M = 2048 on 2048x5632: 46 MB of ``y`` traffic beside 47 GFLOP). The delta
itself is small: at 0.5 % density its CSR bytes (4-byte column + 2-byte bf16 value per entry, 8 bytes per row)
are ~1/60 of a bf16 ``W``'s at ``in = 2048``.

Tile: one program takes ``BLOCK_O`` consecutive output rows and ``BLOCK_M`` tokens. The entries of those rows
are contiguous in CSR (``row_ptr[o0] : row_ptr[o0 + BLOCK_O]``), so the program walks them ``BLOCK_J`` at a time
whatever their split across rows (no per-row loop, no load imbalance inside the block): it loads the entries'
columns and values once for all ``BLOCK_M`` tokens, gathers ``x[m, col_j]`` as a ``(BLOCK_M, BLOCK_J)`` tile and
multiplies it by the ``(BLOCK_J, BLOCK_O)`` scatter matrix ``S[j, o] = v_j`` where entry ``j`` belongs to row
``o0 + o`` (from the block's ``row_ptr`` slice: two compares, no row array stored), 0 elsewhere. Each ``S`` column
holds one row's entries, so the product is exactly the rows' sparse dot products, accumulated in fp32; with
``tl.dot`` (``BLOCK_M >= 16``) it runs on tensor cores, the ``BLOCK_O``-fold multiply by zeros costing
``BLOCK_O · 2 · M · nnz`` MMA FLOPs: at 0.5 % density and ``BLOCK_O = 16`` 8 % of the dense base GEMM's. At 5 %
density that share is 80 %, still a fraction of the base product (which it follows), never a second dense GEMM's
memory traffic. Decode (``M = 1``) multiplies and sums in registers instead (``tl.dot`` needs 16 rows). Values in
another dtype than ``x`` (fp32 trained values beside bf16 activations) multiply in IEEE fp32 (``FP32_DOT``: on
CUDA cores, no tensor-core instruction in the static check), so the values are never rounded to ``x``'s dtype.
``y``'s ``(BLOCK_M, BLOCK_O)`` tile is read and written once, contiguous along ``o``.

The gather is the irregular part: ``x[m, col_j]`` for scattered columns. Row-major ``x`` puts the ``BLOCK_M``
tokens of one column ``in`` elements apart (a 32-byte sector per 2-byte element); the launcher therefore hands
the kernel a column-major copy of ``x`` when a tile has more than one token (prefill), so that each entry's
``BLOCK_M`` tokens are one contiguous read (64 bf16 = 128 bytes), and every entry of the row block reuses the
copy. The copy costs one pass over ``x`` (``4 · M · in`` bytes, less than ``y``'s); a column-major ``x`` is used
as it is. At decode ``x`` is a single row that stays in L1.

Limits: a row block with many more entries than the others runs longer (no splitting of a block's entries
across programs: that would need fp32 atomics into a scratch buffer); the grid's token axis holds at most
65535 blocks (``BLOCK_M · 65535`` tokens, checked). Offsets are int64 (``row_ptr`` is int64; columns and tokens
are widened before they multiply a stride).

Bank (several deltas in one batch, ``sparse_delta_bank_add_``): the deltas of one layer concatenated, each row
``m`` of the batch naming its delta (``-1``: none). A program takes one token and ``BLOCK_O`` rows of that token's
delta: the decode tile above, its row block's ``row_ptr`` slice read at the delta's offset into the bank. Mixed
batches are decode-shaped (one token per sequence) or short; a token's delta is read by its own program
(from L2 when several tokens share it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_lora import mma
from .plan import LaunchPlan, config_for, device_arch, launch

# Tile per GPU architecture and regime: decode (M = 1, one token per program, no tl.dot), small (M < 64: 16
# tokens, the smallest tl.dot), prefill (64 tokens: sm_90's wgmma M). BLOCK_O = 16 is tl.dot's smallest N (the
# scatter matrix's width is the wasted MMA work, so the smallest); BLOCK_J = 32 entries per step. Source: untuned
# (no GPU); registers / spills / occupancy from python -m fastpeft.check_kernels --family sparse_delta.
CONFIGS = {"default": {
    "decode": {"BLOCK_M": 1, "BLOCK_O": 32, "BLOCK_J": 32, "num_warps": 2, "num_stages": 2},
    "small": {"BLOCK_M": 16, "BLOCK_O": 16, "BLOCK_J": 32, "num_warps": 4, "num_stages": 2},
    "prefill": {"BLOCK_M": 64, "BLOCK_O": 16, "BLOCK_J": 32, "num_warps": 4, "num_stages": 2},
}}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_GRID_Y = 65535


@triton.jit
def _row_block_term(acc, x_ptr, row_ptr_ptr, col_idx_ptr, values_ptr, offs_m, m_mask, o_start, out_features,
                    stride_xm, stride_xk, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr, USE_DOT: tl.constexpr,
                    FP32_DOT: tl.constexpr):
    """``acc + x[offs_m] δ[o_start : o_start + BLOCK_O]ᵀ`` (fp32 ``(BLOCK_M, BLOCK_O)``), the block's row offsets
    and the mask of its rows that have entries. ``row_ptr_ptr`` points at the delta's ``out + 1`` row pointers
    (absolute positions in ``col_idx`` / ``values``)."""
    offs_o = o_start + tl.arange(0, BLOCK_O)
    o_mask = offs_o < out_features
    # rows past the end read as empty (start = end = 0): no entry matches them
    row_start = tl.load(row_ptr_ptr + offs_o, mask=o_mask, other=0)
    row_end = tl.load(row_ptr_ptr + offs_o + 1, mask=o_mask, other=0)
    # the block's entries, contiguous in CSR: from its first row's start to its last row's end
    seg_start = tl.load(row_ptr_ptr + o_start)
    seg_end = tl.load(row_ptr_ptr + tl.minimum(o_start + BLOCK_O, out_features))
    offs_m64 = offs_m.to(tl.int64)
    for j_start in range(seg_start, seg_end, BLOCK_J):
        offs_j = j_start + tl.arange(0, BLOCK_J)
        j_mask = offs_j < seg_end
        cols = tl.load(col_idx_ptr + offs_j, mask=j_mask, other=0).to(tl.int64)
        vals = tl.load(values_ptr + offs_j, mask=j_mask, other=0.0)
        xg = tl.load(x_ptr + offs_m64[:, None] * stride_xm + cols[None, :] * stride_xk,
                     mask=m_mask[:, None] & j_mask[None, :], other=0.0)
        # S[j, o] = v_j where entry j lies in row o's range
        hit = (offs_j[:, None] >= row_start[None, :]) & (offs_j[:, None] < row_end[None, :])
        if FP32_DOT:
            scatter = tl.where(hit, vals.to(tl.float32)[:, None], 0.0)
        else:
            scatter = tl.where(hit, vals[:, None], 0.0).to(x_ptr.dtype.element_ty)
        acc = mma(acc, xg, scatter, USE_DOT)
    return acc, offs_o, o_mask & (row_end > row_start)


@triton.jit
def _add_rows(y_ptr, acc, offs_m, m_mask, offs_o, touched, stride_ym, stride_yo):
    """``y[offs_m, offs_o] += acc`` (one rounding) on the rows ``touched`` (those with entries)."""
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_o[None, :] * stride_yo
    mask = m_mask[:, None] & touched[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sparse_delta_add_kernel(
    y_ptr, x_ptr, row_ptr_ptr, col_idx_ptr, values_ptr,
    stride_ym, stride_yo, stride_xm, stride_xk,
    num_tokens, out_features,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr, USE_DOT: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    o_start = tl.program_id(0) * BLOCK_O
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < num_tokens
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    acc, offs_o, touched = _row_block_term(acc, x_ptr, row_ptr_ptr, col_idx_ptr, values_ptr, offs_m, m_mask, o_start,
                                           out_features, stride_xm, stride_xk, BLOCK_O, BLOCK_J, USE_DOT, FP32_DOT)
    _add_rows(y_ptr, acc, offs_m, m_mask, offs_o, touched, stride_ym, stride_yo)


@triton.jit
def _sparse_delta_bank_add_kernel(
    y_ptr, x_ptr, row_ptr_ptr, col_idx_ptr, values_ptr, ids_ptr,
    stride_ym, stride_yo, stride_xm, stride_xk,
    out_features,
    BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr, FP32_DOT: tl.constexpr,
):
    token = tl.program_id(0)
    delta = tl.load(ids_ptr + token).to(tl.int64)
    if delta < 0:
        return
    o_start = tl.program_id(1) * BLOCK_O
    offs_m = token + tl.arange(0, 1)
    m_mask = offs_m >= 0
    acc = tl.zeros((1, BLOCK_O), dtype=tl.float32)
    acc, offs_o, touched = _row_block_term(acc, x_ptr, row_ptr_ptr + delta * (out_features + 1), col_idx_ptr,
                                           values_ptr, offs_m, m_mask, o_start, out_features, stride_xm, stride_xk,
                                           BLOCK_O, BLOCK_J, False, FP32_DOT)
    _add_rows(y_ptr, acc, offs_m, m_mask, offs_o, touched, stride_ym, stride_yo)


def _regime(num_tokens: int) -> str:
    return "decode" if num_tokens == 1 else "small" if num_tokens < 64 else "prefill"


def _fp32_dot(x_dtype: torch.dtype, values_dtype: torch.dtype) -> bool:
    """Whether the kernel multiplies in fp32 (IEEE): unless ``x`` and the values share one half-precision dtype,
    whose products are exact in the fp32 accumulator of a tensor-core dot."""
    return not (x_dtype == values_dtype and x_dtype in (torch.float16, torch.bfloat16))


def plan_sparse_delta_add(num_tokens: int, out_features: int, fp32_dot: bool, arch=None) -> LaunchPlan:
    """The launch of ``y += x δᵀ`` for ``num_tokens`` (> 0) tokens and ``out_features`` (> 0) rows on a GPU of
    ``arch``. ``runtime["gather_columns"]``: the launcher hands the kernel ``x`` column-major (tiles of several
    tokens); ``runtime["weight_tile"]``: delta entries per main-loop step (for the static check)."""
    regime = _regime(num_tokens)
    config = config_for(CONFIGS, arch)[regime]
    block_m, block_o = config["BLOCK_M"], config["BLOCK_O"]
    return LaunchPlan(
        op="sparse_delta_add_", variant=regime, kernel=_sparse_delta_add_kernel,
        grid=(triton.cdiv(out_features, block_o), triton.cdiv(num_tokens, block_m)),
        constexprs={"BLOCK_M": block_m, "BLOCK_O": block_o, "BLOCK_J": config["BLOCK_J"], "USE_DOT": block_m >= 16,
                    "FP32_DOT": fp32_dot},
        num_warps=config["num_warps"], num_stages=config["num_stages"],
        runtime={"gather_columns": block_m > 1, "weight_tile": config["BLOCK_J"]},
    )


def plan_sparse_delta_bank_add(num_tokens: int, out_features: int, fp32_dot: bool, arch=None) -> LaunchPlan:
    """The launch of the bank's ``y[m] += x[m] δ_{ids[m]}ᵀ``: one token per program (the decode tile)."""
    config = config_for(CONFIGS, arch)["decode"]
    return LaunchPlan(
        op="sparse_delta_bank_add_", variant="bank", kernel=_sparse_delta_bank_add_kernel,
        grid=(num_tokens, triton.cdiv(out_features, config["BLOCK_O"])),
        constexprs={"BLOCK_O": config["BLOCK_O"], "BLOCK_J": config["BLOCK_J"], "FP32_DOT": fp32_dot},
        num_warps=config["num_warps"], num_stages=config["num_stages"], runtime={"weight_tile": config["BLOCK_J"]},
    )


def _check_csr(y: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
               in_features: int, row_ptr_shape: tuple) -> None:
    """The launchers' checks of ``y`` ``(M, out)``, ``x`` ``(M, in)`` and the CSR tensors; the pattern's contents
    are trusted (``SparseDelta.validate`` checks them once)."""
    for name, t in (("y", y), ("x", x), ("values", values)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} is not one of {_DTYPES}")
    if y.dtype != x.dtype:
        raise TypeError(f"y dtype {y.dtype} != x dtype {x.dtype}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[1] != in_features:
        raise ValueError(f"need x (M, {in_features}) and y (M, out), got x {tuple(x.shape)}, y {tuple(y.shape)}")
    if row_ptr.dtype != torch.int64 or tuple(row_ptr.shape) != row_ptr_shape or not row_ptr.is_contiguous():
        raise ValueError(f"row_ptr must be contiguous int64 {row_ptr_shape}, got {row_ptr.dtype} "
                         f"{tuple(row_ptr.shape)}")
    if col_idx.dtype != torch.int32 or col_idx.dim() != 1 or not col_idx.is_contiguous():
        raise ValueError(f"col_idx must be contiguous 1-D int32, got {col_idx.dtype} {tuple(col_idx.shape)}")
    if values.shape != col_idx.shape or not values.is_contiguous():
        raise ValueError(f"values must be contiguous {tuple(col_idx.shape)}, got {tuple(values.shape)}")
    devices = {t.device for t in (y, x, row_ptr, col_idx, values)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def sparse_delta_add_(y: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                      values: torch.Tensor, in_features: int) -> torch.Tensor:
    """``y += x δᵀ`` in place; returns ``y``. ``x`` ``(M, in)``, ``y`` ``(M, out)`` (one dtype: fp32 / fp16 / bf16,
    any strides); ``δ`` as CSR: ``row_ptr`` int64 ``(out + 1,)``, ``col_idx`` int32 ``(nnz,)``, ``values``
    ``(nnz,)`` (fp32 / fp16 / bf16), contiguous, a valid pattern (``fastpeft.sparse_delta.SparseDelta``)."""
    out_features = y.shape[1] if y.dim() == 2 else -1
    _check_csr(y, x, row_ptr, col_idx, values, in_features, (out_features + 1,))
    num_tokens = x.shape[0]
    if num_tokens == 0 or out_features == 0 or values.numel() == 0:
        return y
    plan = plan_sparse_delta_add(num_tokens, out_features, _fp32_dot(x.dtype, values.dtype), device_arch(x.device))
    if plan.grid[1] > _MAX_GRID_Y:
        raise ValueError(f"{num_tokens} tokens exceed the kernel's grid ({_MAX_GRID_Y} blocks of "
                         f"{plan.constexprs['BLOCK_M']})")
    if plan.runtime["gather_columns"] and x.stride(0) != 1:
        # column-major x: each entry's tokens are one contiguous read (see the module docstring)
        x = x.t().contiguous().t()
    launch(plan, y, x, row_ptr, col_idx, values, y.stride(0), y.stride(1), x.stride(0), x.stride(1), num_tokens,
           out_features)
    return y


def sparse_delta_bank_add_(y: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                           values: torch.Tensor, row_ids: torch.Tensor, in_features: int) -> torch.Tensor:
    """``y[m] += x[m] δ_kᵀ`` with ``k = row_ids[m]`` (``-1``: nothing) in place; returns ``y``. ``row_ptr`` int64
    ``(D, out + 1)``: delta ``k``'s row pointers, absolute positions in the concatenated ``col_idx`` / ``values``
    (``fastpeft.sparse_delta.SparseDeltaBank``); ``row_ids`` int32 ``(M,)`` in ``[-1, D)`` (checked by the caller).
    Shapes and dtypes otherwise as :func:`sparse_delta_add_`."""
    out_features = y.shape[1] if y.dim() == 2 else -1
    num_deltas = row_ptr.shape[0] if row_ptr.dim() == 2 else -1
    _check_csr(y, x, row_ptr, col_idx, values, in_features, (num_deltas, out_features + 1))
    num_tokens = x.shape[0]
    if row_ids.dtype != torch.int32 or tuple(row_ids.shape) != (num_tokens,) or not row_ids.is_contiguous():
        raise ValueError(f"row_ids must be contiguous int32 ({num_tokens},), got {row_ids.dtype} "
                         f"{tuple(row_ids.shape)}")
    if row_ids.device != x.device:
        raise ValueError(f"x is on {x.device}, row_ids on {row_ids.device}")
    if num_tokens == 0 or out_features == 0 or values.numel() == 0:
        return y
    plan = plan_sparse_delta_bank_add(num_tokens, out_features, _fp32_dot(x.dtype, values.dtype),
                                      device_arch(x.device))
    if plan.grid[1] > _MAX_GRID_Y:
        raise ValueError(f"{out_features} rows exceed the kernel's grid ({_MAX_GRID_Y} blocks of "
                         f"{plan.constexprs['BLOCK_O']})")
    launch(plan, y, x, row_ptr, col_idx, values, row_ids, y.stride(0), y.stride(1), x.stride(0), x.stride(1),
           out_features)
    return y
