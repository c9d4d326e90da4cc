"""``LoraLinear``: a LoRA / QLoRA layer over a dense or NF4 base, numerically PEFT's ``lora.Linear`` /
``lora.Linear4bit`` (``y = base(x) + s · B A drop(x)``) computed by ``fastpeft.ops.lora_linear``.

Merging: a dense base is merged in place (``W += s·B A``, as PEFT does; ``unmerge`` subtracts it again,
exact up to rounding). An NF4 base is never modified: ``merge`` builds a new dense weight
``dequant(W) + s·B A`` in the base's dtype (``merged_weight``) that the forward then uses, and
``unmerge`` drops it, so unmerging is exact. PEFT instead re-quantises the sum to NF4, which loses
precision; whoever wants that can call ``NF4Weight.quantize(layer.merged_weight)``.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from typing import Optional, Union

import torch
from torch import nn

from ..nf4 import NF4Weight
from ..ops.lora import lora_linear

__all__ = ["LoraLinear"]


def is_bnb_linear4bit(module) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # a Linear4bit exists only if bitsandbytes was imported
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def parameter(module: nn.Module, name: str):
    """``getattr(module, name)`` for a registered parameter (or None) ``name``, read from ``module._parameters``:
    ``nn.Module.__getattr__`` is a Python call per read (about a microsecond, a few with the caches a layer's matmul
    just swept), and a layer's forward makes several. Any other attribute of that name (a plain one, a buffer, a
    tensor ``torch.nn.utils.parametrize`` computes: it moves the parameter out of ``_parameters``) through
    ``getattr``."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def repacked_for_bnb_cpu(module) -> bool:
    """Whether bitsandbytes has repacked this ``Linear4bit`` for its own CPU kernel (in place, on an eval-mode
    no-grad CPU forward on an AVX512-BF16 CPU; absmax rounded to bf16): no longer the NF4 layout."""
    return is_bnb_linear4bit(module) and getattr(module.weight.quant_state, "packing_format_for_cpu", False)


def bnb_runs_its_cpu_kernel(module, x: torch.Tensor) -> bool:
    """Whether bitsandbytes' own forward of the ``Linear4bit`` ``module`` multiplies input ``x`` with its CPU 4-bit
    kernel rather than the exact NF4 product (bitsandbytes 0.50 ``Linear4bit.forward``): always once the layer is
    repacked for that kernel, and where that forward repacks it first: a CPU input that does not require grad, the
    layer in eval mode, and bitsandbytes' feature check (``support_avx512bf16_for_cpu``, AVX512-BF16) true. The
    kernel computes in bf16, about 3e-3 from the exact product and depending on the batch's rows, so no fused op
    gives its numbers: such a call runs bitsandbytes' forward."""
    # the cheap reads first: this runs at every call of every accelerated 4-bit layer
    if getattr(parameter(module, "weight").quant_state, "packing_format_for_cpu", False):
        return True
    return (not x.requires_grad and not module.training and getattr(module, "support_avx512bf16_for_cpu", False)
            and x.device.type == "cpu")


class NF4Base(nn.Module):
    """The base layer for a bare :class:`NF4Weight` (frozen ``weight`` and optional ``bias``). The
    NF4Weight is a plain attribute, not a buffer: ``.to(device)`` does not move it (build it on the
    target device, or use a bitsandbytes ``Linear4bit`` base, which moves with the model)."""

    def __init__(self, weight: NF4Weight, bias: Optional[torch.Tensor]):
        super().__init__()
        self.weight = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(x, self.weight, self.bias, None, None, 0.0)


def frozen_base(base_layer, bias: Optional[torch.Tensor] = None) -> nn.Module:
    """The base module an adapter layer wraps, frozen: ``base_layer`` itself (a float ``torch.nn.Linear`` or a
    bitsandbytes ``Linear4bit``) or an :class:`NF4Weight` with its ``bias`` wrapped as :class:`NF4Base`;
    ``TypeError`` / ``ValueError`` for anything else."""
    if isinstance(base_layer, NF4Weight):
        base_layer = NF4Base(base_layer, bias)
    elif bias is not None:
        raise ValueError("bias= is only for an NF4Weight base; a module base brings its own bias")
    elif not (isinstance(base_layer, nn.Linear) or is_bnb_linear4bit(base_layer)):
        raise TypeError(
            f"base_layer must be torch.nn.Linear, bitsandbytes.nn.Linear4bit or NF4Weight, got "
            f"{type(base_layer).__name__}"
        )
    elif not is_bnb_linear4bit(base_layer) and not base_layer.weight.is_floating_point():
        # e.g. bitsandbytes' Linear8bitLt, an nn.Linear subclass with an int8 weight
        raise TypeError(
            f"{type(base_layer).__name__} has a {base_layer.weight.dtype} weight; only float and NF4 bases are "
            "supported"
        )
    base_layer.requires_grad_(False)
    return base_layer


