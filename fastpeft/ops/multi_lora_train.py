"""Many LoRA adapters trained at once in one mixed batch: the multi-LoRA term as an autograd op.

Token ``t`` carries adapter ``k = idx[t]`` (``-1``: none) of ``K`` adapters of their own ranks ``r_k`` and
scalings ``s_k``; the op returns the term ``delta[t] = s_k · (drop_k(x[t]) A_kᵀ) B_kᵀ`` ``(M, out)`` in the adapters'
dtype (zeros for tokens of no adapter). The base output is the caller's, computed once for the whole batch by the
base op (which gives ``x`` the base part of its gradient once); the caller adds the term to it.

Forward: ``h = shrink(drop(x))`` ``(M, R)`` (``R`` the largest rank; token ``t``'s first ``r_k`` columns are
``drop_k(x[t]) A_kᵀ``, the rest zeros, no scaling), kept for backward, and the term by the ``multi_lora_add_``
primitive. Backward, per adapter over its own tokens (``fastpeft/DESIGN.md``, "multi-adapter training"):

- ``g = dy B_k``: the shrink of ``dy`` over the transposed bank (``lora_a' = B_kᵀ``, ``lora_b' = A_kᵀ``);
- ``dB_k = s_k · dyᵀ h`` and ``dA_k = s_k · gᵀ drop_k(x)``: grouped products over each adapter's token segment;
- ``dx = drop_k'(s_k · g A_k)``: ``multi_lora_add_`` of ``dy`` over the transposed bank, masked.

Saved for backward: ``x`` (the base op keeps it alive anyway), ``h`` and the packed bank (a copy of the adapters'
factors, the size of the parameters, held on the context: packed from detached parameters, it is no autograd input). Dropout: each adapter's mask is drawn on its own tokens, in batch order, as
``(n_k, in)`` — the shape and memory order of PEFT's mask for the sub-batch of those rows (``x[rows]``, contiguous)
— from the adapter's own ``torch.Generator`` when it has one (so a run seeded per adapter draws exactly the masks
PEFT draws training that adapter alone from that seed), else from the global RNG, adapter after adapter in bank
order. Neither the mask nor ``drop(x)`` is stored: the generator state before each draw is, and backward redraws the
mask from it, leaving the generators where they are.

An adapter with no token in the batch gets ``None`` as its gradient (PEFT training it alone on these rows would not
run it at all, so an optimizer then skips it: no weight decay, no moment update). Every other adapter gets exactly
the gradient of its own tokens.

Every product is a device primitive: ``multi_lora_add_`` (:mod:`fastpeft.ops.multi_lora`), ``multi_lora_shrink`` and
``multi_lora_segment_grad`` (:mod:`fastpeft.ops.multi_lora_grad`), over the bank and its ``transposed()`` view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..adapters import ModuleAdapter
from ..bank import LoraBank
from .multi_lora import MultiLoraMeta, multi_lora_add_
from .multi_lora_grad import multi_lora_segment_grad, multi_lora_shrink

__all__ = ["AdapterDropout", "dropout_mask", "multi_lora_train_term", "token_segments"]


@dataclass(frozen=True)
class AdapterDropout:
    """One adapter's LoRA dropout in training: rate ``p`` (``0 <= p < 1``) and the generator its masks are drawn
    from (None: the global RNG of the activations' device)."""

    p: float = 0.0
    generator: Optional[torch.Generator] = None


def token_segments(meta: MultiLoraMeta) -> tuple:
    """``((k, tokens), ...)`` for every adapter ``k`` with a token in ``meta`` (one slot per token), ``tokens`` the
    int64 indices of its tokens in batch order: its span of ``meta.token_order`` (the tokens sorted by adapter,
    stable) as ``meta.segments`` gives it."""
    if meta.slot_ids.shape[1] != 1 or meta.segments is None:
        raise ValueError(f"training takes metadata of one adapter per token from MultiLoraMeta.build, got "
                         f"{meta.slot_ids.shape[1]} slots")
    order = meta.token_order[0].long()
    return tuple((k, order[start:start + length]) for k, (start, length) in enumerate(meta.segments[0].tolist())
                 if length)


def _rng_state(device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is not None:
        return generator.get_state()
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def dropout_mask(shape: tuple, p: float, dtype: torch.dtype, device: torch.device,
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """``nn.Dropout(p)``'s scaled Bernoulli mask of ``shape`` (bitwise ``F.dropout``'s noise from the same state)."""
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)


def _redraw_mask(shape: tuple, p: float, dtype: torch.dtype, device: torch.device,
                 generator: Optional[torch.Generator], state: torch.Tensor) -> torch.Tensor:
    """The mask :func:`dropout_mask` drew from ``state``, leaving the generator (or global RNG) where it is."""
    if generator is not None:
        replay = torch.Generator(device=device)
        replay.set_state(state)
        return dropout_mask(shape, p, dtype, device, replay)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        return dropout_mask(shape, p, dtype, device, None)


def _dropped(x: torch.Tensor, segments: tuple, dropouts: tuple, states: Optional[list]) -> tuple:
    """``(drop(x), masks)``: ``x`` with each adapter's tokens multiplied by its mask (a copy only when one has
    dropout), and ``[(tokens, mask)]`` of those adapters. ``states`` None: draw the masks and append each draw's
    RNG state to a new list, returned third; else redraw them from ``states``."""
    masks, drawn = [], [] if states is None else None
    x_lora = x
    for k, tokens in segments:
        dropout = dropouts[k]
        if dropout.p <= 0.0:
            continue
        shape = (tokens.shape[0], x.shape[1])
        if states is None:
            drawn.append(_rng_state(x.device, dropout.generator))
            mask = dropout_mask(shape, dropout.p, x.dtype, x.device, dropout.generator)
        else:
            mask = _redraw_mask(shape, dropout.p, x.dtype, x.device, dropout.generator, states[len(masks)])
        if x_lora is x:
            x_lora = x.clone()
        x_lora[tokens] = x_lora.index_select(0, tokens) * mask
        masks.append((tokens, mask))
    return x_lora, masks, drawn


class MultiLoraTrainFunction(torch.autograd.Function):
    """The term ``(M, out)`` for ``x2d`` ``(M, in)`` in the adapters' dtype and the adapters' factors
    ``lora_as[k]`` ``(r_k, in)``, ``lora_bs[k]`` ``(out, r_k)`` given flat (``*factors`` = ``A_0 … A_{K-1}, B_0 …
    B_{K-1}``); see the module docstring."""

    @staticmethod
    def forward(ctx, x2d, meta, segments, scalings, dropouts, *factors):
        num = len(factors) // 2
        lora_as, lora_bs = factors[:num], factors[num:]
        out_features, in_features = lora_bs[0].shape[0], x2d.shape[1]
        adapters = [ModuleAdapter(lora_a=a, lora_b=b, scaling=s) for a, b, s in zip(lora_as, lora_bs, scalings)]
        bank = LoraBank.pack(adapters, in_features, out_features, x2d.dtype, x2d.device, rank_limit=None)
        x_lora, _, states = _dropped(x2d, segments, dropouts, None)
        h = multi_lora_shrink(x_lora, bank, meta)
        delta = multi_lora_add_(x2d.new_zeros(x2d.shape[0], out_features), x_lora, bank, meta)
        ctx.meta, ctx.segments, ctx.dropouts, ctx.states, ctx.bank = meta, segments, dropouts, states, bank
        ctx.ranks = [a.shape[0] for a in lora_as]
        ctx.save_for_backward(x2d, h)
        return delta

    @staticmethod
    def backward(ctx, dy):
        x2d, h = ctx.saved_tensors
        bank, meta, segments = ctx.bank, ctx.meta, ctx.segments
        num = len(ctx.ranks)
        dy = dy.to(x2d.dtype).contiguous()
        transposed = bank.transposed()
        needs_dx, needs_factors = ctx.needs_input_grad[0], any(ctx.needs_input_grad[5:])
        x_lora, masks, _ = _dropped(x2d, segments, ctx.dropouts, ctx.states)
        grads = [None] * (2 * num)
        if needs_factors:
            g = multi_lora_shrink(dy, transposed, meta)
            d_lora_b = multi_lora_segment_grad(dy, h, bank, meta, "lora_b")
            d_lora_a = multi_lora_segment_grad(g, x_lora, bank, meta, "lora_a")
            for k, _ in segments:
                rank = ctx.ranks[k]
                grads[k] = d_lora_a[k, :rank] if ctx.needs_input_grad[5 + k] else None
                grads[num + k] = d_lora_b[k, :, :rank] if ctx.needs_input_grad[5 + num + k] else None
        dx = None
        if needs_dx:
            dx = multi_lora_add_(torch.zeros_like(x2d), dy, transposed, meta)
            for tokens, mask in masks:
                dx[tokens] = dx.index_select(0, tokens) * mask
        return (dx, None, None, None, None, *grads)


def multi_lora_train_term(x2d: torch.Tensor, lora_as: Sequence[torch.Tensor], lora_bs: Sequence[torch.Tensor],
                          scalings: Sequence[float], meta: MultiLoraMeta,
                          dropouts: Optional[Sequence[AdapterDropout]] = None,
                          segments: Optional[tuple] = None) -> torch.Tensor:
    """The multi-LoRA term ``s_k · (drop_k(x) A_kᵀ) B_kᵀ`` per token, differentiable in ``x2d`` and every factor.

    ``x2d`` ``(M, in)`` (cast to the adapters' dtype, as PEFT casts a sub-batch); ``lora_as[k]`` ``(r_k, in)``,
    ``lora_bs[k]`` ``(out, r_k)``, one floating dtype for all, on ``x2d``'s device; ``scalings[k]`` a float;
    ``meta`` a :class:`~fastpeft.ops.multi_lora.MultiLoraMeta` of one slot per token with ids in ``-1..K-1``;
    ``dropouts[k]`` an :class:`AdapterDropout` (default: none); ``segments``: :func:`token_segments` of ``meta``
    when the caller has it. Returns ``(M, out)`` in the adapters' dtype."""
    num = len(lora_as)
    if num == 0 or len(lora_bs) != num or len(scalings) != num:
        raise ValueError(f"need one lora_a, lora_b and scaling per adapter, got {len(lora_as)}, {len(lora_bs)}, "
                         f"{len(scalings)}")
    if x2d.dim() != 2:
        raise ValueError(f"x2d must be (M, in), got {tuple(x2d.shape)}")
    dtype = lora_as[0].dtype
    out_features = lora_bs[0].shape[0]
    for k, (a, b) in enumerate(zip(lora_as, lora_bs)):
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != x2d.shape[1] or b.shape != (out_features, a.shape[0]):
            raise ValueError(f"adapter {k}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} must be "
                             f"(r, {x2d.shape[1]}) and ({out_features}, r)")
        if a.dtype != dtype or b.dtype != dtype:
            raise TypeError(f"adapter {k}: factors {a.dtype} / {b.dtype}, the others {dtype}: one dtype for all")
        if a.device != x2d.device or b.device != x2d.device:
            raise ValueError(f"adapter {k}: factors on {a.device} / {b.device}, x on {x2d.device}")
    if meta.num_tokens != x2d.shape[0]:
        raise ValueError(f"metadata is for {meta.num_tokens} tokens, x has {x2d.shape[0]}")
    if meta.max_adapter_id >= num:
        raise ValueError(f"adapter id {meta.max_adapter_id} out of range for {num} adapters")
    dropouts = tuple(dropouts) if dropouts is not None else (AdapterDropout(),) * num
    if len(dropouts) != num or any(not 0.0 <= d.p < 1.0 for d in dropouts):
        raise ValueError(f"need one AdapterDropout with 0 <= p < 1 per adapter, got {dropouts}")
    segments = token_segments(meta) if segments is None else segments
    return MultiLoraTrainFunction.apply(x2d.to(dtype), meta, segments, tuple(float(s) for s in scalings), dropouts,
                                        *lora_as, *lora_bs)
