"""Multi-adapter LoRA training: the backward's device primitives (``fastpeft::multi_lora_shrink``,
``fastpeft::multi_lora_segment_grad``).

K adapters train at once over one frozen base in one mixed batch: token ``t`` uses adapter ``k = idx[t]`` (``-1``:
none; one slot per token, with the metadata's slot weight ``w_t``, 1 unless given). The forward is
``fastpeft.ops.multi_lora_add_``. The backward, per adapter over its own tokens, composed of these primitives:

- ``h = multi_lora_shrink(x, bank, meta)`` and ``g = multi_lora_shrink(dy, bank.transposed(), meta)``:
  ``x A_kᵀ`` and ``dy B_k`` per token, ``(M, R)``, unscaled (``s_k`` and ``w_t`` are applied where they are consumed);
- ``dB = multi_lora_segment_grad(dy, h, bank, meta, "lora_b")`` ``(N, out, R)``: ``s_k Σ w_t dy_tᵀ h_t``, and
  ``dA = multi_lora_segment_grad(g, x, bank, meta, "lora_a")`` ``(N, R, in)``: ``s_k Σ w_t g_tᵀ x_t``; the shapes of
  ``bank.lora_b`` / ``bank.lora_a``, zero beyond each adapter's rank and for adapters without tokens;
- ``multi_lora_add_(dx, dy, bank.transposed(), meta)``: ``dx += w_t s_k g_t A_k`` (the base's ``dy W`` is the
  caller's, once for the whole batch).

Each is declared once (:func:`fastpeft.ops.dispatch.register_primitive`): the CUDA kernel is the Triton launcher of
``fastpeft.kernels.multi_lora_grad``, the CPU kernel the ``fastpeft.reference`` function of the same name; eager calls
on the reference backend call the reference directly. The metadata is a :class:`~fastpeft.ops.multi_lora.MultiLoraMeta`
from ``build`` with one slot (its ``segments`` locate each adapter's tokens); the batch is never reordered.
"""

from __future__ import annotations

import torch

from .. import reference
from ..bank import LoraBank
from .dispatch import eager_reference, register_primitive
from .multi_lora import MultiLoraMeta

__all__ = ["multi_lora_shrink", "multi_lora_segment_grad"]


def _check_meta(rows: int, bank: LoraBank, meta: MultiLoraMeta) -> None:
    """``meta`` describes ``rows`` tokens with one slot each, names adapters of ``bank`` only and has segments."""
    if meta.num_tokens != rows:
        raise ValueError(f"metadata is for {meta.num_tokens} tokens, the activations have {rows}")
    if meta.slot_ids.shape[1] != 1 or len(meta.slot_tiles) != 1:
        raise ValueError(f"the multi-LoRA backward takes one adapter slot per token, the metadata has "
                         f"{meta.slot_ids.shape[1]}")
    if meta.segments is None:
        raise ValueError("the metadata has no segments: build it with MultiLoraMeta.build")
    if meta.max_adapter_id >= bank.num_adapters:
        raise ValueError(f"adapter id {meta.max_adapter_id} out of range: the bank holds {bank.num_adapters} "
                         f"adapters (ids -1..{bank.num_adapters - 1})")


# ------------------------------------------------------------------------------------------------ multi_lora_shrink
def _shrink_launch(x, lora_a, ranks, slot_ids, token_order, tiles, block_m, max_adapter_id):
    from ..kernels.multi_lora_grad import multi_lora_shrink as kernel

    return kernel(x, lora_a, ranks, token_order, tiles, block_m, max_adapter_id)


def _shrink_reference(x, lora_a, ranks, slot_ids, token_order, tiles, block_m, max_adapter_id):
    return reference.multi_lora_shrink(x, lora_a, ranks, slot_ids)


def _shrink_fake(x, lora_a, ranks, slot_ids, token_order, tiles, block_m, max_adapter_id):
    return x.new_empty(x.shape[0], lora_a.shape[1], dtype=lora_a.dtype)


_shrink_op = register_primitive(
    "multi_lora_shrink",
    "(Tensor x, Tensor lora_a, Tensor ranks, Tensor slot_ids, Tensor token_order, Tensor tiles, int block_m, "
    "int max_adapter_id) -> Tensor",
    _shrink_fake, _shrink_launch, _shrink_reference, lambda *args: args)