def dropout_inputs(dropout: nn.Module, x: torch.Tensor) -> tuple:
    """``(x_dropped, dropout_p)`` for :func:`~fastpeft.ops.lora.lora_linear` from a LoRA dropout module.

    A plain ``nn.Dropout`` becomes ``dropout_p``: the op draws the very mask the module would (same RNG
    state) and stores ``x`` instead of ``drop(x)`` (with the mask as bools off CUDA, its RNG state on CUDA). Under ``torch.compile`` (dynamo cannot trace
    the op's RNG-state capture) and for any other module, the module runs and ``dropout(x)`` is passed.
    """
    if isinstance(dropout, nn.Identity):
        return None, 0.0
    if type(dropout) is nn.Dropout and not torch.compiler.is_compiling():
        return None, dropout.p if dropout.training else 0.0
    return dropout(x), 0.0


def cached_nf4_view(owner: nn.Module, param) -> NF4Weight:
    """An :class:`NF4Weight` view of bitsandbytes' packed 4-bit ``param``, cached on ``owner`` (building and
    validating one costs more than a decode step's small matmul); reused only while ``param`` is the very same
    packed tensor with the same quant state."""
    if torch.compiler.is_compiling():  # traced once: no cache (dynamo cannot compare data pointers)
        return NF4Weight.from_bnb(param)
    key = (param, param.quant_state, param.data_ptr())
    cached = owner.__dict__.get("_fastpeft_nf4_view")
    if cached is None or any(a is not b for a, b in zip(cached[0][:2], key[:2])) or cached[0][2] != key[2]:
        cached = owner.__dict__["_fastpeft_nf4_view"] = (key, NF4Weight.from_bnb(param))
    return cached[1]


