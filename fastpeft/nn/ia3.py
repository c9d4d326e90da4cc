"""``IA3Linear``: IA3 on a dense or NF4 base, numerically PEFT's ``ia3.Linear`` / ``ia3.Linear4bit``,
computed by ``fastpeft.ops.ia3_linear``.

``is_feedforward=True`` scales the input, ``y = (x ⊙ l) Wᵀ + b``; otherwise the output,
``y = (x Wᵀ + b) ⊙ l`` (PEFT's rule). ``ia3_l`` is the flat vector the product broadcasts, ``(in,)`` or
``(out,)``. PEFT keeps it as ``(1, in)`` or ``(out, 1)`` and flattens it at every call: a view, recorded by
autograd, and a backward node, about 5 % of an M = 1 1024x1024 fp32 training step on CPU. PEFT's layout stays
where tensors leave or enter the layer: :meth:`peft_ia3_l` (what ``fastpeft.save_model_adapter`` writes),
``load_state_dict`` (takes either shape) and :meth:`from_adapter`.

Merging (dense bases only, as PEFT's 4-bit IA3 layer has no merge either): ``W ← W ⊙ l`` (columns
when feed-forward, rows otherwise, and then the bias too). ``unmerge`` divides by ``l`` exactly, where
PEFT divides by ``l + 1e-8``; both are exact only up to rounding, and neither works for ``l = 0``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..nf4 import NF4Weight
from ..ops.ia3 import ia3_linear
from ..ops.lora import lora_linear
from .lora import frozen_base, LoraLinear, parameter

__all__ = ["IA3Linear"]


class IA3Linear(nn.Module):
    """IA3 on a frozen linear layer.

    Args:
        base_layer: ``torch.nn.Linear``, ``bitsandbytes.nn.Linear4bit`` or an :class:`NF4Weight` (then
            ``bias`` may be given); kept as ``self.base_layer`` and frozen.
        is_feedforward: scale the input (feed-forward targets) instead of the output.
        init_ia3_weights: ``True``: ``l = 1`` (PEFT's identity init); ``False``: standard normal (tests).

    ``ia3_l`` is fp32 (PEFT's default); the product runs in the input's dtype with fp32 scaling.
    """

    def __init__(
        self,
        base_layer: Union[nn.Module, NF4Weight],
        is_feedforward: bool = False,
        init_ia3_weights: bool = True,
        *,
        bias: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        base_layer = frozen_base(base_layer, bias)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.is_feedforward = bool(is_feedforward)
        size = self.in_features if self.is_feedforward else self.out_features
        # fp32 whatever the base dtype, as PEFT's get_peft_model leaves it (autocast_adapter_dtype=True)
        init = torch.ones if init_ia3_weights else torch.randn
        self.ia3_l = nn.Parameter(init(size, dtype=torch.float32, device=self.base_weight().device))
        self.merged = False
        self.disabled = False

    @classmethod
    def from_adapter(cls, base_layer: Union[nn.Module, NF4Weight], adapter, *,
                     bias: Optional[torch.Tensor] = None) -> "IA3Linear":
        """A layer holding a copy of one :class:`fastpeft.adapters.ModuleAdapter` of a PEFT IA3 adapter."""
        if adapter.ia3_scale is None:
            raise ValueError("not an IA3 adapter: it has no ia3_l")
        layer = cls(base_layer, adapter.is_feedforward, bias=bias)
        with torch.no_grad():
            layer.ia3_l.copy_(adapter.ia3_scale.reshape(layer.ia3_l.shape))
        return layer

    def peft_shape(self) -> tuple:
        """PEFT's shape of the vector: ``(1, in)`` when feed-forward, else ``(out, 1)``."""
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def peft_ia3_l(self) -> torch.Tensor:
        """``ia3_l`` in PEFT's shape (a view: PEFT's adapter files and state dicts hold this)."""
        return self.ia3_l.view(self.peft_shape())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a PEFT-shaped vector (PEFT's state, a file) loads as the flat one; load_state_dict passes its own copy
        key = prefix + "ia3_l"
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and tuple(value.shape) == self.peft_shape():
            state_dict[key] = value.reshape(-1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # LoraLinear's views of the base apply as they are (NF4 view of a Linear4bit, repacking check)
    base_weight = LoraLinear.base_weight
    bias = LoraLinear.bias
    base_tensors = LoraLinear.base_tensors
    is_nf4 = LoraLinear.is_nf4
    disable_adapter = LoraLinear.disable_adapter  # base alone inside the block, unmerged for the duration

    @torch.no_grad()
    def merge(self):
        """``W ← W ⊙ l`` (and ``b ← b ⊙ l`` when scaling outputs); dense bases only."""
        if self.merged:
            return
        if self.is_nf4:
            raise ValueError("IA3Linear merges only into a dense base (an NF4 base would have to be re-quantised)")
        scale = self.peft_ia3_l().detach()  # broadcast over W's columns or rows
        self.base_layer.weight.mul_(scale.to(self.base_layer.weight.dtype))
        if not self.is_feedforward and self.base_layer.bias is not None:
            self.base_layer.bias.mul_(self.ia3_l.detach().to(self.base_layer.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo :meth:`merge` (exact up to rounding); no-op when not merged."""
        if not self.merged:
            return
        scale = self.peft_ia3_l().detach()
        self.base_layer.weight.div_(scale.to(self.base_layer.weight.dtype))
        if not self.is_feedforward and self.base_layer.bias is not None:
            self.base_layer.bias.div_(self.ia3_l.detach().to(self.base_layer.bias.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return lora_linear(x, self.base_weight(), self.bias, None, None, 0.0)
        (weight, bias), ia3_l = self.base_tensors(), parameter(self, "ia3_l")
        return ia3_linear(x, weight, bias, ia3_l, self.is_feedforward)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"is_feedforward={self.is_feedforward}, nf4={self.is_nf4}, merged={self.merged}")