def multi_lora_shrink(x: torch.Tensor, bank: LoraBank, meta: MultiLoraMeta) -> torch.Tensor:
    """``h`` ``(M, R)`` in the bank's dtype: ``h[t, :r_k] = x[t] A_k[:r_k]ᵀ`` for token ``t``'s adapter ``k``, zeros
    in the other columns and in rows without an adapter; unscaled. ``x`` ``(M, in)`` in the bank's dtype, or bf16 /
    fp16 with an fp32 bank (PEFT's fp32 adapters; ``x`` is converted, ``h`` stays fp32). ``g = dy B_k`` is
    ``multi_lora_shrink(dy, bank.transposed(), meta)``."""
    if x.dim() != 2 or x.shape[1] != bank.lora_a.shape[2]:
        raise ValueError(f"x must be (M, {bank.lora_a.shape[2]}) for lora_a {tuple(bank.lora_a.shape)}, got "
                         f"{tuple(x.shape)}")
    _check_meta(x.shape[0], bank, meta)
    if eager_reference(x.device):
        return reference.multi_lora_shrink(x, bank.lora_a, bank.rank_list, meta.slot_ids)
    return _shrink_op(x, bank.lora_a, bank.ranks, meta.slot_ids, meta.token_order, meta.tiles, meta.block_m,
                      meta.max_adapter_id)


# ----------------------------------------------------------------------------------------- multi_lora_segment_grad
def _grad_launch(left, right, ranks, scalings, slot_ids, slot_weights, token_order, segments, which):
    from ..kernels.multi_lora_grad import multi_lora_segment_grad as kernel

    return kernel(left, right, ranks, scalings, slot_weights, token_order, segments, which)


def _grad_reference(left, right, ranks, scalings, slot_ids, slot_weights, token_order, segments, which):
    return reference.multi_lora_segment_grad(left, right, ranks, scalings, slot_ids, slot_weights, which)


def _grad_fake(left, right, ranks, scalings, slot_ids, slot_weights, token_order, segments, which):
    return left.new_empty(ranks.shape[0], left.shape[1], right.shape[1],
                          dtype=torch.promote_types(left.dtype, right.dtype))


_grad_op = register_primitive(
    "multi_lora_segment_grad",
    "(Tensor left, Tensor right, Tensor ranks, Tensor scalings, Tensor slot_ids, Tensor slot_weights, "
    "Tensor token_order, Tensor segments, str which) -> Tensor",
    _grad_fake, _grad_launch, _grad_reference, lambda *args: args)


def multi_lora_segment_grad(left: torch.Tensor, right: torch.Tensor, bank: LoraBank, meta: MultiLoraMeta,
                            which: str) -> torch.Tensor:
    """``out[k] = s_k · Σ_{t of adapter k} w_t · left[t]ᵀ right[t]``, ``(N, P, Q)`` in the promoted dtype of ``left``
    ``(M, P)`` and ``right`` ``(M, Q)``, fp32 accumulation, one rounding. ``which="lora_b"``: ``dB`` from ``left = dy``
    ``(M, out)``, ``right = h`` ``(M, R)``, the shape of ``bank.lora_b``; ``which="lora_a"``: ``dA`` from ``left = g``
    ``(M, R)``, ``right = x`` ``(M, in)``, the shape of ``bank.lora_a``. Exactly zero at and beyond each adapter's
    rank, whatever the rank operand holds in those columns, and for adapters without tokens; deterministic (the
    same sum order at every run)."""
    if which not in reference.MULTI_LORA_GRADS:
        raise ValueError(f"which must be one of {reference.MULTI_LORA_GRADS}, got {which!r}")
    if left.dim() != 2 or right.dim() != 2 or left.shape[0] != right.shape[0]:
        raise ValueError(f"left and right must be (M, P) and (M, Q), got {tuple(left.shape)} and {tuple(right.shape)}")
    rank_side, name = (left, "left") if which == "lora_a" else (right, "right")
    if rank_side.shape[1] != bank.max_rank:
        raise ValueError(f"{which}'s gradient takes the rank operand as {name}: its {rank_side.shape[1]} columns must "
                         f"be the bank's largest rank {bank.max_rank}")
    _check_meta(left.shape[0], bank, meta)
    if eager_reference(left.device):
        return reference.multi_lora_segment_grad(left, right, bank.rank_list, bank.scalings, meta.slot_ids,
                                                 meta.slot_weights, which)
    return _grad_op(left, right, bank.ranks, bank.scalings, meta.slot_ids, meta.slot_weights, meta.token_order,
                    meta.segments, which)