class LoraLinear(nn.Module):
    """LoRA on a frozen linear layer: ``y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``.

    Args:
        base_layer: ``torch.nn.Linear``, ``bitsandbytes.nn.Linear4bit`` (NF4, read in place through
            :meth:`NF4Weight.from_bnb`), or an :class:`NF4Weight` (then ``bias`` may be given).
            Kept as ``self.base_layer`` and frozen.
        r: the rank; ``lora_alpha``: the numerator of ``scaling = lora_alpha / r`` (or
            ``lora_alpha / sqrt(r)`` with ``use_rslora``); ``lora_dropout``: dropout probability on the
            LoRA input.
        init_lora_weights: PEFT's choices. ``True``: A kaiming-uniform (``a = sqrt(5)``, ``nn.Linear``'s
            default), B zero; ``"gaussian"``: A normal with std ``1 / r``, B zero; ``False``: both
            kaiming-uniform (an untrained adapter that is not a no-op, for tests).

    ``lora_A`` is ``(r, in)`` and ``lora_B`` ``(out, r)``, in the base weight's dtype for a dense base and
    fp32 for an NF4 base (as PEFT creates them).
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
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self._set_base(base_layer, bias)
        base = self.base_weight()
        dtype = base.dtype if isinstance(base, torch.Tensor) else torch.float32
        lora_a = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=base.device))
        lora_b = nn.Parameter(torch.empty(self.out_features, r, dtype=dtype, device=base.device))
        with torch.no_grad():
            if init_lora_weights is True or init_lora_weights is False:
                nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
            elif init_lora_weights == "gaussian":
                nn.init.normal_(lora_a, std=1 / r)
            else:
                raise ValueError(f"unknown init_lora_weights={init_lora_weights!r}: True, False or 'gaussian'")
            if init_lora_weights is False:
                nn.init.kaiming_uniform_(lora_b, a=math.sqrt(5))
            else:
                nn.init.zeros_(lora_b)
        scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        dropout = nn.Dropout(lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self._set_adapter(lora_a, lora_b, scaling, dropout)

    @classmethod
    def from_parameters(
        cls,
        base_layer: Union[nn.Module, NF4Weight],
        lora_A: nn.Parameter,
        lora_B: nn.Parameter,
        scaling: float,
        lora_dropout: nn.Module,
        *,
        bias: Optional[torch.Tensor] = None,
    ) -> "LoraLinear":
        """A layer that shares ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)`` and ``lora_dropout`` (the
        very objects, no copy), e.g. those of a PEFT ``lora.Linear`` it replaces."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._set_base(base_layer, bias)
        layer._set_adapter(lora_A, lora_B, scaling, lora_dropout)
        return layer

    def _set_base(self, base_layer, bias):
        base_layer = frozen_base(base_layer, bias)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.register_buffer("merged_weight", None, persistent=False)
        self.merged = False
        self.disabled = False

    def _set_adapter(self, lora_a, lora_b, scaling, dropout):
        if not isinstance(lora_a, nn.Parameter) or not isinstance(lora_b, nn.Parameter):
            raise TypeError("lora_A and lora_B must be nn.Parameter")
        rank = lora_a.shape[0]
        if lora_a.dim() != 2 or lora_b.dim() != 2 or tuple(lora_a.shape) != (rank, self.in_features) or \
                tuple(lora_b.shape) != (self.out_features, rank):
            raise ValueError(
                f"lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} must be (r, {self.in_features}) "
                f"and ({self.out_features}, r)"
            )
        self.lora_A, self.lora_B = lora_a, lora_b
        self.r = rank
        self.scaling = float(scaling)
        self.lora_dropout = dropout

    # ------------------------------------------------------------------ base
    def base_weight(self) -> Union[torch.Tensor, NF4Weight]:
        """The frozen base weight, no copy: the dense ``(out, in)`` parameter (merged in place while
        ``merged``) or an :class:`NF4Weight` view of the packed one (never modified)."""
        base = self._modules["base_layer"]
        if type(base) is nn.Linear:  # the common case first (bitsandbytes' Linear4bit is a subclass)
            return parameter(base, "weight")
        if is_bnb_linear4bit(base):
            if repacked_for_bnb_cpu(base):
                raise ValueError(
                    "bitsandbytes has repacked this Linear4bit for its own CPU kernel (it does so in place on an "
                    "eval-mode forward without grad on an AVX512-BF16 CPU), rounding its absmax to bf16: it no "
                    "longer holds the NF4 layout. Wrap the layer before running it in eval mode, or set "
                    "support_avx512bf16_for_cpu = False on it first"
                )
            return cached_nf4_view(self, base.weight)
        return base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The base layer's bias (or None)."""
        return parameter(self._modules["base_layer"], "bias")

    def base_tensors(self) -> tuple:
        """``(self.base_weight(), self.bias)`` in one call, what a forward reads: over an ``nn.Linear`` (the common
        case) straight from its ``_parameters``. Each method call or property is a Python frame, and with the caches
        an M = 1 layer's matmul just swept, four of them cost about 2 % of the call on CPU."""
        base = self._modules["base_layer"]
        params = base._parameters
        if type(base) is nn.Linear and "weight" in params and "bias" in params:
            return params["weight"], params["bias"]
        return self.base_weight(), self.bias

    @property
    def is_nf4(self) -> bool:
        return isinstance(self.base_layer, NF4Base) or is_bnb_linear4bit(self.base_layer)

    # ------------------------------------------------------------------ merging
    def delta_weight(self) -> torch.Tensor:
        """``scaling · B A`` as ``(out, in)`` in fp32."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def _merged_value(self, base: torch.Tensor) -> torch.Tensor:
        """The merged weight from the fp32 base ``base`` (an NF4 base's merge, kept beside it): ``W + s·B A``."""
        return base + self.delta_weight()

    def _merge_into(self, weight: torch.Tensor) -> None:
        """Fold the adapter into a dense base in place, as PEFT's merge rounds it (the delta in the base's dtype)."""
        weight.add_(self.delta_weight().to(weight.dtype))

    def _unmerge_from(self, weight: torch.Tensor) -> None:
        """Undo :meth:`_merge_into` in place."""
        weight.sub_(self.delta_weight().to(weight.dtype))

    @torch.no_grad()
    def merge(self):
        """Fold the adapter into the base (see the module docstring); no-op when already merged."""
        if self.merged:
            return
        if self.is_nf4:
            base = self.base_weight()
            self.merged_weight = self._merged_value(base.dequantize(torch.float32)).to(base.dtype)
        else:
            self._merge_into(self.base_layer.weight)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo :meth:`merge`; no-op when not merged."""
        if not self.merged:
            return
        if self.is_nf4:
            self.merged_weight = None
        else:
            self._unmerge_from(self.base_layer.weight)
        self.merged = False

    @contextmanager
    def disable_adapter(self):
        """Run the base layer alone inside the block (unmerging for the duration if merged)."""
        was_merged = self.merged
        self.unmerge()
        self.disabled = True
        try:
            yield self
        finally:
            self.disabled = False
            if was_merged:
                self.merge()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the registries read directly, as in base_weight (nn.Module.__getattr__ is a Python call per read)
        merged_weight = self._buffers["merged_weight"]
        weight, bias = (merged_weight, self.bias) if merged_weight is not None else self.base_tensors()
        if self.disabled or self.merged:
            return lora_linear(x, weight, bias, None, None, 0.0)
        x_dropped, dropout_p = dropout_inputs(self._modules["lora_dropout"], x)
        return lora_linear(x, weight, bias, parameter(self, "lora_A"), parameter(self, "lora_B"), self.scaling,
                           x_dropped, dropout_p)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, nf4={self.is_nf4}, merged={self.merged}")
