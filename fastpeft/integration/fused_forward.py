"""The forward of an accelerated PEFT layer: at every call, a fused fastpeft op where it computes exactly what PEFT's
forward would at that call (output and gradients), else PEFT's own forward.

``_fused_path`` decides one call. The reasons it asks are split by how long they hold: :func:`base_reason` /
:func:`layer_reason` (the base layer and the layer's configuration: :func:`~fastpeft.accelerate` reports them and
leaves such layers on PEFT's class), :func:`adapter_reason` (one adapter's configuration: ``accelerate`` notes them,
the layer is switched and runs PEFT's forward while such an adapter is active) and ``_call_reason`` (this call's
arguments and the layer's state). PEFT's forward runs for adapters disabled or merged, extra forward arguments
other than ``adapter_names=`` mixed batches (in inference :mod:`~fastpeft.integration.peft_paths`' path, in training
:mod:`~fastpeft.integration.multi_adapter_training`'s), an active adapter with a LoRA variant other than DoRA or with DoRA and
``lora_bias``, an active adapter whose scaling or fp16 factors the fused ops would not reproduce entry for entry
(``fastpeft.ops.inputs.fusable_scaling``: NaN, inf, 0), hooks on the base layer or the adapter's submodules (or
global module hooks), a trainable base weight, a 4-bit base that bitsandbytes multiplies in another compute dtype
or with its own CPU kernel at that call, and the cases :mod:`fastpeft.integration.peft_paths` lists. Every check
is a few attribute reads: no tensor is touched. They run at every call of every adapted layer, so each reads what
it needs once (a module attribute, a ModuleDict entry cost about as much as a small decode-step matmul on CPU) and
imports nothing.

The fused forwards ``_fused_<kind>`` compute one call from PEFT's state read at that call (active adapter,
scaling, dropout, magnitude), so nothing goes stale. A new fused path is a ``(layer, x, arg) -> y`` function plus
the case in ``_fused_path`` that returns it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from ..nn.dora import dora_dropout
from ..nn.lora import is_bnb_linear4bit, bnb_runs_its_cpu_kernel, dropout_inputs, parameter
from ..ops.dora import dora_linear
from ..ops.ia3 import ia3_linear
from ..ops.inputs import autocast_dtype, fusable_scaling
from ..ops.lora import lora_linear
from .multi_adapter_training import mixed_training_call, mixed_training_lora, mixed_training_reason
from .peft_paths import (adalora_factors, base_weight, combined_lora_factors, is_conv1d, mixed_batch_adapters,
                         mixed_batch_lora, mixed_batch_reason, several_adapters_reason)

__all__ = ["accelerated_forward", "base_reason", "layer_reason", "adapter_reason", "dora_variant"]


def base_reason(base) -> Optional[str]:
    """Why fastpeft's ops cannot compute ``base(x)`` exactly as this base layer does, or None. Only the base
    layer itself counts (what PEFT's forward calls): a PEFT layer under a PEFT layer (stacked adapters of a mixed
    model) is not looked through."""
    if type(base) is nn.Linear:  # the common case first (bitsandbytes' Linear4bit is a subclass)
        weight = parameter(base, "weight")
        return None if weight.is_floating_point() else f"base weight dtype {weight.dtype} is not floating point"
    if is_bnb_linear4bit(base):
        state = base.weight.quant_state
        if state is None:
            return "the bitsandbytes Linear4bit weight is not quantised yet (not moved to a device)"
        if state.quant_type != "nf4":
            return f"the bitsandbytes Linear4bit has quant_type={state.quant_type!r}; fastpeft reads NF4"
        return None
    if type(base) is not nn.Linear and not is_conv1d(base):
        from peft.tuners.tuners_utils import BaseTunerLayer

        if isinstance(base, BaseTunerLayer):
            return (f"its base layer is a PEFT {type(base).__module__}.{type(base).__qualname__} layer (stacked "
                    "adapters): fastpeft fuses only over a plain base")
        return (f"base layer {type(base).__name__} is not torch.nn.Linear, transformers' Conv1D or bitsandbytes "
                "Linear4bit")
    if not base.weight.is_floating_point():
        return f"base weight dtype {base.weight.dtype} is not floating point"
    return None


def layer_reason(layer) -> Optional[str]:
    """Why no call of this layer can be fused (its base), or None. (``fan_in_fan_out`` is PEFT's flag for a
    ``Conv1D`` base, which :func:`~fastpeft.integration.peft_paths.base_weight` reads transposed.)"""
    return base_reason(layer.base_layer)


def adapter_reason(layer, kind: str, name: str) -> Optional[str]:
    """Why a call with adapter ``name`` active cannot be fused, or None."""
    if kind != "lora":
        return None
    variant = layer.lora_variant.get(name)
    if variant is not None and type(variant) is not dora_variant():
        return f"adapter {name!r} uses the LoRA variant {type(variant).__name__}; fastpeft runs LoRA and DoRA"
    if variant is not None and layer.lora_bias.get(name, False):
        return f"adapter {name!r} is DoRA with lora_bias=True (PEFT scales the LoRA bias by m/n; dora_linear has none)"
    return None


def _child(module: nn.Module, name: str) -> nn.Module:
    """The registered submodule ``module.<name>`` (also a ModuleDict's entry ``name``), read from ``_modules``
    directly: ``nn.Module.__getattr__`` and ``ModuleDict.__getitem__`` are Python calls, and the gate and the
    fused paths read a dozen such entries per call of a layer."""
    return module._modules[name]


def _adapters_reason(layer, kind: str, names) -> Optional[str]:
    """Why a call with adapters ``names`` in use cannot be fused (their configuration, their submodules), or
    None. PEFT's forward calls ``lora_A`` / ``lora_B`` / ``lora_dropout`` / the DoRA magnitude as modules: hooks
    on them would not fire on the fused path. A scaling ``fusable_scaling`` refuses (NaN, inf, 0, beyond fp32's
    range, fp16 factors) runs PEFT's own ops."""
    for name in names:
        reason = adapter_reason(layer, kind, name)
        if reason is not None:
            return reason
        if kind == "ia3":
            continue
        if _has_hooks(_child(_child(layer, "lora_dropout"), name)):
            return f"hooks on a submodule of adapter {name!r}"
        if kind == "lora":
            lora_a, lora_b = _child(_child(layer, "lora_A"), name), _child(_child(layer, "lora_B"), name)
            if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
                return f"adapter {name!r}: lora_A / lora_B are not plain torch.nn.Linear"
            if (_has_hooks(lora_a) or _has_hooks(lora_b)
                    or (name in layer.lora_variant and _has_hooks(layer.lora_magnitude_vector[name]))):
                return f"hooks on a submodule of adapter {name!r}"
            factor = parameter(lora_a, "weight")
        else:
            factor = _child(layer, "lora_A")[name]  # AdaLoRA's ParameterDict
        # the fused paths fold s into factors or BLAS alphas; PEFT's order decides inf / NaN otherwise
        scaling = layer.scaling[name]
        if not fusable_scaling(scaling, factor.dtype):
            return f"adapter {name!r}: scaling {scaling}, {factor.dtype} factors (PEFT's op order decides inf, NaN)"
    return None


_DORA_VARIANT: Optional[type] = None


def dora_variant() -> type:
    """PEFT's ``DoraLinearVariant``, imported on the first call and kept in a module global: the gate reads it at
    every call, and a global is what torch.compile traces (it warns on an ``lru_cache`` wrapper)."""
    global _DORA_VARIANT
    if _DORA_VARIANT is None:
        from peft.tuners.lora.variants import DoraLinearVariant

        _DORA_VARIANT = DoraLinearVariant
    return _DORA_VARIANT


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    """Module hooks registered for every module (``torch.nn.modules.module.register_module_forward_hook`` …):
    they would fire for the submodules PEFT's forward calls and the fused op does not."""
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
                or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks)


