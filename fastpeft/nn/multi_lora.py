"""``MultiLoraLinear``: one base linear layer (dense ``nn.Linear`` or bitsandbytes NF4 ``Linear4bit``), many
adapters, each token (or row) choosing its own — or a weighted combination of several.

The base layer runs once for the whole batch (its own forward, so a dense or NF4 base gives exactly what
the base model gives). The LoRA terms are added per token by ``fastpeft.ops.multi_lora_add_`` from the
layer's :class:`~fastpeft.bank.LoraBank`. DoRA and IA3 adapters become per-token vectors around the base
call: ``y = g ⊙ base(x ⊙ l_in) + (c − g) ⊙ b + g ⊙ lora`` with ``g`` the DoRA ``m/n`` or IA3 output scale,
``c`` the bias scale (``g`` for IA3, 1 for DoRA) and ``l_in`` feed-forward IA3's input scale (all ones
for tokens whose adapter has none). Inference only.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch
import torch.nn as nn

from ..bank import AdapterBank, LoraBank
from ..ops.multi_lora import MultiLoraMeta, multi_lora_add_

__all__ = ["MultiLoraBatch", "MultiLoraLinear", "serving_batch", "add_lora_terms"]

# The batch a call of the wrapped model serves, read by every MultiLoraLinear it reaches. A context variable, not
# module state: each thread (and each asyncio task) sees only the batch of its own call, so concurrent calls of
# one model serve each their own rows.
_SERVED_BATCH: contextvars.ContextVar = contextvars.ContextVar("fastpeft_served_batch", default=None)


@contextlib.contextmanager
def serving_batch(batch: "MultiLoraBatch") -> Iterator[None]:
    """Every :class:`MultiLoraLinear` called inside the block (in this thread or task) without a ``batch``
    argument uses ``batch``."""
    token = _SERVED_BATCH.set(batch)
    try:
        yield
    finally:
        _SERVED_BATCH.reset(token)


class MultiLoraBatch:
    """Which adapters each row of a batch uses, against one (immutable) :class:`AdapterBank`.

    ``slot_ids`` int ``(B, S)`` (``-1``: empty slot; a row with no adapter has only empty slots),
    ``slot_weights`` float ``(B, S)``. Every token of row ``b`` uses row ``b``'s slots. The per-token
    :class:`MultiLoraMeta` is built once per token layout (prefill, then each decode step's shape) and
    shared by every layer.
    """

    def __init__(self, bank: AdapterBank, slot_ids: torch.Tensor, slot_weights: Optional[torch.Tensor] = None):
        if slot_ids.dim() == 1:
            slot_ids = slot_ids[:, None]
            slot_weights = None if slot_weights is None else slot_weights[:, None]
        if slot_ids.numel() and int(slot_ids.max()) >= len(bank.names):
            raise ValueError(f"adapter id {int(slot_ids.max())} out of range: the bank holds {len(bank.names)} adapters")
        self.bank = bank
        self.slot_ids = slot_ids
        self.slot_weights = torch.ones(slot_ids.shape) if slot_weights is None else slot_weights
        self._metas: dict = {}
        self._reference_cache: dict = {}  # the CPU path's per-layer gathered factors, shared by prefill and decode
        self._repeated: dict = {}  # times -> the batch repeated() gave (reused with its metadata)

    @property
    def num_rows(self) -> int:
        return self.slot_ids.shape[0]

    def repeated(self, times: int) -> "MultiLoraBatch":
        """The same choice with each row repeated ``times`` times, copies next to each other (how
        ``generate`` expands a batch for beams or several return sequences)."""
        if times not in self._repeated:
            self._repeated[times] = MultiLoraBatch(self.bank, self.slot_ids.repeat_interleave(times, dim=0),
                                                   self.slot_weights.repeat_interleave(times, dim=0))
        return self._repeated[times]

    def meta(self, lead_shape: tuple, device: torch.device) -> MultiLoraMeta:
        """Metadata for an activation of shape ``(B, T, ...)`` or ``(B, ...)`` (``lead_shape`` = all but the
        feature dim); ``T == 1`` is a decode step."""
        key = (lead_shape, device)  # read by every layer at every step: no str(device), one dict lookup
        meta = self._metas.get(key)
        if meta is None:
            if not lead_shape or lead_shape[0] != self.num_rows:
                raise ValueError(f"activation leading shape {tuple(lead_shape)} does not start with the batch's "
                                 f"{self.num_rows} rows")
            tokens_per_row = 1
            for d in lead_shape[1:]:
                tokens_per_row *= d
            ids = self.slot_ids.to(device).repeat_interleave(tokens_per_row, dim=0)
            weights = self.slot_weights.to(device).repeat_interleave(tokens_per_row, dim=0)
            meta = self._metas[key] = MultiLoraMeta.build(ids, weights, decode=tokens_per_row == 1,
                                                          reference_cache=self._reference_cache)
        return meta


def _per_token(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` ``(N, d)`` picked by ``ids`` ``(M,)``; id ``-1`` picks a row of ones."""
    ones = torch.ones(1, table.shape[1], dtype=table.dtype, device=table.device)
    return torch.cat([table, ones])[ids.long()]


def add_lora_terms(y: torch.Tensor, x_tokens: torch.Tensor, bank: LoraBank, meta: MultiLoraMeta) -> torch.Tensor:
    """``y`` ``(M, out)`` plus every token's LoRA terms, ``fastpeft.ops.multi_lora_add_`` over ``x_tokens``
    ``(M, in)`` with the adapters of ``bank`` that ``meta`` gives each token: in place when the op takes the dtypes
    (a bank in ``x``'s dtype, or an fp32 bank on bf16 / fp16 activations), else in the bank's dtype, then cast to
    ``y``'s."""
    if bank.max_rank == 0:
        return y
    lora_dtype = bank.lora_a.dtype
    if y.dtype == x_tokens.dtype and lora_dtype in (x_tokens.dtype, torch.float32):
        return multi_lora_add_(y, x_tokens, bank, meta)
    delta = torch.zeros(y.shape, dtype=lora_dtype, device=y.device)
    return y + multi_lora_add_(delta, x_tokens.to(lora_dtype), bank, meta).to(y.dtype)


class MultiLoraLinear(nn.Module):
    """A base linear layer plus per-token adapters from ``batch.bank.layers[path]``.

    ``base_layer``: ``nn.Linear`` or ``bitsandbytes.nn.Linear4bit`` (kept as is, frozen). ``path``: this
    layer's name in the model (the key of its :class:`LoraBank`). ``forward(x, batch)`` with ``x``
    ``(B, ..., in)``; without a batch (the argument, or the one :func:`serving_batch` serves in this thread,
    as ``MultiLoraModel`` does for the duration of a call) it is the base layer alone.
    """

    def __init__(self, base_layer: nn.Module, path: str):
        super().__init__()
        self.base_layer = base_layer
        self.path = path
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def forward(self, x: torch.Tensor, batch: Optional[MultiLoraBatch] = None) -> torch.Tensor:
        batch = _SERVED_BATCH.get() if batch is None else batch
        bank: Optional[LoraBank] = None if batch is None else batch.bank.layers.get(self.path)
        base_layer = self._modules["base_layer"]
        if bank is None:
            return base_layer(x)
        meta = batch.meta(x.shape[:-1], x.device)
        x_tokens = x.reshape(-1, self.in_features)
        if bank.in_scale is None and bank.out_scale is None:  # LoRA adapters only: the base layer on x as it is
            base_out = base_layer(x)
            y = base_out.reshape(-1, self.out_features)
            y_sum = add_lora_terms(y, x_tokens, bank, meta)
            if y_sum is y and y.data_ptr() == base_out.data_ptr():
                return base_out  # the terms went into the base output in place (y is a view of it)
            return y_sum.reshape(*x.shape[:-1], self.out_features)
        ids = meta.slot_ids[:, 0]  # DoRA / IA3 never share a row with another adapter
        # DoRA's and IA3's vectors apply in their own dtype (fp32 adapters on a bf16 model, as PEFT), one final
        # rounding: PEFT's IA3 scales x (or the output) in fp32 and casts; its DoRA sums in fp32 and casts
        x_base = x_tokens if bank.in_scale is None else (x_tokens * _per_token(bank.in_scale, ids)).to(x.dtype)
        y = base_layer(x_base.reshape(x.shape)).reshape(-1, self.out_features)
        if bank.out_scale is None:
            return add_lora_terms(y, x_tokens, bank, meta).reshape(*x.shape[:-1], self.out_features)
        scale = _per_token(bank.out_scale, ids)
        out_dtype = y.dtype
        y = scale * add_lora_terms(y.to(torch.promote_types(out_dtype, scale.dtype)), x_tokens, bank, meta)
        bias = getattr(base_layer, "bias", None)
        if bias is not None:
            y = y + (_per_token(bank.bias_scale, ids) - scale) * bias
        return y.to(out_dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, in_features={self.in_features}, out_features={self.out_features}"
