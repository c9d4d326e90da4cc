"""Multi-adapter LoRA training in Triton: the backward's shrink and per-adapter segment gradients.

Math (one slot per token: token ``t`` has adapter ``k`` (``-1``: none) and weight ``w_t``):
``h = x A_kᵀ`` and ``g = dy B_k`` per token (:func:`multi_lora_shrink`, the forward's shrink kernel over the bank or
its transpose, unscaled), then per adapter over its own tokens (:func:`multi_lora_segment_grad`)
``dB_k = s_k Σ_t w_t dy_tᵀ h_t`` ``(out, R)`` and ``dA_k = s_k Σ_t w_t g_tᵀ x_t`` ``(R, in)``, zero at and beyond
``ranks[k]`` and for adapters without tokens. ``dx += w_t s_k g_t A_k`` is the forward's ``multi_lora_add_`` over
the transposed bank.

Segment gradient design: one "transpose-A GEMM over token segments". ``MultiLoraMeta.segments`` gives each adapter's
span of ``token_order`` (the batch is never reordered: rows are gathered through it). Both gradients are one kernel
with a *feature* operand (``dy`` for dB, ``x`` for dA: ``(M, F)``) and a *rank* operand (``h`` / ``g``: ``(M, R)``):
``acc (BLOCK_F, BLOCK_R) += featᵀ (BLOCK_F, BLOCK_T) · rank (BLOCK_T, BLOCK_R)`` over token tiles, the feature axis on
the MMA's M side (64: one wgmma warpgroup's M, so sm_90a runs HGMMA; mma.sync on sm_80 / sm_89), the rank block
(16 / 32 / 64, the smallest covering the bank's largest rank) on its N side, the tokens its reduction. The store
maps ``acc[f, r]`` to ``out[k, f, r]`` (dB) or ``out[k, r, f]`` (dA) by strides alone. One program per
``(adapter, F block, R block)`` over the bank's N adapters: a block beyond the adapter's rank, or an adapter without
tokens, loops zero times and stores exact zeros, so the kernel writes every element of ``out`` (no memset).
Columns of the rank operand beyond ``ranks[k]`` inside the partial rank block are loaded (within the tensor's ``R``
columns: a whole-block load stays vectorised) and their products dropped: the stored value is a ``where`` on the
rank, so whatever the padding holds, the output there is exactly zero.

Long segments (few adapters, many tokens) would leave most SMs idle: the plan then splits each segment's tokens into
``splits`` equal token ranges, each program storing its fp32 partial sum into a workspace, and a second kernel sums
the partials in split order, scales and rounds once: deterministic (no atomics; the same sum order at every run).

Precision: fp32 accumulation; the slot weight multiplies the rank operand tile (in fp32, rounded back to its 16-bit
dtype when the operands are bf16 / fp16: exact for the usual weight 1); ``s_k`` multiplies the fp32 sum; one
rounding into ``out``. Operands of different dtypes (bf16 / fp16 activations beside PEFT's fp32 adapters' ``h`` /
``g``) run ``tl.dot`` in IEEE fp32 (no tensor cores, no tf32), as the forward does for an fp32 bank.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import DTYPES
from .multi_lora import _multi_lora_shrink_kernel, plan_multi_lora_shrink
from .plan import LaunchPlan, config_for, device_arch, launch

# Feature block (the MMA's M side), token block (its reduction), warps and stages per GPU architecture and operand
# kind ("mma": bf16 / fp16 operands on tensor cores; "fp32": an fp32 operand, the IEEE fp32 dot). The feature block is
# 64 everywhere (one wgmma warpgroup's M on sm_90a); on sm_90a tensor-core steps take 64 tokens (four k16 wgmma per
# step), 32 elsewhere and for fp32 (fp32 tiles of 64 tokens in 3 stages take 57 KB of shared memory on sm_90a:
# 19 % occupancy; at 32 tokens 29 KB, 38 %). Source: static check only: python -m fastpeft.check_kernels --family
# multi_lora_grad --arch sm_80 sm_89 sm_90a (no spills, occupancy >= 25 %, HMMA on sm_80 / sm_89 and HGMMA on
# sm_90a in the loop for bf16 / fp16); not timed on a GPU.
SEGMENT_GRAD_CONFIGS = {
    "default": {"mma": {"BLOCK_F": 64, "BLOCK_T": 32, "num_warps": 4, "num_stages": 3},
                "fp32": {"BLOCK_F": 64, "BLOCK_T": 32, "num_warps": 4, "num_stages": 3}},
    (9, 0): {"mma": {"BLOCK_F": 64, "BLOCK_T": 64, "num_warps": 4, "num_stages": 3},
             "fp32": {"BLOCK_F": 64, "BLOCK_T": 32, "num_warps": 4, "num_stages": 3}},
}
# SMs per architecture for the split rule (A100: 108, RTX 4090: 128, H100 / H200 SXM: 132; other parts of an
# architecture differ a little, which moves only the split count).
SM_COUNT = {"default": 108, (8, 9): 128, (9, 0): 132}
# Token splits: only when the adapters with tokens fill fewer than PROGRAMS_PER_SM programs per SM; each split keeps
# at least MIN_SPLIT_TOKENS tokens (a few pipelined token steps), at most MAX_SPLITS (bounds the fp32 workspace:
# splits x N x F x R, a few MB at the split's shapes, since splitting happens only for small grids).
PROGRAMS_PER_SM = 2
MIN_SPLIT_TOKENS = 512
MAX_SPLITS = 16


@triton.jit
def _segment_span(segments_ptr, adapter, num_segments, rank, r_start):
    """``(start, count)``: the adapter's tokens in ``token_order``; count 0 for an adapter without tokens (ids past
    the metadata's largest) and for a rank block at or beyond the adapter's rank (nothing to compute there)."""
    named = adapter < num_segments
    start = tl.load(segments_ptr + adapter * 2, mask=named, other=0)
    count = tl.load(segments_ptr + adapter * 2 + 1, mask=named, other=0)
    count = tl.where(r_start < rank, count, 0)
    return start, count


@triton.jit
def _store_grad(out_ptr, acc, scale, adapter, rank, count, offs_f, f_mask, offs_r, max_rank, stride_on, stride_of,
                stride_or):
    """``out[adapter, f, r] = s_k · acc`` (through the strides: dB's ``(f, r)`` or dA's ``(r, f)``), exactly 0 at and
    beyond the rank and for an adapter without tokens; one rounding."""
    keep = (offs_r < rank) & (count > 0)
    value = tl.where(keep[None, :], acc * scale, 0.0)
    ptrs = out_ptr + adapter * stride_on + offs_f[:, None].to(tl.int64) * stride_of + offs_r[None, :] * stride_or
    tl.store(ptrs, value.to(out_ptr.dtype.element_ty), mask=f_mask[:, None] & (offs_r < max_rank)[None, :])


@triton.jit
def _multi_lora_segment_grad_kernel(
    feat_ptr, rank_ptr, out_ptr, ranks_ptr, scalings_ptr, weights_ptr, order_ptr, segments_ptr,
    stride_fm, stride_ff, stride_rm, stride_rr, stride_on, stride_of, stride_or, stride_wm,
    num_features, max_rank, num_segments, num_splits,
    BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, FP32_DOT: tl.constexpr,
    PARTIAL: tl.constexpr,
):
    adapter = (tl.program_id(0) // num_splits).to(tl.int64)
    split = tl.program_id(0) % num_splits
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_mask = offs_f < num_features
    r_start = tl.program_id(2) * BLOCK_R
    offs_r = r_start + tl.arange(0, BLOCK_R)
    # the tensor's R columns bound the rank operand's loads; the adapter's own rank is applied at the store
    r_in = offs_r < max_rank
    rank = tl.load(ranks_ptr + adapter)
    start, count = _segment_span(segments_ptr, adapter, num_segments, rank, r_start)
    # this split's token range of the segment, in whole token tiles
    chunk = tl.cdiv(tl.cdiv(count, num_splits), BLOCK_T) * BLOCK_T
    t_begin = split * chunk
    t_end = tl.minimum(count, t_begin + chunk)
    acc = tl.zeros((BLOCK_F, BLOCK_R), dtype=tl.float32)
    for t in range(t_begin, t_end, BLOCK_T):
        offs_t = t + tl.arange(0, BLOCK_T)
        t_mask = offs_t < t_end
        rows = tl.load(order_ptr + start + offs_t, mask=t_mask, other=0).to(tl.int64)
        feat = tl.load(feat_ptr + rows[:, None] * stride_fm + offs_f[None, :] * stride_ff,
                       mask=t_mask[:, None] & f_mask[None, :], other=0.0)
        rank_tile = tl.load(rank_ptr + rows[:, None] * stride_rm + offs_r[None, :] * stride_rr,
                            mask=t_mask[:, None] & r_in[None, :], other=0.0)
        weights = tl.load(weights_ptr + rows * stride_wm, mask=t_mask, other=0.0)
        weighted = rank_tile.to(tl.float32) * weights[:, None]
        if FP32_DOT:
            acc += tl.dot(tl.trans(feat.to(tl.float32)), weighted, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(feat), weighted.to(rank_tile.dtype))
    if PARTIAL:  # fp32 partial sum of this split: out is the (splits, N, F, R) workspace
        num_adapters = tl.num_programs(0) // num_splits
        ptrs = (out_ptr + (split * num_adapters + adapter) * stride_on
                + offs_f[:, None].to(tl.int64) * stride_of + offs_r[None, :] * stride_or)
        tl.store(ptrs, acc, mask=f_mask[:, None] & r_in[None, :])
    else:
        _store_grad(out_ptr, acc, tl.load(scalings_ptr + adapter), adapter, rank, count, offs_f, f_mask, offs_r,
                    max_rank, stride_on, stride_of, stride_or)


@triton.jit
def _multi_lora_segment_grad_reduce_kernel(
    partial_ptr, out_ptr, ranks_ptr, scalings_ptr, segments_ptr,
    stride_pn, stride_pf, stride_on, stride_of, stride_or,
    num_adapters, num_features, max_rank, num_segments, num_splits,
    BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr,
):
    adapter = tl.program_id(0).to(tl.int64)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_mask = offs_f < num_features
    r_start = tl.program_id(2) * BLOCK_R
    offs_r = r_start + tl.arange(0, BLOCK_R)
    rank = tl.load(ranks_ptr + adapter)
    _, count = _segment_span(segments_ptr, adapter, num_segments, rank, r_start)
    acc = tl.zeros((BLOCK_F, BLOCK_R), dtype=tl.float32)
    offs = offs_f[:, None].to(tl.int64) * stride_pf + offs_r[None, :]
    mask = f_mask[:, None] & (offs_r < max_rank)[None, :]
    for split in range(0, num_splits):  # in split order: the same sum at every run
        acc += tl.load(partial_ptr + (split * num_adapters + adapter) * stride_pn + offs, mask=mask, other=0.0)
    _store_grad(out_ptr, acc, tl.load(scalings_ptr + adapter), adapter, rank, count, offs_f, f_mask, offs_r,
                max_rank, stride_on, stride_of, stride_or)


def rank_block(max_rank: int) -> int:
    """The rank block: the smallest of 16 / 32 / 64 covering ``max_rank`` (``tl.dot``'s N is at least 16)."""
    return 16 if max_rank <= 16 else 32 if max_rank <= 32 else 64


def plan_multi_lora_segment_grad(num_adapters: int, active_adapters: int, num_features: int, max_rank: int,
                                 num_tokens: int, fp32_dot: bool, arch: Optional[tuple] = None) -> tuple:
    """The launches of one segment gradient: ``(grad,)``, or ``(grad over splits, reduce)`` when the
    ``active_adapters`` (ids up to the metadata's largest) fill too few programs and ``num_tokens`` are enough to
    split (``runtime["splits"]``). ``num_features``: F (out for dB, in for dA); ``max_rank``: the bank's R;
    ``fp32_dot``: an operand is fp32 (the IEEE fp32 dot and its table entry)."""
    config = config_for(SEGMENT_GRAD_CONFIGS, arch)["fp32" if fp32_dot else "mma"]
    block_f, block_t, block_r = config["BLOCK_F"], config["BLOCK_T"], rank_block(max_rank)
    blocks = (triton.cdiv(num_features, block_f), triton.cdiv(max_rank, block_r))
    target = PROGRAMS_PER_SM * config_for(SM_COUNT, arch)
    active = active_adapters * blocks[0] * blocks[1]
    splits = 1
    if 0 < active < target:
        splits = max(1, min(MAX_SPLITS, triton.cdiv(target, active), num_tokens // MIN_SPLIT_TOKENS))
    common = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    grad = dict(op="multi_lora_segment_grad", kernel=_multi_lora_segment_grad_kernel,
                grid=(num_adapters * splits, *blocks),
                constexprs={"BLOCK_F": block_f, "BLOCK_R": block_r, "BLOCK_T": block_t, "FP32_DOT": fp32_dot,
                            "PARTIAL": splits > 1},
                runtime={"splits": splits, "weight_tile": block_t * block_f}, **common)
    if splits == 1:
        return (LaunchPlan(variant="segment-grad", **grad),)
    return (LaunchPlan(variant="segment-grad-split", **grad),
            LaunchPlan(op="multi_lora_segment_grad", variant="segment-grad-reduce",
                       kernel=_multi_lora_segment_grad_reduce_kernel, grid=(num_adapters, *blocks),
                       constexprs={"BLOCK_F": block_f, "BLOCK_R": block_r},
                       runtime={"splits": splits, "weight_tile": block_f * block_r}, num_warps=4, num_stages=1))


def _check_metadata(m: int, n: int, ranks, token_order, devices: set) -> None:
    if ranks.dtype != torch.int32 or tuple(ranks.shape) != (n,):
        raise TypeError(f"ranks must be int32 ({n},), got {ranks.dtype} {tuple(ranks.shape)}")
    if token_order.dtype != torch.int32 or token_order.dim() != 2 or token_order.shape[1] != m \
            or not token_order.is_contiguous():
        raise ValueError(f"token_order must be contiguous int32 (S, {m}), got {token_order.dtype} "
                         f"{tuple(token_order.shape)}")
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def multi_lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, ranks: torch.Tensor, token_order: torch.Tensor,
                      tiles: torch.Tensor, block_m: int, max_adapter_id: int) -> torch.Tensor:
    """``h`` ``(M, R)`` in ``lora_a``'s dtype: ``h[t, :r_k] = x[t] A_kᵀ`` for the tokens of slot 0's ``tiles``
    (``fastpeft.ops.multi_lora.MultiLoraMeta``), zeros elsewhere (zero-filled, then the forward's shrink kernel writes
    each tile's rank blocks). ``x`` ``(M, in)`` in ``lora_a``'s dtype or bf16 / fp16 beside an fp32 bank; ``lora_a``
    ``(N, R, in)`` at any strides (a transposed bank's ``B_kᵀ``)."""
    if x.dtype not in DTYPES or lora_a.dtype not in DTYPES:
        raise TypeError(f"x ({x.dtype}) and lora_a ({lora_a.dtype}) must be of {DTYPES}")
    if lora_a.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"lora_a dtype {lora_a.dtype} must be x's dtype {x.dtype} or float32")
    if x.dim() != 2 or lora_a.dim() != 3 or lora_a.shape[2] != x.shape[1]:
        raise ValueError(f"need x (M, in), lora_a (N, R, in); got x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}")
    (m, in_features), (n, max_rank, _) = x.shape, lora_a.shape
    _check_metadata(m, n, ranks, token_order, {t.device for t in (x, lora_a, ranks, token_order, tiles)})
    if tiles.dtype != torch.int32 or tiles.dim() != 2 or tiles.shape[1] != 3 or not tiles.is_contiguous():
        raise ValueError(f"tiles must be contiguous int32 (T, 3), got {tiles.dtype} {tuple(tiles.shape)}")
    if max_adapter_id >= n:
        raise ValueError(f"adapter id {max_adapter_id} out of range: the bank holds {n} adapters (ids -1..{n - 1})")
    if block_m not in (1, 16, 32, 64):
        raise ValueError(f"block_m must be 1 (decode) or 16/32/64 (prefill), got {block_m}")
    h = torch.zeros(m, max_rank, dtype=lora_a.dtype, device=x.device)
    if m == 0 or max_rank == 0 or tiles.shape[0] == 0:
        return h
    plan = plan_multi_lora_shrink(tiles.shape[0], max_rank, block_m, device_arch(x.device), op="multi_lora_shrink")
    launch(plan, x, lora_a, ranks, token_order[0], tiles, h, x.stride(0), x.stride(1), lora_a.stride(0),
           lora_a.stride(1), lora_a.stride(2), h.stride(0), h.stride(1), in_features)
    return h


def multi_lora_segment_grad(left: torch.Tensor, right: torch.Tensor, ranks: torch.Tensor, scalings: torch.Tensor,
                            slot_weights: torch.Tensor, token_order: torch.Tensor, segments: torch.Tensor, which: str,
                            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[k] = s_k · Σ_{t of adapter k} w_t · left[t]ᵀ right[t]`` ``(N, P, Q)`` in the promoted dtype of ``left``
    ``(M, P)`` and ``right`` ``(M, Q)``; returns ``out`` (written whole; a new tensor when None).

    ``which="lora_b"``: ``left = dy`` ``(M, out)``, ``right = h`` ``(M, R)``, ``out`` ``(N, out, R)``;
    ``which="lora_a"``: ``left = g`` ``(M, R)``, ``right = x`` ``(M, in)``, ``out`` ``(N, R, in)``. ``left`` and
    ``right`` at any strides, in one dtype or one of them fp32 beside bf16 / fp16; ``ranks`` int32 / ``scalings``
    fp32 ``(N,)``; ``slot_weights`` fp32 ``(M, 1)``, ``token_order`` int32 ``(1, M)``, ``segments`` int32
    ``(1, A, 2)`` (``A <= N``) from ``fastpeft.ops.multi_lora.MultiLoraMeta``."""
    if which not in ("lora_a", "lora_b"):
        raise ValueError(f"which must be 'lora_a' or 'lora_b', got {which!r}")
    for name, t in (("left", left), ("right", right)):
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} is not one of {DTYPES}")
    if left.dtype != right.dtype and torch.float32 not in (left.dtype, right.dtype):
        raise TypeError(f"left ({left.dtype}) and right ({right.dtype}) must share a dtype or one be float32")
    if left.dim() != 2 or right.dim() != 2 or left.shape[0] != right.shape[0]:
        raise ValueError(f"left and right must be (M, P) and (M, Q), got {tuple(left.shape)} and {tuple(right.shape)}")
    feat, rank_op = (right, left) if which == "lora_a" else (left, right)
    (m, num_features), max_rank, n = feat.shape, rank_op.shape[1], ranks.shape[0]
    dtype = torch.promote_types(left.dtype, right.dtype)
    shape = (n, left.shape[1], right.shape[1])
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=left.device)
    elif tuple(out.shape) != shape or out.dtype != dtype:
        raise ValueError(f"out must be {dtype} {shape}, got {out.dtype} {tuple(out.shape)}")
    _check_metadata(m, n, ranks, token_order,
                    {t.device for t in (left, right, ranks, scalings, slot_weights, token_order, segments, out)})
    if scalings.dtype != torch.float32 or tuple(scalings.shape) != (n,):
        raise TypeError(f"scalings must be float32 ({n},), got {scalings.dtype} {tuple(scalings.shape)}")
    if slot_weights.dtype != torch.float32 or slot_weights.dim() != 2 or slot_weights.shape[0] != m:
        raise TypeError(f"slot_weights must be float32 ({m}, S), got {slot_weights.dtype} {tuple(slot_weights.shape)}")
    if segments.dtype != torch.int32 or segments.dim() != 3 or segments.shape[2] != 2 or segments.shape[1] > n \
            or not segments.is_contiguous():
        raise ValueError(f"segments must be contiguous int32 (S, A <= {n}, 2), got {segments.dtype} "
                         f"{tuple(segments.shape)}")
    if m == 0 or n == 0 or max_rank == 0 or num_features == 0 or segments.shape[1] == 0:
        return out.zero_()
    rank_dim, feat_dim = (1, 2) if which == "lora_a" else (2, 1)
    stride_on, stride_of, stride_or = out.stride(0), out.stride(feat_dim), out.stride(rank_dim)
    num_segments = segments.shape[1]
    plans = plan_multi_lora_segment_grad(n, num_segments, num_features, max_rank, m,
                                         left.dtype != right.dtype or dtype == torch.float32, device_arch(out.device))
    splits = plans[0].runtime["splits"]
    weights, order, spans = slot_weights[:, 0], token_order[0], segments[0]
    target = out
    if splits > 1:
        target = torch.empty(splits * n, num_features, max_rank, dtype=torch.float32, device=out.device)
        stride_on, stride_of, stride_or = target.stride()
    launch(plans[0], feat, rank_op, target, ranks, scalings, weights, order, spans, feat.stride(0), feat.stride(1),
           rank_op.stride(0), rank_op.stride(1), stride_on, stride_of, stride_or, weights.stride(0), num_features,
           max_rank, num_segments, splits)
    if splits > 1:
        launch(plans[1], target, out, ranks, scalings, spans, target.stride(0), target.stride(1), out.stride(0),
               out.stride(feat_dim), out.stride(rank_dim), n, num_features, max_rank, num_segments, splits)
    return out