def _call_reason(layer, base, args, kwargs) -> Optional[str]:
    """Why this call cannot be fused whatever the adapters (arguments, layer state, hooks, trainable base);
    ``base`` is ``layer.base_layer``."""
    if args or kwargs:
        return "extra forward arguments (adapter_names= mixed batches and others)"
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapters merged into the base weight"
    if _global_hooks():
        return "global module hooks are registered"
    if _has_hooks(base):
        return "hooks on the base layer"
    if parameter(base, "weight").requires_grad and torch.is_grad_enabled():
        return "the base weight is trainable (requires_grad=True): fastpeft's ops give it no gradient"
    return None


def _compute_dtype_reason(base, x) -> Optional[str]:
    """bitsandbytes' ``Linear4bit`` casts its input to its ``compute_dtype`` (set from the first input when
    unset, as here), multiplies there (in the autocast dtype under autocast) and casts back; the fused ops compute
    in the input's dtype, so a call whose input dtype differs from the layer's compute dtype or from the autocast
    dtype runs PEFT's forward (bitsandbytes' own product)."""
    if type(base) is nn.Linear or not is_bnb_linear4bit(base):
        return None
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    if base.compute_dtype is not None and base.compute_dtype != x.dtype:
        return f"bitsandbytes computes this 4-bit layer in {base.compute_dtype}, the input is {x.dtype}"
    cast_to = autocast_dtype(x)
    if cast_to is not None and cast_to != x.dtype:
        # bitsandbytes' F.linear runs under autocast; the fused NF4 ops multiply in the input's dtype
        return f"under autocast bitsandbytes multiplies this 4-bit layer in {cast_to}, the input is {x.dtype}"
    return None


