"""The multi-LoRA primitive (``fastpeft::multi_lora_add_``, mutating ``y``), plus its batch metadata.

:class:`MultiLoraMeta` is computed once per batch (and per token count: prefill and each decode step)
and passed to every adapted layer: per token the adapter slots ``(k, w)`` (``S`` slots; a weighted
combination of adapters uses several), and for the Triton kernels the tokens grouped by adapter
(``token_order``, a permutation: the batch is never reordered) cut into tiles. Inference only (no autograd).

CUDA kernel: ``fastpeft.kernels.multi_lora.multi_lora_add_``. CPU kernel: ``fastpeft.reference.multi_lora_add_``,
the per-token math of ``fastpeft.reference.multi_lora_delta`` grouped by adapter as a
:class:`~fastpeft.reference.MultiLoraGrouping` says, built with the metadata once per batch layout (CPU metadata
only) instead of once per layer.

The bank is in the activations' dtype or, for PEFT's fp32 adapters on a bf16 / fp16 model, in fp32: the
adapter terms are then computed in fp32 (the reference casts where PEFT's ``_mixed_batch_forward``
does; the kernels keep fp32 in registers and round once into ``y``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import reference
from ..bank import LoraBank
from ..kernels.plan import config_for, device_arch
from ..reference import MultiLoraGrouping
from .dispatch import eager_reference, register_primitive

# Tokens per prefill tile, per GPU architecture: 16, tl.dot's minimum; on sm_90 64, a wgmma warpgroup's M, so
# the shrink and the expand run on HGMMA (python -m fastpeft.check_kernels --family multi_lora --arch sm_90a:
# HMMA at 16, HGMMA at 64, 0 spills, occupancy 75 % / 62 %) and each tile reads its adapter's factors once for
# four times the tokens. sm_80 / sm_89 keep 16 (at 64: 64 registers, 50 % occupancy). Untimed: no GPU here.
PREFILL_BLOCK_M = {"default": 16, (9, 0): 64}
def prefill_block_m(arch: Optional[tuple]) -> int:
    """Tokens per prefill tile on a GPU of compute capability ``arch`` (None: not a GPU): ``PREFILL_BLOCK_M``."""
    return config_for(PREFILL_BLOCK_M, arch)


@dataclass(frozen=True)
class MultiLoraMeta:
    """Per-batch metadata. ``slot_ids`` int32 ``(M, S)`` (``-1`` = empty slot), ``slot_weights`` fp32
    ``(M, S)``; ``token_order`` int32 ``(S, M)`` (per slot, tokens sorted by adapter, empty ones last),
    ``tiles`` int32 ``(T, 3)`` rows ``(adapter, start in token_order, length)``, ``slot_tiles`` the tile
    count of each slot, ``block_m`` the tile height (1: decode), ``max_adapter_id`` (-1 if none);
    ``reference_plan`` the reference's grouping (built for CPU metadata; None on CUDA, where the
    kernels never need it); ``segments`` int32 ``(S, max_adapter_id + 1, 2)``: per slot and adapter id, where its
    tokens lie in that slot's ``token_order`` (``start``, ``count``; count 0 for an id the slot does not name), what
    the backward's per-adapter reductions (``fastpeft.ops.multi_lora_grad``) loop over."""

    slot_ids: torch.Tensor
    slot_weights: torch.Tensor
    token_order: torch.Tensor
    tiles: torch.Tensor
    slot_tiles: tuple
    block_m: int
    max_adapter_id: int
    reference_plan: Optional[MultiLoraGrouping] = None
    segments: Optional[torch.Tensor] = None

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
        steps, where the reference keeps per-layer gathered factors."""
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
        orders, tiles, slot_tiles, segments = [], [], [], []
        for ids in slot_ids.t():
            # empty slots sort last; stable so tokens of one adapter keep their batch order
            key = torch.where(ids < 0, torch.iinfo(torch.int32).max, ids)
            order = torch.sort(key, stable=True).indices
            orders.append(order.to(torch.int32))
            adapters, counts = torch.unique_consecutive(key[order], return_counts=True)
            count = 0
            start = 0
            slot_segments = [(0, 0)] * (max_id + 1)
            for adapter, length in zip(adapters.tolist(), counts.tolist()):
                if adapter != torch.iinfo(torch.int32).max:
                    slot_segments[adapter] = (start, length)
                    for tile_start in range(start, start + length, block_m):
                        tiles.append((adapter, tile_start, min(block_m, start + length - tile_start)))
                        count += 1
                start += length
            slot_tiles.append(count)
            segments.append(slot_segments)
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
            reference_plan=None if device.type == "cuda" else MultiLoraGrouping.build(slot_ids, slot_weights,
                                                                                      reference_cache),
            segments=torch.tensor(segments, dtype=torch.int32, device=device).reshape(len(segments), max_id + 1, 2),
        )


def _launch(y, x, bank: LoraBank, meta: MultiLoraMeta) -> None:
    from ..kernels.multi_lora import multi_lora_add_ as kernel

    kernel(y, x, bank.lora_a, bank.lora_b, bank.ranks, bank.scalings, meta.slot_weights, meta.token_order, meta.tiles,
           list(meta.slot_tiles), meta.block_m, meta.max_adapter_id)


def _reference(y, x, bank: LoraBank, meta: MultiLoraMeta) -> None:
    reference.multi_lora_add_(y, x, bank, meta.slot_ids, meta.slot_weights, meta.reference_plan)


def _from_op_args(y, x, lora_a, lora_b, ranks, scalings, slot_ids, slot_weights, token_order, tiles, slot_tiles,
                  block_m, max_adapter_id) -> tuple:
    return y, x, LoraBank(lora_a, lora_b, ranks, scalings), MultiLoraMeta(
        slot_ids, slot_weights, token_order, tiles, tuple(slot_tiles), block_m, max_adapter_id)


def _fake(y, x, lora_a, lora_b, ranks, scalings, slot_ids, slot_weights, token_order, tiles, slot_tiles, block_m,
          max_adapter_id):
    return None


_multi_lora_add_op = register_primitive(
    "multi_lora_add_",
    "(Tensor(a!) y, Tensor x, Tensor lora_a, Tensor lora_b, Tensor ranks, Tensor scalings, Tensor slot_ids, "
    "Tensor slot_weights, Tensor token_order, Tensor tiles, int[] slot_tiles, int block_m, int max_adapter_id) -> ()",
    _fake, _launch, _reference, _from_op_args, lambda result, args: None)


def multi_lora_add_(y: torch.Tensor, x: torch.Tensor, bank: LoraBank, meta: MultiLoraMeta) -> torch.Tensor:
    """``y += Σ_j w[:, j] · s_k · (x A_kᵀ) B_kᵀ`` in place for ``x`` ``(M, in)``, ``y`` ``(M, out)`` (one dtype),
    with the adapters of ``bank`` (a :class:`fastpeft.bank.LoraBank` in ``x``'s dtype, or fp32 with bf16 /
    fp16 ``x``) chosen per token by ``meta``; returns ``y``."""
    if meta.num_tokens != x.shape[0]:
        raise ValueError(f"metadata is for {meta.num_tokens} tokens, x has {x.shape[0]}")
    if meta.max_adapter_id >= bank.num_adapters:
        raise ValueError(f"adapter id {meta.max_adapter_id} out of range: the bank holds {bank.num_adapters} "
                         f"adapters (ids -1..{bank.num_adapters - 1})")
    if eager_reference(x.device):
        return reference.multi_lora_add_(y, x, bank, meta.slot_ids, meta.slot_weights, meta.reference_plan)
    _multi_lora_add_op(y, x, bank.lora_a, bank.lora_b, bank.ranks, bank.scalings, meta.slot_ids, meta.slot_weights,
                       meta.token_order, meta.tiles, list(meta.slot_tiles), meta.block_m, meta.max_adapter_id)
    return y
