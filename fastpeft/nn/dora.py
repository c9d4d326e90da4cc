"""``DoraLinear``: DoRA on a dense or NF4 base, numerically PEFT's ``lora.Linear`` / ``lora.Linear4bit``
with ``use_dora=True``, computed by ``fastpeft.ops.dora_linear``.

A :class:`~fastpeft.nn.LoraLinear` plus the magnitude vector ``m`` ``(out,)`` (PEFT's
``lora_magnitude_vector``), initialised like PEFT to the row norms ``‖W + s·B A‖₂`` of the initial adapter.

Merging follows PEFT: ``W ← (m / n) ⊙ (W + s·B A)`` with ``n`` the current norm (the bias is untouched).
A dense base is merged in place and ``unmerge`` divides the factor back out and subtracts ``s·B A``
(exact up to rounding); an NF4 base is never modified: ``merge`` builds the dense ``merged_weight`` the
forward then uses, and ``unmerge`` drops it.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..nf4 import NF4Weight
from ..ops.dora import dora_linear, dora_weight_norm
from .lora import LoraLinear, parameter

__all__ = ["DoraLinear"]


def dora_dropout(dropout: nn.Module, x: torch.Tensor, adapter_dtype: torch.dtype,
                 training: bool) -> Optional[torch.Tensor]:
    """``x' = dropout(x)`` for :func:`~fastpeft.ops.dora.dora_linear` as PEFT's DoRA draws it, or None (``x' = x``):
    only in training with a real dropout module (PEFT then recomputes the base product on ``x'``), on ``x`` cast
    to the adapter dtype first, as PEFT's forward casts ``x`` before its dropout (a mask scaled in bf16 would
    round ``x'``)."""
    if not training or isinstance(dropout, nn.Identity):
        return None
    return dropout(x if x.dtype == adapter_dtype else x.to(adapter_dtype))


class DoraLinear(LoraLinear):
    """DoRA on a frozen linear layer (PEFT semantics, see ``fastpeft.reference.dora_linear``).

    Arguments as :class:`LoraLinear`. ``lora_magnitude_vector`` is an ``(out,)`` Parameter in
    ``lora_A``'s dtype. :meth:`from_parameters` shares a PEFT layer's tensors, :meth:`from_adapter` copies
    one layer of a PEFT adapter file read by :func:`fastpeft.load_adapter`.
    """

    def __init__(
        self,
        base_layer: Union[nn.Module, NF4Weight],
        r: int = 8,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: Union[bool, str] = True,
        *,
        bias: Optional[torch.Tensor] = None,
    ):
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, bias=bias)
        self._set_magnitude(nn.Parameter(self.weight_norm()))

    @classmethod
    def from_parameters(
        cls,
        base_layer: Union[nn.Module, NF4Weight],
        lora_A: nn.Parameter,
        lora_B: nn.Parameter,
        scaling: float,
        lora_dropout: nn.Module,
        magnitude: nn.Parameter = None,
        *,
        bias: Optional[torch.Tensor] = None,
    ) -> "DoraLinear":
        """A layer sharing ``lora_A``, ``lora_B``, ``lora_dropout`` and ``magnitude`` ``(out,)`` (the very
        objects, e.g. a PEFT layer's ``lora_magnitude_vector["default"].weight``)."""
        if magnitude is None:
            raise ValueError("DoraLinear.from_parameters needs the magnitude Parameter")
        layer = super().from_parameters(base_layer, lora_A, lora_B, scaling, lora_dropout, bias=bias)
        layer._set_magnitude(magnitude)
        return layer

    @classmethod
    def from_adapter(cls, base_layer: Union[nn.Module, NF4Weight], adapter, lora_dropout: float = 0.0,
                     *, bias: Optional[torch.Tensor] = None) -> "DoraLinear":
        """A layer holding copies of one :class:`fastpeft.adapters.ModuleAdapter` of a PEFT DoRA adapter
        (``lora_A``, ``lora_B``, ``lora_magnitude_vector`` and PEFT's scaling)."""
        if adapter.lora_a is None or adapter.magnitude is None:
            raise ValueError("not a DoRA adapter: it needs lora_A, lora_B and lora_magnitude_vector")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._set_base(base_layer, bias)
        device = layer.base_weight().device
        dropout = nn.Dropout(lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        layer._set_adapter(nn.Parameter(adapter.lora_a.detach().clone().to(device)),
                           nn.Parameter(adapter.lora_b.detach().clone().to(device)), adapter.scaling, dropout)
        layer._set_magnitude(nn.Parameter(adapter.magnitude.detach().clone().to(device)))
        return layer

    def _set_magnitude(self, magnitude):
        if not isinstance(magnitude, nn.Parameter):
            raise TypeError("magnitude must be an nn.Parameter")
        if tuple(magnitude.shape) != (self.out_features,):
            raise ValueError(f"magnitude must be ({self.out_features},), got {tuple(magnitude.shape)}")
        self.lora_magnitude_vector = magnitude

    def weight_norm(self) -> torch.Tensor:
        """``‖W + s·B A‖₂`` per output row ``(out,)`` in ``lora_A``'s dtype, detached (of the unmerged base)."""
        return dora_weight_norm(self.base_weight(), self.lora_A, self.lora_B, self.scaling)

    # ------------------------------------------------------------------ merging
    def _dora_factor(self) -> torch.Tensor:
        """``m / ‖W + s·B A‖₂`` as an fp32 ``(out, 1)`` column."""
        return (self.lora_magnitude_vector.detach().float() / self.weight_norm().float()).unsqueeze(1)

    def _merged_value(self, base: torch.Tensor) -> torch.Tensor:
        """``(m / n) ⊙ (W + s·B A)`` from the fp32 base ``base`` (see the module docstring)."""
        return self._dora_factor() * (base + self.delta_weight())

    def _merge_into(self, weight: torch.Tensor) -> None:
        """``W ← (m / n) ⊙ (W + s·B A)`` in place, the factor kept for :meth:`_unmerge_from`."""
        factor = self._dora_factor()
        weight.copy_(factor * (weight.float() + self.delta_weight()))
        self._merged_factor = factor

    def _unmerge_from(self, weight: torch.Tensor) -> None:
        """Undo :meth:`_merge_into` in place (exact up to rounding)."""
        weight.copy_(weight.float() / self._merged_factor - self.delta_weight())
        del self._merged_factor

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return super().forward(x)
        lora_a = parameter(self, "lora_A")
        x_dropped = dora_dropout(self._modules["lora_dropout"], x, lora_a.dtype, self.training)
        return dora_linear(x, *self.base_tensors(), lora_a, parameter(self, "lora_B"), self.scaling,
                           parameter(self, "lora_magnitude_vector"), x_dropped)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"
