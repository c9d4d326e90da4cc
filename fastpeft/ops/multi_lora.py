"""Multi-LoRA as a ``torch.library`` custom op (``fastpeft::multi_lora_add_``), plus its batch metadata.

:class:`MultiLoraMeta` is computed once per batch (and per token count: prefill and each decode step)
and passed to every adapted layer: per token the adapter slots ``(k, w)`` (``S`` slots; a weighted
combination of adapters uses several), and for the Triton kernels the tokens grouped by adapter
(``token_order``, a permutation: the batch is never reordered) cut into tiles. On CPU the op runs
``fastpeft.reference.multi_lora_delta``; inference only (no autograd).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import reference
from .dispatch import backend_for, run_kernel

# Tokens per prefill tile: 16 is tl.dot's minimum. Untuned: no GPU in this task.
PREFILL_BLOCK_M = 16


@dataclass(frozen=True)
class MultiLoraMeta:
    """Per-batch metadata. ``slot_ids`` int32 ``(M, S)`` (``-1`` = empty slot), ``slot_weights`` fp32
    ``(M, S)``; ``token_order`` int32 ``(S, M)`` (per slot, tokens sorted by adapter, empty ones last),
    ``tiles`` int32 ``(T, 3)`` rows ``(adapter, start in token_order, length)``, ``slot_tiles`` the tile
    count of each slot, ``block_m`` the tile height (1: decode), ``max_adapter_id`` (-1 if none)."""

    slot_ids: torch.Tensor
    slot_weights: torch.Tensor
    token_order: torch.Tensor
    tiles: torch.Tensor
    slot_tiles: tuple
    block_m: int
    max_adapter_id: int

    @property
    def num_tokens(self) -> int:
        return self.slot_ids.shape[0]

    @classmethod
    def build(cls, slot_ids: torch.Tensor, slot_weights: Optional[torch.Tensor] = None,
              decode: bool = False) -> "MultiLoraMeta":
        """From ``slot_ids`` int ``(M,)`` or ``(M, S)`` and optional ``slot_weights`` of the same shape.
        ``decode=True`` (one token per sequence) picks one-token tiles (GEMV); otherwise tokens of one
        adapter are tiled ``PREFILL_BLOCK_M`` at a time."""
        if slot_ids.dim() == 1:
            slot_ids = slot_ids[:, None]
            slot_weights = None if slot_weights is None else slot_weights[:, None]
        if slot_ids.dim() != 2 or slot_ids.dtype.is_floating_point:
            raise ValueError(f"slot_ids must be integer (M,) or (M, S), got {slot_ids.dtype} {tuple(slot_ids.shape)}")
        if slot_weights is None:
            slot_weights = torch.ones(slot_ids.shape, dtype=torch.float32, device=slot_ids.device)
        if slot_weights.shape != slot_ids.shape:
            raise ValueError(f"slot_weights shape {tuple(slot_weights.shape)} != slot_ids shape {tuple(slot_ids.shape)}")
        min_id = int(slot_ids.min()) if slot_ids.numel() else -1
        if min_id < -1:
            raise ValueError(f"adapter ids must be >= -1, got {min_id}")
        block_m = 1 if decode else PREFILL_BLOCK_M
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
        return cls(
            slot_ids=slot_ids,
            slot_weights=slot_weights.to(torch.float32).contiguous(),
            token_order=torch.stack(orders) if orders else torch.empty(0, 0, dtype=torch.int32, device=device),
            tiles=torch.tensor(tiles, dtype=torch.int32, device=device).reshape(-1, 3),
            slot_tiles=tuple(slot_tiles),
            block_m=block_m,
            max_adapter_id=int(slot_ids.max()) if slot_ids.numel() else -1,
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
        rank_list = ranks.tolist()
        lora_as = [lora_a[k, :r] for k, r in enumerate(rank_list)]
        lora_bs = [lora_b[k, :, :r] for k, r in enumerate(rank_list)]
        reference.multi_lora_delta(x, lora_as, lora_bs, scalings.tolist(), slot_ids, slot_weights, out=y)

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
    """``y += Σ_j w[:, j] · s_k · (x A_kᵀ) B_kᵀ`` in place for ``x`` ``(M, in)``, ``y`` ``(M, out)``, with the
    adapters of ``bank`` (a :class:`fastpeft.bank.LoraBank`) chosen per token by ``meta``; returns ``y``."""
    if meta.num_tokens != x.shape[0]:
        raise ValueError(f"metadata is for {meta.num_tokens} tokens, x has {x.shape[0]}")
    if meta.max_adapter_id >= bank.num_adapters:
        raise ValueError(f"adapter id {meta.max_adapter_id} out of range: the bank holds {bank.num_adapters} "
                         f"adapters (ids -1..{bank.num_adapters - 1})")
    _multi_lora_add_op(y, x, bank.lora_a, bank.lora_b, bank.ranks, bank.scalings, meta.slot_ids, meta.slot_weights,
                       meta.token_order, meta.tiles, list(meta.slot_tiles), meta.block_m, meta.max_adapter_id)
    return y
