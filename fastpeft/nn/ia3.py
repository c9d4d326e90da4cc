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

import weakref
from typing import Optional, Union

import torch
from torch import nn

from ..nf4 import NF4Weight
from ..ops.dispatch import backend_setting
from ..ops.ia3 import ia3_apply, ia3_linear, ia3_plan, peft_ia3_ops
from ..ops.lora import lora_linear
from .lora import LoraLinear, _is_bnb_linear4bit, _NF4Base, parameter

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
        if isinstance(base_layer, NF4Weight):
            base_layer = _NF4Base(base_layer, bias)
        elif bias is not None:
            raise ValueError("bias= is only for an NF4Weight base; a module base brings its own bias")
        elif not (isinstance(base_layer, nn.Linear) or _is_bnb_linear4bit(base_layer)):
            raise TypeError(
                f"base_layer must be torch.nn.Linear, bitsandbytes.nn.Linear4bit or NF4Weight, got "
                f"{type(base_layer).__name__}"
            )
        base_layer.requires_grad_(False)
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

    # The last call's (key, plan): the op's checks and path choice (fastpeft.ops.ia3.ia3_plan) cost about as much as
    # the layer's math at M = 1 on CPU, and a decode or training loop repeats them on inputs that differ only in values.
    _planned: Optional[tuple] = None
    # (weak references to the dense weight, its bias (None when there is none) and ia3_l, FASTPEFT_BACKEND as set,
    # device) of the last call whose plan was plain (the reference backend, outside torch.compile): while all of them
    # hold, a call runs PEFT's ops unchecked (forward)
    _plain_on: Optional[tuple] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain_on = self._plain_on
        if plain_on is not None and not (self.disabled or self.merged):
            # The tensors the last checked call ran on, off the Triton backend (CPU): PEFT's two ops themselves, what
            # the plain plan runs, read straight from the layer's dicts without the plan's key. At M = 1 on CPU, among
            # other layers' calls, each tensor attribute read or Python frame there costs about 1 % of the call.
            # The tensors are compared by identity (a matmul with a meta weight would not raise; a vector or bias of
            # another shape would broadcast) and a feed-forward x by its last dim (x ⊙ l broadcasts an (M, 1) x;
            # a 0-d x raises here); the ops check the rest: on a bad input (shape, dtype, device, a tensor's .data
            # changed) they raise, and the checked op raises its clear error, or computes where it casts (x of
            # another dtype than the weight). An unfrozen weight is the op's error too; autocast casts inside
            # F.linear as in PEFT's base layer.
            try:
                params = self._modules["base_layer"]._parameters
                weight, bias, ia3_l = params["weight"], params["bias"], self._parameters["ia3_l"]
                is_feedforward = self.is_feedforward
                if (plain_on[0]() is weight and (bias is None if plain_on[1] is None else plain_on[1]() is bias)
                        and plain_on[2]() is ia3_l and plain_on[3] == backend_setting() and plain_on[4] == x.device
                        and not weight.requires_grad and (not is_feedforward or x.shape[-1] == self.in_features)):
                    return peft_ia3_ops(x, weight, bias, ia3_l, is_feedforward)
            except Exception:
                pass
        if self.disabled or self.merged:
            return lora_linear(x, self.base_weight(), self.bias, None, None, 0.0)
        (weight, bias), ia3_l = self.base_tensors(), parameter(self, "ia3_l")
        if not isinstance(x, torch.Tensor) or torch._C._is_any_autocast_enabled() or torch.compiler.is_compiling():
            # bad input or autocast on for any device (the op's own checks and casts), or traced by dynamo: no reuse
            return ia3_linear(x, weight, bias, ia3_l, self.is_feedforward)
        # everything ia3_plan's answer depends on (its docstring)
        grad = torch.is_grad_enabled()
        key = (x.shape, x.dtype, x.device, grad, grad and x.requires_grad, backend_setting(), self.is_feedforward,
               type(weight), weight.shape, weight.device, grad and getattr(weight, "requires_grad", False),
               None if bias is None else bias.shape, grad and bias is not None and bias.requires_grad,
               ia3_l.shape, grad and ia3_l.requires_grad)
        planned = self._planned
        if planned is None or planned[0] != key:
            planned = self._planned = (key, ia3_plan(x, weight, bias, ia3_l, self.is_feedforward))
        y = ia3_apply(planned[1], x, weight, bias, ia3_l, self.is_feedforward)
        if planned[1].plain and isinstance(weight, torch.Tensor):  # a dense weight off the Triton backend
            self._plain_on = (weakref.ref(weight), None if bias is None else weakref.ref(bias), weakref.ref(ia3_l),
                              backend_setting(), x.device)
        return y

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_plain_on", None)  # a per-call cache (planned again after loading) holding a weak reference
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"is_feedforward={self.is_feedforward}, nf4={self.is_nf4}, merged={self.merged}")