def _mixed_batch_call(kind: str, args, kwargs) -> bool:
    """A LoRA layer called with ``adapter_names=`` alone (PEFT's mixed-adapter batches)."""
    return (kind == "lora" and not args and len(kwargs) == 1 and "adapter_names" in kwargs
            and kwargs["adapter_names"] is not None)


def _fused_path(layer, x, args, kwargs):
    """Decide one call of an accelerated layer: ``(fused_forward, arg)`` when ``fused_forward(layer, x, arg)``
    computes exactly what PEFT's forward would (output and gradients), else a string saying why PEFT's forward
    runs."""
    base = _child(layer, "base_layer")
    # first, as every other reason leads to the same forward: the check is a few reads, the rest many more
    if type(base) is not nn.Linear and is_bnb_linear4bit(base) and bnb_runs_its_cpu_kernel(base, x):
        return "bitsandbytes multiplies this input with its own CPU 4-bit kernel (bf16): its numbers are PEFT's"
    kind = layer._fastpeft_kind
    mixed = bool(kwargs) and _mixed_batch_call(kind, args, kwargs)
    reason = (_call_reason(layer, base, () if mixed else args, {} if mixed else kwargs) or base_reason(base)
              or _compute_dtype_reason(base, x))
    if reason is not None:
        return reason
    if mixed:
        adapter_names = kwargs["adapter_names"]
        names = mixed_batch_adapters(layer, adapter_names)
        reason = _adapters_reason(layer, kind, names)
        if reason is None and mixed_training_call(layer, x, names):
            return mixed_training_reason(layer, x, adapter_names, names) or (mixed_training_lora, adapter_names)
        return reason or mixed_batch_reason(layer, x, adapter_names) or (_fused_mixed_batch, adapter_names)
    adapters = _child(layer, "ia3_l" if kind == "ia3" else "lora_A")
    active = [name for name in layer.active_adapters if name in adapters]
    if not active:
        return "no active adapter"
    reason = _adapters_reason(layer, kind, active)
    if reason is not None:
        return reason
    if len(active) > 1:
        if kind != "lora":
            return f"several active {kind} adapters"
        return several_adapters_reason(layer, active) or (_fused_several_lora, tuple(active))
    name = active[0]
    if kind == "ia3":
        return _fused_ia3, name
    if kind == "adalora":
        return _fused_adalora, name
    return (_fused_dora if name in layer.lora_variant else _fused_lora), name


