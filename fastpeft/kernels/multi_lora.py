"""Multi-LoRA shrink / expand in Triton: many adapters, different ranks, one launch each.

Math (per slot ``j`` of token ``t``, adapter ``k = slot_ids[t, j]``, ``-1`` = nothing):
``h[t] = x[t] A_kᵀ`` (shrink, ``h`` in the bank's dtype like the reference) then
``y[t] += w[t, j] · s_k · h[t] B_kᵀ`` (expand, fp32 accumulation, one rounding into ``y``).
A row with a weighted combination of adapters carries several slots; plain batches have one.

Precision: the bank (``lora_a``, ``lora_b``) is in ``x``'s dtype or in fp32 with bf16/fp16 activations
(PEFT's fp32 adapters on a bf16 model, ``autocast_adapter_dtype``): ``x`` is loaded in its own dtype and
converted in registers, ``h`` is kept in fp32 (no rounding of the rank-r intermediate), the products
accumulate in fp32 and ``y`` is rounded once. An fp32 bank's ``tl.dot`` runs in IEEE fp32 (no tensor
cores; the rank-r work is small next to the base matmul).

Design (vLLM's ``lora/ops/triton_ops`` pattern, own code): ``fastpeft.ops.multi_lora.MultiLoraMeta``
is computed once per batch: per slot, ``token_order`` lists the tokens grouped by adapter (an index
permutation — the batch itself is never reordered) and ``tiles`` cuts each adapter's group into
``(adapter, start, length)`` tiles of ``block_m`` tokens (prefill: 16, 64 on sm_90 where wgmma takes 64
rows; ``fastpeft.ops.multi_lora.PREFILL_BLOCK_M``). Every program takes one tile: the tokens of a
tile share one adapter, so ``A_k`` / ``B_k`` blocks are loaded once per tile (prefill). Decode (one token
per sequence) uses ``block_m = 1``: one program per token, a GEMV as a 2-D multiply-sum in the weight
block's own layout instead of ``tl.dot`` (which needs 16 rows). Tokens with no adapter are in no tile:
no work at all.

Rank heterogeneity: the bank pads every adapter to the largest rank ``R``, but the shrink grid's rank
blocks at or beyond ``ranks[k]`` exit at once and the expand loop runs only to ``ranks[k]``, so padding
is never loaded nor multiplied. The expand (and fused) rank loop takes the adapter's whole ``BLOCK_R``
blocks first, with no rank mask: ``h`` and ``B_k`` are contiguous along the rank, so each thread loads
them in 32- to 128-bit vectors (a per-element mask along that axis forces one 16-bit load per element);
the partial last block (``ranks[k] % BLOCK_R`` ranks) follows once, masked by the adapter's rank.

Slots of one token write the same ``y`` row, so the launcher runs shrink+expand slot after slot (one
pair of launches per slot; ``S = 1`` for plain batches): no atomics, deterministic.

Fused variant (``fused=True``): one launch per slot; each ``(tile, out block)`` program computes its
tile's ``h`` one ``BLOCK_R`` block at a time (to its adapter's rank only), keeps it in registers and
multiplies it into ``B_k`` at once: no ``h`` round trip through memory and one launch instead of two, at
the price of recomputing the shrink for every out block (``x`` and ``A_k`` re-read, from L2 on a GPU).
It should win when the shrink is cheap next to the launch and memory costs (decode, small ``in``), lose
for long prefills; which one is kept per regime is data in ``FUSED`` below, set from a GPU run of the
bench (``fastpeft bench``'s ``multi_lora`` cases); until one exists both are kept and tested and the
two-launch path is the default.

fp32: ``tl.dot`` uses ``input_precision="ieee"`` so fp32 results match PyTorch's fp32 matmul rather
than tf32 (adapters are small; exactness beats the tf32 speed-up here).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import DTYPES
from .plan import KernelLaunchError, LaunchPlan, config_for, device_arch, launch

# K / rank / out slices, warps and stages per GPU architecture and regime (BLOCK_M is the metadata's
# block_m: 1 decode; prefill 16, 64 on sm_90). Source: not timed on a GPU (warps and stages are Triton's defaults),
# except (static compiles of python -m fastpeft.check_kernels --family multi_lora): the expand's one stage, its loop
# runs ranks[k] / BLOCK_R <= 16 times (4 at rank 64), too few for a cp.async pipeline whose shared buffers
# cost more than it hides (3 stages: prefill expand at 3-4 KB shared memory vs 1-2 KB); decode's BLOCK_K 64,
# one 128-bit load of x and of A per thread and step (at 32, 64-bit loads, and ptxas unrolls the sm_90a loop
# 4x); prefill keeps BLOCK_K 32 (at 64: HMMA x4 per step but 48 registers and 62% occupancy on sm_80).
CONFIGS = {"default": {
    "prefill": {"BLOCK_K": 32, "BLOCK_R": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3,
                "expand_num_warps": 4, "expand_num_stages": 1},
    "decode": {"BLOCK_K": 64, "BLOCK_R": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3,
               "expand_num_warps": 4, "expand_num_stages": 1},
}}
# Fused shrink→expand or two launches, per regime. Not timed on a GPU: two launches, the default, until a GPU
# run of the bench's multi_lora cases shows the fused launch faster in a regime.
FUSED = {"decode": False, "prefill": False}


@triton.jit
def _tile_rows(tiles_ptr, order_ptr, ranks_ptr, BLOCK_M: tl.constexpr):
    """This program's tile: its adapter (int64), that adapter's rank, the tile's token rows and their mask."""
    tile = tl.program_id(0)
    adapter = tl.load(tiles_ptr + tile * 3).to(tl.int64)
    rank = tl.load(ranks_ptr + adapter)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    length = tl.load(tiles_ptr + tile * 3 + 2)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < length
    rows = tl.load(order_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    return adapter, rank, rows, m_mask


@triton.jit
def _mma(acc, a, b, USE_DOT: tl.constexpr):
    """``acc + a @ b`` in fp32: ``tl.dot`` for prefill tiles, broadcast-multiply-sum for 1-row decode tiles.
    ``a`` is converted to ``b``'s dtype (bf16/fp16 activations times an fp32 bank)."""
    if USE_DOT:
        acc += tl.dot(a.to(b.dtype), b, input_precision="ieee")
    else:  # BLOCK_M == 1: a 2-D product reduced in b's own layout (no 3-D tile, no layout conversion)
        acc += tl.sum(tl.reshape(a, [a.shape[1]]).to(tl.float32)[:, None] * b.to(tl.float32), axis=0)[None, :]
    return acc


@triton.jit
def _shrink_block(x_ptr, a_base, rows, m_mask, offs_r, r_mask, stride_xm, stride_xk, stride_ar, stride_ak,
                  in_features, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                  USE_DOT: tl.constexpr):
    """fp32 ``(BLOCK_M, BLOCK_R)`` block ``x[rows] A_k[offs_r]ᵀ``."""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k_start in range(0, in_features, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_mask = offs_k < in_features
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_base + offs_r[None, :].to(tl.int64) * stride_ar + offs_k[:, None] * stride_ak,
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = _mma(acc, x, a, USE_DOT)
    return acc


@triton.jit
def _rank_mask(offs_r, rank, MASK_R: tl.constexpr):
    """``offs_r < rank`` for the block that crosses the adapter's rank (``MASK_R``); all true otherwise, as a
    constant, so that loads along the contiguous rank axis of a whole block are vectorised."""
    if MASK_R:
        return offs_r < rank
    return tl.full(offs_r.shape, 1, tl.int1)


@triton.jit
def _expand_step(acc, h, b_base, offs_r, rank, offs_n, n_mask, stride_bo, stride_br, USE_DOT: tl.constexpr,
                 MASK_R: tl.constexpr):
    """``acc + h B_k[offs_n, offs_r]ᵀ`` for one ``BLOCK_R`` block of ranks (``MASK_R``: the last, partial one)."""
    r_mask = _rank_mask(offs_r, rank, MASK_R)
    b = tl.load(b_base + offs_n[None, :].to(tl.int64) * stride_bo + offs_r[:, None] * stride_br,
                mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    return _mma(acc, h, b, USE_DOT)


@triton.jit
def _expand_h_step(acc, h_ptr, rows, m_mask, b_base, r_start, rank, offs_n, n_mask, stride_hm, stride_hr,
                   stride_bo, stride_br, BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr, MASK_R: tl.constexpr):
    """:func:`_expand_step` on the block of ``h`` stored by the shrink at ``r_start``."""
    offs_r = r_start + tl.arange(0, BLOCK_R)
    r_mask = _rank_mask(offs_r, rank, MASK_R)
    h = tl.load(h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    return _expand_step(acc, h, b_base, offs_r, rank, offs_n, n_mask, stride_bo, stride_br, USE_DOT, MASK_R)


@triton.jit
def _fused_step(acc, x_ptr, a_base, b_base, rows, m_mask, r_start, rank, offs_n, n_mask, stride_xm, stride_xk,
                stride_ar, stride_ak, stride_bo, stride_br, in_features, BLOCK_M: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, MASK_R: tl.constexpr):
    """:func:`_expand_step` on the block of ``h`` at ``r_start`` computed in registers (the fused kernel)."""
    offs_r = r_start + tl.arange(0, BLOCK_R)
    # A's rank mask runs across its rows (the contiguous axis is K): kept on every block
    h = _shrink_block(x_ptr, a_base, rows, m_mask, offs_r, offs_r < rank, stride_xm, stride_xk, stride_ar, stride_ak,
                      in_features, BLOCK_M, BLOCK_R, BLOCK_K, USE_DOT)
    # h is rounded to the bank's dtype, as the two-launch path (and the reference) store it
    h = h.to(a_base.dtype.element_ty)
    return _expand_step(acc, h, b_base, offs_r, rank, offs_n, n_mask, stride_bo, stride_br, USE_DOT, MASK_R)


@triton.jit
def _add_scaled(y_ptr, acc, scalings_ptr, weights_ptr, adapter, rows, m_mask, offs_n, n_mask,
                stride_wm, stride_ym, stride_yo):
    """``y[rows, offs_n] += w[rows] · s_k · acc`` with one rounding into ``y``."""
    scale = tl.load(scalings_ptr + adapter) * tl.load(weights_ptr + rows * stride_wm, mask=m_mask, other=0.0)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yo
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc * scale[:, None]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _multi_lora_shrink_kernel(
    x_ptr, lora_a_ptr, ranks_ptr, order_ptr, tiles_ptr, h_ptr,
    stride_xm, stride_xk, stride_an, stride_ar, stride_ak, stride_hm, stride_hr,
    in_features,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
):
    adapter, rank, rows, m_mask = _tile_rows(tiles_ptr, order_ptr, ranks_ptr, BLOCK_M)
    r_start = tl.program_id(1) * BLOCK_R
    if r_start >= rank:
        return
    offs_r = r_start + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    acc = _shrink_block(x_ptr, lora_a_ptr + adapter * stride_an, rows, m_mask, offs_r, r_mask,
                        stride_xm, stride_xk, stride_ar, stride_ak, in_features, BLOCK_M, BLOCK_R, BLOCK_K, USE_DOT)
    tl.store(h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr, acc.to(h_ptr.dtype.element_ty),
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _multi_lora_expand_kernel(
    h_ptr, lora_b_ptr, ranks_ptr, scalings_ptr, weights_ptr, order_ptr, tiles_ptr, y_ptr,
    stride_hm, stride_hr, stride_bn, stride_bo, stride_br, stride_wm, stride_ym, stride_yo,
    out_features,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr,
):
    adapter, rank, rows, m_mask = _tile_rows(tiles_ptr, order_ptr, ranks_ptr, BLOCK_M)
    if rank == 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_features
    b_base = lora_b_ptr + adapter * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # runtime bounds: only this adapter's own rank is read, never the bank's padding; whole blocks unmasked
    # along the rank (wide loads), then the partial last block masked
    whole = rank - rank % BLOCK_R
    for r_start in range(0, whole, BLOCK_R):
        acc = _expand_h_step(acc, h_ptr, rows, m_mask, b_base, r_start, rank, offs_n, n_mask, stride_hm, stride_hr,
                             stride_bo, stride_br, BLOCK_R, USE_DOT, False)
    if whole < rank:
        acc = _expand_h_step(acc, h_ptr, rows, m_mask, b_base, whole, rank, offs_n, n_mask, stride_hm, stride_hr,
                             stride_bo, stride_br, BLOCK_R, USE_DOT, True)
    _add_scaled(y_ptr, acc, scalings_ptr, weights_ptr, adapter, rows, m_mask, offs_n, n_mask,
                stride_wm, stride_ym, stride_yo)


@triton.jit
def _multi_lora_fused_kernel(
    x_ptr, lora_a_ptr, lora_b_ptr, ranks_ptr, scalings_ptr, weights_ptr, order_ptr, tiles_ptr, y_ptr,
    stride_xm, stride_xk, stride_an, stride_ar, stride_ak, stride_bn, stride_bo, stride_br, stride_wm,
    stride_ym, stride_yo,
    in_features, out_features,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    # the expand kernel's prologue, written out: the early return of a rank-0 adapter cannot sit in a jit helper
    adapter, rank, rows, m_mask = _tile_rows(tiles_ptr, order_ptr, ranks_ptr, BLOCK_M)
    if rank == 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_features
    a_base = lora_a_ptr + adapter * stride_an
    b_base = lora_b_ptr + adapter * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    whole = rank - rank % BLOCK_R  # whole rank blocks, then the partial last one (as the expand kernel)
    for r_start in range(0, whole, BLOCK_R):
        acc = _fused_step(acc, x_ptr, a_base, b_base, rows, m_mask, r_start, rank, offs_n, n_mask, stride_xm,
                          stride_xk, stride_ar, stride_ak, stride_bo, stride_br, in_features, BLOCK_M, BLOCK_R,
                          BLOCK_K, USE_DOT, False)
    if whole < rank:
        acc = _fused_step(acc, x_ptr, a_base, b_base, rows, m_mask, whole, rank, offs_n, n_mask, stride_xm,
                          stride_xk, stride_ar, stride_ak, stride_bo, stride_br, in_features, BLOCK_M, BLOCK_R,
                          BLOCK_K, USE_DOT, True)
    _add_scaled(y_ptr, acc, scalings_ptr, weights_ptr, adapter, rows, m_mask, offs_n, n_mask,
                stride_wm, stride_ym, stride_yo)


def plan_multi_lora_shrink(num_tiles: int, max_rank: int, block_m: int, arch: tuple | None = None,
                           op: str = "multi_lora_add_") -> LaunchPlan:
    """The shrink launch over ``num_tiles`` tiles of ``block_m`` tokens (1: decode) for a bank of largest rank
    ``max_rank``: ``h = x A_kᵀ`` per tile, for ``op`` (the forward, or the backward's ``multi_lora_shrink``)."""
    regime = "decode" if block_m == 1 else "prefill"
    config = config_for(CONFIGS, arch)[regime]
    return LaunchPlan(op=op, variant=f"shrink-{regime}", kernel=_multi_lora_shrink_kernel,
                      grid=(num_tiles, triton.cdiv(max_rank, config["BLOCK_R"])),
                      constexprs={"BLOCK_M": block_m, "BLOCK_R": config["BLOCK_R"], "BLOCK_K": config["BLOCK_K"],
                                  "USE_DOT": block_m >= 16},
                      num_warps=config["num_warps"], num_stages=config["num_stages"])


def plan_multi_lora(num_tiles: int, max_rank: int, out_features: int, block_m: int, fused: Optional[bool] = None,
                    arch: tuple | None = None) -> tuple:
    """The launches of one slot over ``num_tiles`` tiles of ``block_m`` tokens (1: decode), a bank of
    largest rank ``max_rank``: ``(fused,)`` or ``(shrink, expand)``. ``fused`` None reads ``FUSED`` for
    the regime."""
    if fused is None:
        fused = FUSED["decode" if block_m == 1 else "prefill"]
    regime = "decode" if block_m == 1 else "prefill"
    config = config_for(CONFIGS, arch)[regime]
    use_dot = block_m >= 16
    common = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    out_grid = (num_tiles, triton.cdiv(out_features, config["BLOCK_N"]))
    if fused:
        return (LaunchPlan(
            op="multi_lora_add_", variant=f"fused-{regime}", kernel=_multi_lora_fused_kernel, grid=out_grid,
            constexprs={"BLOCK_M": block_m, "BLOCK_N": config["BLOCK_N"], "BLOCK_R": config["BLOCK_R"],
                        "BLOCK_K": config["BLOCK_K"], "USE_DOT": use_dot}, **common),)
    return (
        plan_multi_lora_shrink(num_tiles, max_rank, block_m, arch),
        LaunchPlan(op="multi_lora_add_", variant=f"expand-{regime}", kernel=_multi_lora_expand_kernel, grid=out_grid,
                   constexprs={"BLOCK_M": block_m, "BLOCK_N": config["BLOCK_N"], "BLOCK_R": config["BLOCK_R"],
                               "USE_DOT": use_dot}, num_warps=config["expand_num_warps"],
                   num_stages=config["expand_num_stages"]),
    )


def multi_lora_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    slot_weights: torch.Tensor,
    token_order: torch.Tensor,
    tiles: torch.Tensor,
    slot_tiles: list,
    block_m: int,
    max_adapter_id: int,
    fused: Optional[bool] = None,
) -> torch.Tensor:
    """``y += Σ_j w[:, j] · s_k · (x A_kᵀ) B_kᵀ`` in place; returns ``y``.

    ``x`` ``(M, in)``, ``y`` ``(M, out)`` (any strides, one dtype), ``lora_a`` ``(N, R, in)``, ``lora_b``
    ``(N, out, R)`` (the bank: ``x``'s dtype, or fp32 with bf16/fp16 ``x``), ``ranks`` int32 ``(N,)``, ``scalings`` fp32 ``(N,)``, ``slot_weights`` fp32
    ``(M, S)``; ``token_order`` int32 ``(S, M)``, ``tiles`` int32 ``(T, 3)``, ``slot_tiles`` ``S`` tile counts
    (slot ``j``'s tiles follow slot ``j-1``'s), ``block_m`` and ``max_adapter_id`` from
    ``fastpeft.ops.multi_lora.MultiLoraMeta``. ``fused``: one fused launch per slot instead of shrink then
    expand (default: ``FUSED`` for the regime, decode when ``block_m == 1``).
    """
    for name, t in (("y", y), ("x", x), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} is not one of {DTYPES}")
    if y.dtype != x.dtype:
        raise TypeError(f"y dtype {y.dtype} != x dtype {x.dtype}")
    if lora_b.dtype != lora_a.dtype or lora_a.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"the bank (lora_a {lora_a.dtype}, lora_b {lora_b.dtype}) must be in x's dtype {x.dtype} "
                        "or both float32")
    if x.dim() != 2 or y.dim() != 2 or lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(f"need x (M, in), y (M, out), lora_a (N, R, in), lora_b (N, out, R); got x "
                         f"{tuple(x.shape)}, y {tuple(y.shape)}, lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}")
    (m, in_features), (n, max_rank, _), out_features = x.shape, lora_a.shape, y.shape[1]
    if y.shape[0] != m or lora_a.shape[2] != in_features or tuple(lora_b.shape) != (n, out_features, max_rank):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, y {tuple(y.shape)}, lora_a {tuple(lora_a.shape)}, "
                         f"lora_b {tuple(lora_b.shape)}")
    if ranks.dtype != torch.int32 or tuple(ranks.shape) != (n,):
        raise TypeError(f"ranks must be int32 ({n},), got {ranks.dtype} {tuple(ranks.shape)}")
    if scalings.dtype != torch.float32 or tuple(scalings.shape) != (n,):
        raise TypeError(f"scalings must be float32 ({n},), got {scalings.dtype} {tuple(scalings.shape)}")
    num_slots = len(slot_tiles)
    if slot_weights.dtype != torch.float32 or tuple(slot_weights.shape) != (m, num_slots):
        raise TypeError(f"slot_weights must be float32 ({m}, {num_slots}), got {slot_weights.dtype} "
                        f"{tuple(slot_weights.shape)}")
    if token_order.dtype != torch.int32 or tuple(token_order.shape) != (num_slots, m) or not token_order.is_contiguous():
        raise ValueError(f"token_order must be contiguous int32 ({num_slots}, {m}), got {token_order.dtype} "
                         f"{tuple(token_order.shape)}")
    if tiles.dtype != torch.int32 or tiles.dim() != 2 or tiles.shape[1] != 3 or tiles.shape[0] != sum(slot_tiles) \
            or not tiles.is_contiguous():
        raise ValueError(f"tiles must be contiguous int32 ({sum(slot_tiles)}, 3), got {tiles.dtype} {tuple(tiles.shape)}")
    if max_adapter_id >= n:
        raise ValueError(f"adapter id {max_adapter_id} out of range: the bank holds {n} adapters (ids -1..{n - 1})")
    if block_m not in (1, 16, 32, 64):
        raise ValueError(f"block_m must be 1 (decode) or 16/32/64 (prefill), got {block_m}")
    tensors = (y, x, lora_a, lora_b, ranks, scalings, slot_weights, token_order, tiles)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if m == 0 or max_rank == 0 or tiles.shape[0] == 0:
        return y
    if fused is None:
        fused = FUSED["decode" if block_m == 1 else "prefill"]
    h = None if fused else torch.empty(m, max_rank, dtype=lora_a.dtype, device=x.device)
    arch = device_arch(x.device)
    first = 0
    wrote_y = False
    for slot, count in enumerate(slot_tiles):
        if count == 0:
            continue
        slot_tile_rows = tiles[first:first + count]
        order = token_order[slot]
        weights = slot_weights[:, slot]
        first += count
        plans = plan_multi_lora(count, max_rank, out_features, block_m, fused, arch)
        try:
            if fused:
                launch(plans[0], x, lora_a, lora_b, ranks, scalings, weights, order, slot_tile_rows, y,
                       x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
                       lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), weights.stride(0), y.stride(0),
                       y.stride(1), in_features, out_features)
            else:
                shrink, expand = plans
                launch(shrink, x, lora_a, ranks, order, slot_tile_rows, h,
                       x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
                       h.stride(0), h.stride(1), in_features)
                launch(expand, h, lora_b, ranks, scalings, weights, order, slot_tile_rows, y,
                       h.stride(0), h.stride(1), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
                       weights.stride(0), y.stride(0), y.stride(1), out_features)
        except KernelLaunchError as exc:
            # a later slot's launch can compile anew (its tile slice has another alignment) after an earlier
            # slot already added into y: no other path may then redo the whole update
            raise KernelLaunchError(exc.plan, exc.error, output_touched=wrote_y) from exc.error
        wrote_y = True
    return y
