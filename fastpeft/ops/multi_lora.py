"""Multi-LoRA as a ``torch.library`` custom op (``fastpeft::multi_lora_add_``), plus its batch metadata.

:class:`MultiLoraMeta` is computed once per batch (and per token count: prefill and each decode step)
and passed to every adapted layer: per token the adapter slots ``(k, w)`` (``S`` slots; a weighted
combination of adapters uses several), and for the Triton kernels the tokens grouped by adapter
(``token_order``, a permutation: the batch is never reordered) cut into tiles. Inference only (no autograd).

Off CUDA the op runs the reference math of ``fastpeft.reference.multi_lora_delta`` (the oracle the tests
hold it to), grouped by a :class:`ReferencePlan` built once per batch layout instead of once per layer:
the tokens of each adapter as a slice when they are contiguous (prefill: a row's tokens are), so the
LoRA term is one in-place ``addmm_`` on a view; and, when the batch's rows are spread over many adapters
with a single slot each (decode steps, and prefill of rows with distinct adapters), one batched pair of
``bmm`` over per-row gathered adapter factors (gathered once per batch and layer, reused by every step)
instead of a loop over adapters. In eager mode the reference path is called directly,
without the custom op's dispatch (tens of microseconds per call, more than a small layer's LoRA math).

The bank is in the activations' dtype or, for PEFT's fp32 adapters on a bf16 / fp16 model, in fp32: the
adapter terms are then computed in fp32 (the reference path casts where PEFT's ``_mixed_batch_forward``
does; the kernels keep fp32 in registers and round once into ``y``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..bank import LoraBank
from ..kernels.plan import config_for, device_arch
from .dispatch import backend_for, run_kernel

# Tokens per prefill tile, per GPU architecture: 16, tl.dot's minimum; on sm_90 64, a wgmma warpgroup's M, so
# the shrink and the expand run on HGMMA (python -m fastpeft.check_kernels --family multi_lora --arch sm_90a:
# HMMA at 16, HGMMA at 64, 0 spills, occupancy 75 % / 62 %) and each tile reads its adapter's factors once for
# four times the tokens. sm_80 / sm_89 keep 16 (at 64: 64 registers, 50 % occupancy). Untimed: no GPU here.
PREFILL_BLOCK_M = {"default": 16, (9, 0): 64}
# Reference path: gather each row's adapter factors and bmm (instead of one matmul pair per adapter) when
# the batch has at most this many rows per adapter it names (the gathered copies then stay within that
# multiple of the used adapters' own size). CPU, tiny Llama (python -m bench.check_cpu --cases
# multi_lora_decode): 16 adapters over 16 rows, decode and prefill, ~2-5x faster than the loop.
GATHER_MAX_ROWS_PER_ADAPTER = 4


@dataclass(frozen=True)
class ReferencePlan:
    """How the reference path groups a batch (host-side, built once per batch layout).

    ``groups``: per adapter ``k`` the batch names, ``(k, rows, weights)``: ``rows`` the tokens using it
    (None for every token, a ``slice`` when contiguous, else int64 indices, ascending), ``weights`` fp32 ``(n, 1)`` summed over
    the token's slots naming ``k``, or None when all are 1. ``gather``: for the batched path (one slot,
    the tokens in rows of ``T`` consecutive tokens that share an adapter, few rows per adapter)
    ``(T, rows, ids, weights)``: ``rows`` int64 of the rows with an adapter (None: every row), ``ids``
    int64 their adapter, ``weights`` fp32 ``(n,)`` or None; else None."""

    groups: tuple
    gather: Optional[tuple]
    # per layer and row layout (keyed by the bank's lora_a, held so its id stays its own, and the rows' adapters):
    # the gathered, transposed factors and per-row coefficients of the batched path, built at the first call
    # and reused by the next ones; shared by the plans of one batch (prefill and decode steps)
    gathered: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, slot_ids: torch.Tensor, slot_weights: torch.Tensor,
              gathered: Optional[dict] = None) -> "ReferencePlan":
        ids = slot_ids.long()
        groups = []
        for k in torch.unique(ids[ids >= 0]).tolist():
            weight_k = torch.where(ids == k, slot_weights, 0).sum(-1)
            rows = weight_k.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            weights = weight_k[rows]
            weights = None if bool((weights == 1).all()) else weights[:, None]
            start, n = int(rows[0]), rows.numel()
            if n == ids.shape[0]:
                rows = None  # every token (decode with one adapter): no slicing at each layer call
            elif int(rows[-1]) - start + 1 == n:
                rows = slice(start, start + n)
            groups.append((k, rows, weights))
        return cls(tuple(groups), _gather_rows(ids, slot_weights, len(groups)), {} if gathered is None else gathered)


def _gather_rows(ids: torch.Tensor, slot_weights: torch.Tensor, n_adapters: int) -> Optional[tuple]:
    """``ReferencePlan.gather`` for int64 ``ids`` ``(M, S)`` (with the rows' adapters and weights appended as a
    hashable key of the gathered factors), or None. ``T`` is the gcd of the lengths of the
    runs of equal (adapter, weight) in token order: every block of ``T`` tokens then lies inside one run
    (a prefill row's tokens share its adapter; decode has ``T = 1``)."""
    if ids.shape[1] != 1 or n_adapters < 2:
        return None
    ids, weights = ids[:, 0], slot_weights[:, 0]
    change = ((ids[1:] != ids[:-1]) | (weights[1:] != weights[:-1])).nonzero().squeeze(1) + 1
    bounds = [0, *change.tolist(), ids.shape[0]]
    tokens_per_row = math.gcd(*(b - a for a, b in zip(bounds[:-1], bounds[1:])))
    ids, weights = ids[::tokens_per_row], weights[::tokens_per_row]
    if ids.shape[0] > GATHER_MAX_ROWS_PER_ADAPTER * n_adapters:
        return None
    rows = ((ids >= 0) & (weights != 0)).nonzero().squeeze(1)
    weights = weights[rows]
    key = (tuple(ids.tolist()), tuple(weights.tolist()))
    return (tokens_per_row, None if rows.numel() == ids.shape[0] else rows, ids[rows],
            None if bool((weights == 1).all()) else weights, key)


def _reference_add_(y: torch.Tensor, x: torch.Tensor, bank: LoraBank, plan: ReferencePlan) -> None:
    """``y += Σ w · s_k · (x A_kᵀ) B_kᵀ`` per token as ``plan`` groups them; reads only each adapter's own
    ``ranks[k]`` columns of the zero-padded bank (padding is never read, so never turns inf into NaN).

    A bank in another dtype than ``y`` (fp32 adapters on a bf16 / fp16 model) is used as PEFT's
    ``_mixed_batch_forward`` uses it: ``x`` cast to the bank's dtype, ``(x Aᵀ) Bᵀ · s`` in that dtype, the
    term cast to ``y``'s dtype, then added. So is a bank whose scalings do not fuse (``bank.scalings_fuse``:
    NaN, inf, 0, fp16 factors): ``s`` after the product, never folded into ``B`` or a BLAS alpha."""
    lora_a, lora_b, ranks = bank.lora_a, bank.lora_b, bank.rank_list
    cast = lora_a.dtype != y.dtype
    peft_order = cast or not bank.scalings_fuse
    used_ranks = {ranks[k] for k, _, _ in plan.groups}
    if plan.gather is not None and len(used_ranks) == 1:
        rank = used_ranks.pop()
        if rank == 0:
            return
        tokens_per_row, rows, ids, weights, key = plan.gather
        key = (id(lora_a), peft_order, key)
        cached = plan.gathered.get(key)
        if cached is None or cached[0] is not lora_a:
            # (n, in, r) and (n, r, out), contiguous: bmm of one-row matrices runs an order of magnitude faster
            # in this orientation than as (r, in) @ (in, 1) on CPU; the row's s_k · w folded into its B once
            # (kept apart in fp32, applied after the product as PEFT does, in PEFT's order: the fp32 product of a
            # half-precision term rounded once is PEFT's half-precision multiply by a Python float)
            a_t = lora_a.index_select(0, ids)[:, :rank].transpose(1, 2).contiguous()
            coef = bank.scalings.index_select(0, ids)
            coef = (coef if weights is None else coef * weights).view(-1, 1, 1)
            b_t = lora_b.index_select(0, ids)[:, :, :rank].transpose(1, 2).contiguous()
            cached = plan.gathered[key] = ((lora_a, a_t, b_t, coef) if peft_order
                                           else (lora_a, a_t, b_t.mul_(coef.to(lora_b.dtype)), None))
        _, a_t, b_t, coef = cached
        x_rows = x.view(-1, tokens_per_row, x.shape[-1])  # splitting the token dim: a view at any strides
        y_rows = y.view(-1, tokens_per_row, y.shape[-1])
        if rows is not None:
            x_rows = x_rows.index_select(0, rows)
        if peft_order:
            term = (torch.bmm(torch.bmm(x_rows.to(lora_a.dtype), a_t), b_t) * coef).to(y.dtype)
            if rows is None:
                y_rows.add_(term)
            else:
                y_rows.index_add_(0, rows, term)
        elif rows is None:
            y_rows.baddbmm_(torch.bmm(x_rows, a_t), b_t)
        else:
            y_rows.index_add_(0, rows, torch.bmm(torch.bmm(x_rows, a_t), b_t))
        return
    for k, rows, weights in plan.groups:
        if ranks[k] == 0:  # the adapter does not touch this layer
            continue
        a_t, b_t, scaling = bank.adapter_factors(k)
        scattered = rows is not None and not isinstance(rows, slice)
        x_k = x if rows is None else x.index_select(0, rows) if scattered else x[rows]
        h = (x_k.to(a_t.dtype) if cast else x_k) @ a_t
        if weights is not None:
            h = h * weights.to(h.dtype)
        y_k = y if rows is None or scattered else y[rows]
        if peft_order:
            term = ((h @ b_t) * scaling).to(y.dtype)
            if scattered:
                y.index_add_(0, rows, term)
            else:
                y_k.add_(term)
        elif scattered:
            y.index_add_(0, rows, h @ b_t, alpha=scaling)
        else:
            y_k.addmm_(h, b_t, alpha=scaling)


def prefill_block_m(arch: Optional[tuple]) -> int:
    """Tokens per prefill tile on a GPU of compute capability ``arch`` (None: not a GPU): ``PREFILL_BLOCK_M``."""
    return config_for(PREFILL_BLOCK_M, arch)


@dataclass(frozen=True)
class MultiLoraMeta:
    """Per-batch metadata. ``slot_ids`` int32 ``(M, S)`` (``-1`` = empty slot), ``slot_weights`` fp32
    ``(M, S)``; ``token_order`` int32 ``(S, M)`` (per slot, tokens sorted by adapter, empty ones last),
    ``tiles`` int32 ``(T, 3)`` rows ``(adapter, start in token_order, length)``, ``slot_tiles`` the tile
    count of each slot, ``block_m`` the tile height (1: decode), ``max_adapter_id`` (-1 if none);
    ``reference_plan`` the reference path's grouping (built for CPU metadata; None on CUDA, where the
    kernels never need it)."""

    slot_ids: torch.Tensor
    slot_weights: torch.Tensor
    token_order: torch.Tensor
    tiles: torch.Tensor
    slot_tiles: tuple
    block_m: int
    max_adapter_id: int
    reference_plan: Optional[ReferencePlan] = None

    @property
    def num_tokens(self) -> int:
        return self.slot_ids.shape[0]

    @classmethod
    def build(cls, slot_ids: torch.Tensor, slot_weights: Optional[torch.Tensor] = None,
              decode: bool = False, reference_cache: Optional[dict] = None,
              block_m: Optional[int] = None) -> "MultiLoraMeta":
        """From ``slot_ids`` int ``(M,)`` or ``(M, S)`` and optional ``slot_weights`` of the same shape.
        ``decode=True`` (one token per sequence) picks one-token tiles (GEMV); otherwise tokens of one
        adapter are tiled :func:`prefill_block_m` at a time for the device's architecture (``block_m``
        overrides either: 1, 16, 32 or 64). ``reference_cache``: a dict shared by the metadata of one batch's
        steps, where the reference path keeps per-layer gathered factors."""
        if slot_ids.dim() == 1:
            slot_ids = slot_ids[:, None]
            slot_weights = None if slot_weights is None else slot_weights[:, None]
        if slot_ids.dim() != 2 or slot_ids.dtype.is_floating_point:
            raise ValueError(f"slot_ids must be integer (M,) or (M, S), got {slot_ids.dtype} {tuple(slot_ids.shape)}")
        if slot_weights is None:
            slot_weights = torch.ones(slot_ids.shape, dtype=torch.float32, device=slot_ids.device)
        if slot_weights.shape != slot_ids.shape:
            raise ValueError(f"slot_weights shape {tuple(slot_weights.shape)} != slot_ids shape {tuple(slot_ids.shape)}")
        min_id, max_id = (int(slot_ids.min()), int(slot_ids.max())) if slot_ids.numel() else (-1, -1)
        if min_id < -1:
            raise ValueError(f"adapter ids must be >= -1, got {min_id}")
        # ids are kept as int32, with int32's largest value marking empty slots while sorting
        if max_id >= torch.iinfo(torch.int32).max:
            raise ValueError(f"adapter id {max_id} out of range: ids must be below {torch.iinfo(torch.int32).max}")
        if block_m is None:
            block_m = 1 if decode else prefill_block_m(device_arch(slot_ids.device))
        elif block_m not in (1, 16, 32, 64):
            raise ValueError(f"block_m must be 1 (decode) or 16/32/64 (prefill), got {block_m}")
        slot_ids = slot_ids.to(torch.int32).contiguous()
        orders, tiles, slot_tiles = [], [], []
        for ids in slot_ids.t():
            # empty slots sort last; stable so tokens of one adapter keep their batch order
            key = torch.where(ids < 0, torch.iinfo(torch.int32).max, ids)
            order = torch.sort(key, stable=True).indices
            orders.append(order.to(torch.int32))
            adapters, counts = torch.unique_consecutive(key[order], return_counts=True)
            count = 0
            start = 0
            for adapter, length in zip(adapters.tolist(), counts.tolist()):
                if adapter != torch.iinfo(torch.int32).max:
                    for tile_start in range(start, start + length, block_m):
                        tiles.append((adapter, tile_start, min(block_m, start + length - tile_start)))
                        count += 1
                start += length
            slot_tiles.append(count)
        device = slot_ids.device
        slot_weights = slot_weights.to(torch.float32).contiguous()
        return cls(
            slot_ids=slot_ids,
            slot_weights=slot_weights,
            token_order=torch.stack(orders) if orders else torch.empty(0, 0, dtype=torch.int32, device=device),
            tiles=torch.tensor(tiles, dtype=torch.int32, device=device).reshape(-1, 3),
            slot_tiles=tuple(slot_tiles),
            block_m=block_m,
            max_adapter_id=max_id,
            reference_plan=None if device.type == "cuda" else ReferencePlan.build(slot_ids, slot_weights,
                                                                                 reference_cache),
        )


@torch.library.custom_op("fastpeft::multi_lora_add_", mutates_args=("y",))
def _multi_lora_add_op(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    slot_ids: torch.Tensor,
    slot_weights: torch.Tensor,
    token_order: torch.Tensor,
    tiles: torch.Tensor,
    slot_tiles: list[int],
    block_m: int,
    max_adapter_id: int,
) -> None:
    def torch_path():
        _reference_add_(y, x, LoraBank(lora_a, lora_b, ranks, scalings), ReferencePlan.build(slot_ids, slot_weights))

    if backend_for(x.device) == "triton":
        from ..kernels.multi_lora import multi_lora_add_

        run_kernel("multi_lora_add_", lambda: multi_lora_add_(
            y, x, lora_a, lora_b, ranks, scalings, slot_weights, token_order, tiles, slot_tiles, block_m,
            max_adapter_id), torch_path)
        return
    torch_path()


@_multi_lora_add_op.register_fake
def _(y, x, lora_a, lora_b, ranks, scalings, slot_ids, slot_weights, token_order, tiles, slot_tiles, block_m,
      max_adapter_id):
    return None


def multi_lora_add_(y: torch.Tensor, x: torch.Tensor, bank, meta: MultiLoraMeta) -> torch.Tensor:
    """``y += Σ_j w[:, j] · s_k · (x A_kᵀ) B_kᵀ`` in place for ``x`` ``(M, in)``, ``y`` ``(M, out)`` (one dtype),
    with the adapters of ``bank`` (a :class:`fastpeft.bank.LoraBank` in ``x``'s dtype, or fp32 with bf16 /
    fp16 ``x``) chosen per token by ``meta``; returns ``y``."""
    if meta.num_tokens != x.shape[0]:
        raise ValueError(f"metadata is for {meta.num_tokens} tokens, x has {x.shape[0]}")
    if meta.max_adapter_id >= bank.num_adapters:
        raise ValueError(f"adapter id {meta.max_adapter_id} out of range: the bank holds {bank.num_adapters} "
                         f"adapters (ids -1..{bank.num_adapters - 1})")
    if backend_for(x.device) == "reference" and not torch.compiler.is_compiling():
        plan = meta.reference_plan or ReferencePlan.build(meta.slot_ids, meta.slot_weights)
        _reference_add_(y, x, bank, plan)
        return y
    _multi_lora_add_op(y, x, bank.lora_a, bank.lora_b, bank.ranks, bank.scalings, meta.slot_ids, meta.slot_weights,
                       meta.token_order, meta.tiles, list(meta.slot_tiles), meta.block_m, meta.max_adapter_id)
    return y