def _base_bias(layer) -> Optional[torch.Tensor]:
    return parameter(_child(layer, "base_layer"), "bias")


def _adapter_weight(layer, table: str, name: str) -> torch.Tensor:
    """``layer.<table>[name].weight`` (``lora_A``, ``lora_B``, ``lora_magnitude_vector``), read from the registries."""
    return parameter(_child(_child(layer, table), name), "weight")


def _fused_lora(layer, x, name: str):
    """PEFT's LoRA forward for one active adapter ``name`` as one fastpeft op."""
    x_dropped, dropout_p = dropout_inputs(_child(_child(layer, "lora_dropout"), name), x)
    bias, scaling = _base_bias(layer), layer.scaling[name]
    if layer.lora_bias.get(name, False):  # PEFT's (h Bᵀ + b_B) · s: s · b_B joins the base bias
        bias = _plus(bias, _child(_child(layer, "lora_B"), name).bias * scaling)
    return lora_linear(x, base_weight(layer), bias, _adapter_weight(layer, "lora_A", name),
                       _adapter_weight(layer, "lora_B", name), scaling, x_dropped, dropout_p)


def _fused_several_lora(layer, x, names: tuple):
    """PEFT's sum over several active LoRA adapters as one fastpeft op (concatenated factors)."""
    lora_a, lora_b, lora_bias = combined_lora_factors(layer, names)
    return lora_linear(x, base_weight(layer), _plus(_base_bias(layer), lora_bias), lora_a, lora_b, 1.0)


def _fused_mixed_batch(layer, x, adapter_names):
    """PEFT's mixed-adapter batch (``adapter_names=``): the base op, then the multi-LoRA op."""
    base_output = lora_linear(x, base_weight(layer), _base_bias(layer), None, None, 0.0)
    return mixed_batch_lora(layer, x, base_output, adapter_names)


def _fused_adalora(layer, x, name: str):
    """PEFT's AdaLoRA ``SVDLinear`` forward for one active adapter ``name`` as one fastpeft op."""
    lora_a, lora_b = adalora_factors(layer, name)
    x_dropped, dropout_p = dropout_inputs(_child(_child(layer, "lora_dropout"), name), x)
    return lora_linear(x, base_weight(layer), _base_bias(layer), lora_a, lora_b, 1.0, x_dropped, dropout_p)


def _plus(bias: Optional[torch.Tensor], extra: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``bias + extra`` where either may be None (differentiable in both)."""
    if bias is None or extra is None:
        return extra if bias is None else bias
    return bias + extra


def _fused_dora(layer, x, name: str):
    """PEFT's DoRA forward for one active adapter ``name`` as one fastpeft op."""
    lora_a = _adapter_weight(layer, "lora_A", name)
    x_dropped = dora_dropout(_child(_child(layer, "lora_dropout"), name), x, lora_a.dtype, layer.training)
    return dora_linear(x, base_weight(layer), _base_bias(layer), lora_a, _adapter_weight(layer, "lora_B", name),
                       layer.scaling[name], _adapter_weight(layer, "lora_magnitude_vector", name), x_dropped)


def _fused_ia3(layer, x, name: str):
    """PEFT's IA3 forward for one active adapter ``name`` as one fastpeft op."""
    return ia3_linear(x, base_weight(layer), _base_bias(layer), parameter(_child(layer, "ia3_l"), name).view(-1),
                      layer.is_feedforward)


def accelerated_forward(self, x, *args, **kwargs):
    """The forward of an accelerated PEFT layer: the fused op :func:`_fused_path` picks, else PEFT's forward."""
    path = _fused_path(self, x, args, kwargs)
    if isinstance(path, str):
        return self._fastpeft_peft_class.forward(self, x, *args, **kwargs)
    fused_forward, arg = path
    return fused_forward(self, x, arg)
