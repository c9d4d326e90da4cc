"""Adopting fastpeft in one line: accelerate a PEFT model in place, or add adapters without peft.

``accelerate(model)`` walks a PEFT model and switches every supported adapted layer (PEFT's LoRA / DoRA /
IA3 / AdaLoRA ``Linear`` layers over ``nn.Linear``, GPT-2-style ``Conv1D`` and bitsandbytes ``Linear4bit``
bases) to fastpeft's fused ops **by changing the layer's
class in place** to a subclass of PEFT's own class whose ``forward`` calls ``fastpeft.ops``. Nothing else
changes: the layer keeps its ``base_layer``, its ``lora_A`` / ``lora_B`` / ``lora_magnitude_vector`` /
``ia3_l`` ModuleDicts and the very same Parameter objects, so the optimizer's parameters, the state-dict
keys and PEFT's ``save_pretrained`` / ``load_adapter`` / ``set_adapter`` / ``merge_and_unload`` /
``disable_adapter`` keep working (they see a PEFT layer; ``isinstance`` holds; the class keeps PEFT's name, so
``repr`` is PEFT's). The forward reads PEFT's state at each call (active adapter, scaling, dropout, magnitude), so
nothing goes stale, and runs a fused op only when it computes exactly what PEFT's forward would at that call
(``_fused_path``; several active LoRA adapters, ``adapter_names=`` mixed batches, ``lora_bias`` and AdaLoRA
are fused too, see :mod:`fastpeft.peft_paths`); otherwise it runs PEFT's own forward: adapters disabled or
merged, other extra forward arguments, an active adapter with a LoRA variant other than DoRA or with DoRA and
``lora_bias``, an active adapter whose scaling or fp16 factors the fused ops would not reproduce entry for entry
(``fastpeft.ops.inputs.fusable_scaling``: NaN, inf, 0), hooks on the base layer or the adapter's submodules (or
global module hooks), a trainable base weight, a 4-bit base that bitsandbytes multiplies in another compute dtype
or with its own CPU kernel at that call, the cases :mod:`fastpeft.peft_paths` lists. The bitsandbytes 4-bit layers
no PEFT layer wraps (frozen bases under prompt / prefix tuning, BitFit, LoRA on some modules) run fastpeft's NF4
op too (bitsandbytes' forward for a call it multiplies with its CPU kernel), and so does the 4-bit base of an
adapted layer whenever PEFT's forward calls it, unless ``frozen_4bit=False``. ``restore(model)`` puts PEFT's (and
bitsandbytes') classes back. Layers fastpeft cannot run at all (embeddings, convolutions, 8-bit bases, a PEFT
layer as base layer) are left on PEFT's class and reported in the returned :class:`PatchSummary` and a log line.

``inject(model, r=..., ...)`` is the path without peft: it replaces the targeted ``nn.Linear`` /
``Linear4bit`` layers of any model with :class:`~fastpeft.nn.LoraLinear` / :class:`~fastpeft.nn.DoraLinear`.
``save_model_adapter`` / ``load_model_adapter`` write and read such a model's adapter in PEFT's format
(through :mod:`fastpeft.adapters`), so PEFT loads what fastpeft trained and the other way round.
"""

from __future__ import annotations

import copy
import copyreg
import dataclasses
import inspect
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from .adapters import Adapter, ModuleAdapter, _matches_any, load_adapter, save_adapter
from .bank import peft_adapter_dtype
from .nn.dora import DoraLinear, dora_dropout
from .nn.ia3 import IA3Linear
from .nn.lora import LoraLinear, _is_bnb_linear4bit, bnb_runs_its_cpu_kernel, dropout_inputs, parameter
from .ops.dora import dora_linear
from .ops.ia3 import ia3_linear
from .ops.inputs import autocast_dtype, fusable_scaling
from .ops.lora import lora_linear
from .peft_paths import (adalora_factors, base_weight, bnb_cpu_kernel_linear, combined_lora_factors,
                         frozen_4bit_linear, is_conv1d, mixed_batch_adapters, mixed_batch_lora, mixed_batch_reason,
                         several_adapters_reason)

__all__ = ["PatchSummary", "accelerate", "restore", "inject", "save_model_adapter", "load_model_adapter",
           "trainable_parameters", "print_trainable_parameters"]

logger = logging.getLogger("fastpeft")

_PEFT_PREFIX = "base_model.model."
_FAST_LAYERS = (LoraLinear, IA3Linear)


@dataclass
class PatchSummary:
    """What :func:`accelerate`, :func:`inject` or :func:`load_model_adapter` did: ``replaced`` maps each
    module path it switched to fastpeft to the kind (``lora``, ``dora``, ``ia3``, ``adalora``, with ``+nf4`` over a
    4-bit base; ``nf4`` for a frozen 4-bit layer no PEFT layer wraps); ``skipped`` maps each adapted or targeted layer it left alone to the reason; ``peft_forward`` maps
    each switched layer holding adapters fastpeft does not fuse to the reason (the layer runs PEFT's forward
    while such an adapter is active); ``removed`` maps each layer of a previously loaded adapter that the new one
    does not adapt to its kind (:func:`load_model_adapter` put its base layer back); ``unfused`` maps each switched
    layer whose calls will run PEFT's forward on this model's activations to the reason (a 4-bit base computing in
    another dtype than the model's: the fused ops compute in the input's dtype). The text counts on fastpeft ops
    only the switched layers not in ``unfused``."""

    replaced: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    peft_forward: dict = field(default_factory=dict)
    removed: dict = field(default_factory=dict)
    unfused: dict = field(default_factory=dict)

    def __str__(self) -> str:
        kinds: dict = {}
        for name, kind in self.replaced.items():
            if name not in self.unfused:
                kinds[kind] = kinds.get(kind, 0) + 1
        done = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
        text = f"fastpeft: {len(self.replaced) - len(self.unfused)} layers on fastpeft ops ({done})"
        if self.unfused:
            text += f"; {len(self.unfused)} switched but running PEFT's forward on this model's activations"
        text += f"; {len(self.skipped)} left as they are"
        if self.removed:
            text += f"; {len(self.removed)} layers of the previous adapter back to their base layer"
        reasons: dict = {}
        for name, why in self.unfused.items():
            reasons.setdefault(why, []).append(name)
        text += "".join(f"\n  {len(names)} layers ({names[0]}{', ...' if len(names) > 1 else ''}): PEFT's forward: "
                        f"{why}" for why, names in reasons.items())
        text += "".join(f"\n  {name}: PEFT's forward while active: {why}" for name, why in self.peft_forward.items())
        return text + "".join(f"\n  skipped {name}: {why}" for name, why in self.skipped.items())


# ---------------------------------------------------------------------------------------------- accelerate
def _peft_layer_kinds() -> dict:
    """``{PEFT layer class: "lora" | "ia3" | "adalora"}`` for the classes fastpeft runs (the 4-bit ones when
    bitsandbytes is importable)."""
    from peft.tuners import adalora, ia3, lora

    kinds = {lora.Linear: "lora", ia3.Linear: "ia3", adalora.SVDLinear: "adalora"}
    try:
        from peft.tuners.adalora.bnb import SVDLinear4bit
        from peft.tuners.ia3.bnb import Linear4bit as IA3Linear4bit
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # peft defines its bnb layers only when bitsandbytes is installed
        return kinds
    kinds.update({LoraLinear4bit: "lora", IA3Linear4bit: "ia3", SVDLinear4bit: "adalora"})
    return kinds


# ---------------------------------------------------------------------------------------------- the per-call gate
# An accelerated layer asks ``_fused_path`` at every call whether a fused op computes exactly what PEFT's forward
# would at that call; if not, PEFT's own forward runs. The reasons are split by how long they hold:
# ``_base_reason`` / ``_layer_reason`` (the base layer and the layer's configuration: ``accelerate`` reports them
# and leaves such layers on PEFT's class), ``_adapter_reason`` (one adapter's configuration: ``accelerate`` notes
# them, the layer is switched and runs PEFT's forward while such an adapter is active) and ``_call_reason`` (this
# call's arguments and the layer's state). Every check is a few attribute reads: no tensor is touched. They run at
# every call of every adapted layer, so each reads what it needs once (a module attribute, a ModuleDict entry cost
# about as much as a small decode-step matmul on CPU) and imports nothing.
# A new fused path is a ``(layer, x, arg) -> y`` function plus the case in ``_fused_path`` that returns it.


def _base_reason(base) -> Optional[str]:
    """Why fastpeft's ops cannot compute ``base(x)`` exactly as this base layer does, or None. Only the base
    layer itself counts (what PEFT's forward calls): a PEFT layer under a PEFT layer (stacked adapters of a mixed
    model) is not looked through."""
    if type(base) is nn.Linear:  # the common case first (bitsandbytes' Linear4bit is a subclass)
        weight = parameter(base, "weight")
        return None if weight.is_floating_point() else f"base weight dtype {weight.dtype} is not floating point"
    if _is_bnb_linear4bit(base):
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


def _layer_reason(layer) -> Optional[str]:
    """Why no call of this layer can be fused (its base), or None. (``fan_in_fan_out`` is PEFT's flag for a
    ``Conv1D`` base, which :func:`~fastpeft.peft_paths.base_weight` reads transposed.)"""
    return _base_reason(layer.base_layer)


def _adapter_reason(layer, kind: str, name: str) -> Optional[str]:
    """Why a call with adapter ``name`` active cannot be fused, or None."""
    if kind != "lora":
        return None
    variant = layer.lora_variant.get(name)
    if variant is not None and type(variant) is not _dora_variant():
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
        reason = _adapter_reason(layer, kind, name)
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


def _dora_variant() -> type:
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
    if type(base) is nn.Linear or not _is_bnb_linear4bit(base):
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
    if type(base) is not nn.Linear and _is_bnb_linear4bit(base) and bnb_runs_its_cpu_kernel(base, x):
        return "bitsandbytes multiplies this input with its own CPU 4-bit kernel (bf16): its numbers are PEFT's"
    kind = layer._fastpeft_kind
    mixed = bool(kwargs) and _mixed_batch_call(kind, args, kwargs)
    reason = (_call_reason(layer, base, () if mixed else args, {} if mixed else kwargs) or _base_reason(base)
              or _compute_dtype_reason(base, x))
    if reason is not None:
        return reason
    if mixed:
        adapter_names = kwargs["adapter_names"]
        names = mixed_batch_adapters(layer, adapter_names)
        reason = _adapters_reason(layer, kind, names) or mixed_batch_reason(layer, x, adapter_names)
        return reason or (_fused_mixed_batch, adapter_names)
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


def _accelerated_forward(self, x, *args, **kwargs):
    """The forward of an accelerated PEFT layer: the fused op :func:`_fused_path` picks, else PEFT's forward."""
    path = _fused_path(self, x, args, kwargs)
    if isinstance(path, str):
        return self._fastpeft_peft_class.forward(self, x, *args, **kwargs)
    fused_forward, arg = path
    return fused_forward(self, x, arg)


def _frozen_4bit_forward(self, x, *args, **kwargs):
    """The forward of a bitsandbytes ``Linear4bit`` no PEFT layer wraps, switched by :func:`accelerate`:
    :func:`~fastpeft.peft_paths.frozen_4bit_linear` where it computes what bitsandbytes' forward would, else
    that forward (extra arguments, autocast; a call bitsandbytes multiplies with its own CPU kernel through
    :func:`~fastpeft.peft_paths.bnb_cpu_kernel_linear`, which adds the gradient bitsandbytes' kernel lacks)."""
    if args or kwargs:
        return self._fastpeft_peft_class.forward(self, x, *args, **kwargs)
    if bnb_runs_its_cpu_kernel(self, x):
        return bnb_cpu_kernel_linear(self, x)
    if torch.is_autocast_enabled(x.device.type) or _base_reason(self) is not None:
        return self._fastpeft_peft_class.forward(self, x)
    return frozen_4bit_linear(self, x)


def _kind_label(layer, kind: str) -> str:
    if kind == "lora" and any(type(v) is _dora_variant() for v in layer.lora_variant.values()):
        kind = "dora"
    return kind + ("+nf4" if _is_bnb_linear4bit(layer.base_layer) else "")


def _reduce_as_peft_class(self, protocol):
    """Pickling (``torch.save`` of a model, or of what PEFT's ``merge_and_unload`` / ``unload`` return) writes the
    layer as PEFT's (or bitsandbytes') own class, which loads without fastpeft; the runtime class itself has no
    importable name. The object is rebuilt as ``object.__new__(peft_class)`` through copyreg's reconstructor (what
    protocols 0 and 1 write; protocol 2's ``__newobj__`` insists on the object's own class), then its state set."""
    _, _, *rest = object.__reduce_ex__(self, protocol)
    return (copyreg._reconstructor, (type(self)._fastpeft_peft_class, object, None), *rest)


def _deepcopy_keeping_class(self, memo):
    """``copy.deepcopy`` keeps the accelerated class (it would otherwise follow the pickling reduction)."""
    copied = type(self).__new__(type(self))
    memo[id(self)] = copied
    copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
    return copied


_FAST_CLASSES: dict = {}


def _fast_class(peft_class: type, kind: str) -> type:
    """The subclass of ``peft_class`` whose forward runs fastpeft's ops (one per PEFT class). It carries PEFT's
    class name, so ``repr(layer)`` and ``type(layer).__name__`` read as PEFT's, and pickles as ``peft_class``."""
    if peft_class not in _FAST_CLASSES:
        _FAST_CLASSES[peft_class] = type(
            peft_class.__name__, (peft_class,),
            {"forward": _frozen_4bit_forward if kind == "nf4" else _accelerated_forward,
             "__reduce_ex__": _reduce_as_peft_class, "__deepcopy__": _deepcopy_keeping_class,
             "_fastpeft_peft_class": peft_class, "_fastpeft_kind": kind,
             "__module__": __name__, "__qualname__": peft_class.__qualname__},
        )
    return _FAST_CLASSES[peft_class]


def _is_accelerated(module) -> bool:
    return "_fastpeft_peft_class" in type(module).__dict__


def accelerate(model: nn.Module, frozen_4bit: bool = True) -> PatchSummary:
    """Run every supported adapted layer of a PEFT model on fastpeft's ops, in place (see the module
    docstring). With ``frozen_4bit`` (the default), every bitsandbytes NF4 ``Linear4bit`` that no PEFT layer
    wraps (the frozen bases under prompt / prefix / P-tuning, BitFit, or LoRA on some modules only) runs on
    fastpeft's NF4 op too (kind ``nf4`` in the summary), as does the 4-bit base of an adapted layer when PEFT's
    forward calls it (a call the fused op does not take); ``frozen_4bit=False`` leaves them all on
    bitsandbytes' forward (and puts back any an earlier call switched). Returns the :class:`PatchSummary` (also logged);
    idempotent. Raises ``ValueError``, saying what the model holds, if there is nothing to accelerate."""
    summary = PatchSummary()
    inside_peft_layers: set = set()
    if "peft" in sys.modules:  # a model with PEFT layers has imported peft already
        from peft.tuners.tuners_utils import BaseTunerLayer

        kinds = _peft_layer_kinds()
        activation_dtype = _activation_dtype(model)
        for name, module in model.named_modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            inside_peft_layers.update(id(m) for m in module.modules())
            peft_class = module._fastpeft_peft_class if _is_accelerated(module) else type(module)
            kind = kinds.get(peft_class)
            if kind is None:
                summary.skipped[name] = f"PEFT layer {peft_class.__module__}.{peft_class.__qualname__} is not supported"
                continue
            reason = _layer_reason(module)
            if reason is not None:
                module.__class__ = peft_class  # an earlier accelerate may have switched it
                summary.skipped[name] = reason
                continue
            module.__class__ = _fast_class(peft_class, kind)
            summary.replaced[name] = _kind_label(module, kind)
            unfused = _compute_dtype_note(module.base_layer, activation_dtype)
            if unfused is not None:
                summary.unfused[name] = unfused
            adapters = module.ia3_l if kind == "ia3" else module.lora_A
            notes = [why for why in (_adapter_reason(module, kind, a) for a in adapters) if why is not None]
            if notes:
                summary.peft_forward[name] = "; ".join(notes)
    _accelerate_frozen_4bit(model, inside_peft_layers, frozen_4bit, summary)
    if not summary.replaced and not summary.skipped:
        raise ValueError(_nothing_to_accelerate(model, frozen_4bit))
    (logger.warning if summary.skipped or summary.peft_forward else logger.info)("%s", summary)
    return summary


def _activation_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's activations as its input embeddings give them, or None when it has none."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None


def _compute_dtype_note(base, activation_dtype: Optional[torch.dtype]) -> Optional[str]:
    """Why the adapted layer over ``base`` will run PEFT's forward on activations of ``activation_dtype`` (a 4-bit
    base whose compute dtype is another: :func:`_compute_dtype_reason` at every call), or None."""
    compute_dtype = getattr(base, "compute_dtype", None) if _is_bnb_linear4bit(base) else None
    if activation_dtype is None or compute_dtype is None or compute_dtype == activation_dtype:
        return None
    return (f"bitsandbytes computes the 4-bit base in {compute_dtype} (bnb_4bit_compute_dtype) and this model's "
            f"activations are {activation_dtype}; load it with bnb_4bit_compute_dtype={activation_dtype} to fuse "
            "its calls")


def _accelerate_frozen_4bit(model: nn.Module, inside_peft_layers: set, enabled: bool, summary: PatchSummary) -> None:
    """Switch (or, not ``enabled``, switch back) every bitsandbytes ``Linear4bit`` of the model. Those no PEFT layer
    wraps are reported (kind ``nf4``, or skipped with the reason); the base layer of a PEFT layer is not a layer
    of its own to the user: switched silently, it serves PEFT's forward whenever that runs (a call the fused op
    does not take: another compute dtype, disabled adapters, hooks), as bitsandbytes' forward would."""
    if "bitsandbytes" not in sys.modules:  # a model with 4-bit layers has imported bitsandbytes already
        return
    for name, module in model.named_modules():
        if not _is_bnb_linear4bit(module):
            continue
        original = module._fastpeft_peft_class if _is_accelerated(module) else type(module)
        if not enabled:
            module.__class__ = original
            continue
        reported = id(module) not in inside_peft_layers
        reason = _base_reason(module)
        if reason is not None:
            module.__class__ = original
            if reported:
                summary.skipped[name] = reason
            continue
        module.__class__ = _fast_class(original, "nf4")
        if reported:
            summary.replaced[name] = "nf4"


def _nothing_to_accelerate(model: nn.Module, frozen_4bit: bool) -> str:
    """The error for a model with no layer :func:`accelerate` switches: what it holds, what fastpeft does."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return (f"{type(model).__name__} has no PEFT adapter layers: wrap it with peft.get_peft_model first, or add "
                "adapters without peft with fastpeft.inject(model, r=..., target_modules=...)")
    kinds = sorted({str(getattr(config.peft_type, "value", config.peft_type)) for config in configs.values()})
    text = (f"this PEFT model's adapters ({', '.join(kinds)}) add no adapted layers: fastpeft accelerates LoRA, DoRA "
            "and IA3 layers, and the frozen bitsandbytes 4-bit linear layers of any model; ")
    if not frozen_4bit and any(_is_bnb_linear4bit(m) for m in model.modules()):
        return text + "its 4-bit layers were left on bitsandbytes by frozen_4bit=False. Nothing to accelerate"
    return text + "it has neither (prompt / prefix / P-tuning run in its embeddings and attention). Nothing to accelerate"


def restore(model: nn.Module) -> int:
    """Put PEFT's (and bitsandbytes') own layer classes back on every layer :func:`accelerate` switched;
    returns how many. Raises ``ValueError`` if none was."""
    count = 0
    for module in model.modules():
        if _is_accelerated(module):
            module.__class__ = module._fastpeft_peft_class
            module.__dict__.pop("_fastpeft_bank", None)  # the mixed-batch adapter bank (fastpeft.peft_paths)
            count += 1
    if count == 0:
        raise ValueError("no layer of this model was accelerated by fastpeft.accelerate")
    return count


# ---------------------------------------------------------------------------------------------- inject
def _linear_kind(module) -> Optional[str]:
    """``"dense"`` / ``"nf4"`` for a base fastpeft can adapt, else None."""
    if _is_bnb_linear4bit(module):
        return "nf4"
    if type(module) is nn.Linear and module.weight.is_floating_point():
        return "dense"
    return None


def _output_layer_names(model: nn.Module) -> set:
    """The output head(s) ``"all-linear"`` leaves out, as PEFT does: the output embeddings, else ``lm_head``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    return names or {"lm_head"}


def _targets(model: nn.Module, target_modules) -> tuple[list, dict]:
    """``([module paths to adapt], {targeted path: reason it cannot be})`` for PEFT-style ``target_modules``:
    a list of names (a path or its last components), a regex matched against the full path, or
    ``"all-linear"``."""
    all_linear = isinstance(target_modules, str) and target_modules == "all-linear"
    # PEFT drops the head by its last name component
    heads = {h.split(".")[-1] for h in _output_layer_names(model)} if all_linear else set()
    chosen, skipped = [], {}
    for name, module in model.named_modules():
        if not name:
            continue
        if all_linear:
            if name.split(".")[-1] in heads:
                continue
            if _linear_kind(module) is not None:
                chosen.append(name)
            continue
        if _matches_any(name, target_modules):
            if _linear_kind(module) is None:
                skipped[name] = f"{type(module).__name__} is not a float torch.nn.Linear or bitsandbytes Linear4bit"
            else:
                chosen.append(name)
    return chosen, skipped


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _freeze_all_but_adapters(model: nn.Module) -> None:
    """PEFT's rule: only adapter parameters train."""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
            if isinstance(module, DoraLinear):
                module.lora_magnitude_vector.requires_grad_(True)
        elif isinstance(module, IA3Linear):
            module.ia3_l.requires_grad_(True)


def _base_model_name(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def inject(
    model: nn.Module,
    r: int = 8,
    alpha: float = 8.0,
    target_modules: Union[Sequence[str], str] = "all-linear",
    dropout: float = 0.0,
    use_dora: bool = False,
    use_rslora: bool = False,
    init_lora_weights: Union[bool, str] = True,
    method: str = "lora",
    **method_options,
) -> PatchSummary:
    """Add a LoRA (or DoRA) adapter to any model without peft, in place: every targeted ``nn.Linear`` /
    bitsandbytes ``Linear4bit`` becomes a :class:`~fastpeft.nn.LoraLinear` (:class:`~fastpeft.nn.DoraLinear`
    with ``use_dora``) over it, and every other parameter is frozen. ``target_modules`` follows PEFT: module
    names (``["q_proj", "v_proj"]``), a regex for the full path, or ``"all-linear"`` (every linear layer but
    the output head). Returns the :class:`PatchSummary`; targeted layers of another kind are reported in it.
    The adapter's PEFT config is kept on the model for :func:`save_model_adapter`.

    ``method="diffprune"`` runs :func:`fastpeft.diffprune.inject` instead, with ``target_modules`` and the keyword
    arguments it takes (``sparsity=``, ``structured=``, ``l0_lambda=``, ...) in ``method_options``."""
    if method not in ("lora", "diffprune"):
        raise ValueError(f"unknown method={method!r}: 'lora' or 'diffprune'")
    if method == "diffprune":
        lora_options = {"r": r, "alpha": alpha, "dropout": dropout, "use_dora": use_dora, "use_rslora": use_rslora,
                        "init_lora_weights": init_lora_weights}
        given = sorted(k for k, v in lora_options.items() if v != inspect.signature(inject).parameters[k].default)
        if given:
            raise ValueError(f"the LoRA options {given} do not apply to method='diffprune'")
        from .diffprune import inject as inject_diffprune

        return inject_diffprune(model, target_modules, **method_options)
    if method_options:
        raise TypeError(f"inject() got unexpected keyword arguments {sorted(method_options)} for method='lora'")
    if any(isinstance(m, _FAST_LAYERS) for m in model.modules()):
        raise ValueError("this model already has fastpeft adapter layers (inject or load_model_adapter ran on it)")
    if "peft" in sys.modules:
        from peft.tuners.tuners_utils import BaseTunerLayer

        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ValueError("this is a PEFT model: use fastpeft.accelerate(model) on it instead of inject")
    if not target_modules:
        raise ValueError("target_modules is empty: give module names, a regex, or 'all-linear'")
    chosen, skipped = _targets(model, target_modules)
    if not chosen:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if _linear_kind(m) is not None})
        raise ValueError(f"target_modules={target_modules!r} matched no linear layer; the model's linear layers "
                         f"are named {linear}")
    layer_class = DoraLinear if use_dora else LoraLinear
    summary = PatchSummary(skipped=skipped)
    for name in chosen:
        base = model.get_submodule(name)
        kind = ("dora" if use_dora else "lora") + ("+nf4" if _linear_kind(base) == "nf4" else "")
        _set_submodule(model, name, layer_class(base, r, alpha, dropout, use_rslora, init_lora_weights))
        summary.replaced[name] = kind
    _freeze_all_but_adapters(model)
    model._fastpeft_adapter_config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_dora": use_dora,
        "use_rslora": use_rslora, "init_lora_weights": init_lora_weights, "bias": "none", "fan_in_fan_out": False,
        "target_modules": target_modules if isinstance(target_modules, str) else sorted(set(target_modules)),
        "modules_to_save": None, "task_type": None, "base_model_name_or_path": _base_model_name(model),
    }
    (logger.warning if skipped else logger.info)("%s", summary)
    return summary


# ---------------------------------------------------------------------------------------------- adapter files
def _fast_layers(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, _FAST_LAYERS)}


def _fast_layer_kind(layer) -> str:
    """The :class:`PatchSummary` kind of a fastpeft layer."""
    kind = "ia3" if isinstance(layer, IA3Linear) else "dora" if isinstance(layer, DoraLinear) else "lora"
    return kind + ("+nf4" if layer.is_nf4 else "")


def save_model_adapter(model: nn.Module, path: Union[str, Path]) -> None:
    """Write the adapter of a model prepared by :func:`inject` or :func:`load_model_adapter` as a PEFT adapter
    directory (``PeftModel.from_pretrained(base_model, path)`` loads it)."""
    layers = _fast_layers(model)
    config = getattr(model, "_fastpeft_adapter_config", None)
    if not layers or config is None:
        raise ValueError("this model has no fastpeft adapter to save: prepare it with fastpeft.inject or "
                         "fastpeft.load_model_adapter (a PEFT model saves itself with model.save_pretrained)")
    tensors = {}
    for name, layer in layers.items():
        key = _PEFT_PREFIX + name
        if isinstance(layer, IA3Linear):
            tensors[key + ".ia3_l"] = layer.peft_ia3_l()
            continue
        tensors[key + ".lora_A.weight"] = layer.lora_A
        tensors[key + ".lora_B.weight"] = layer.lora_B
        if isinstance(layer, DoraLinear):
            tensors[key + ".lora_magnitude_vector"] = layer.lora_magnitude_vector
    save_adapter(Adapter(config=dict(config), tensors=tensors), path)


def _check_shapes(name: str, base, module_adapter: ModuleAdapter) -> None:
    """A clear error, naming the module, when an adapter does not fit the layer it is loaded into."""
    in_f, out_f = base.in_features, base.out_features
    for label, tensor in (("lora_A", module_adapter.lora_a), ("lora_B", module_adapter.lora_b),
                          ("lora_magnitude_vector", module_adapter.magnitude), ("ia3_l", module_adapter.ia3_scale)):
        if tensor is not None and not tensor.is_floating_point():
            raise TypeError(f"{name}.{label} has dtype {tensor.dtype}; adapter tensors must be floating point")
    if module_adapter.ia3_scale is not None:
        expected = in_f if module_adapter.is_feedforward else out_f
        if module_adapter.ia3_scale.numel() != expected:
            raise ValueError(f"{name}.ia3_l has {module_adapter.ia3_scale.numel()} values; the layer "
                             f"({out_f}x{in_f}) needs {expected}")
        return
    rank = module_adapter.rank
    got = (tuple(module_adapter.lora_a.shape), tuple(module_adapter.lora_b.shape))
    if got != ((rank, in_f), (out_f, rank)):
        raise ValueError(f"{name}: lora_A {got[0]} and lora_B {got[1]} do not fit the layer (in={in_f}, "
                         f"out={out_f}): they must be (r, {in_f}) and ({out_f}, r)")
    if module_adapter.magnitude is not None and tuple(module_adapter.magnitude.shape) != (out_f,):
        raise ValueError(f"{name}.lora_magnitude_vector is {tuple(module_adapter.magnitude.shape)}, the layer "
                         f"needs ({out_f},)")


def _build_layer(base, module_adapter: ModuleAdapter, dropout: float) -> nn.Module:
    if module_adapter.ia3_scale is not None:
        return IA3Linear.from_adapter(base, module_adapter)
    # the parameters in the dtype PeftModel.from_pretrained gives them on this base, not the file's
    dtype = peft_adapter_dtype(torch.float32 if _is_bnb_linear4bit(base) else base.weight.dtype)
    module_adapter = dataclasses.replace(module_adapter, **{
        name: getattr(module_adapter, name).to(dtype) for name in ("lora_a", "lora_b", "magnitude")
        if getattr(module_adapter, name) is not None})
    if module_adapter.magnitude is not None:
        return DoraLinear.from_adapter(base, module_adapter, dropout)
    layer_device = base.weight.device
    return LoraLinear.from_parameters(
        base, nn.Parameter(module_adapter.lora_a.detach().clone().to(layer_device)),
        nn.Parameter(module_adapter.lora_b.detach().clone().to(layer_device)), module_adapter.scaling,
        nn.Dropout(dropout) if dropout > 0.0 else nn.Identity(),
    )


@torch.no_grad()
def _copy_into(name: str, layer, module_adapter: ModuleAdapter) -> None:
    pairs = []
    if isinstance(layer, IA3Linear):
        if module_adapter.ia3_scale is None or module_adapter.is_feedforward != layer.is_feedforward:
            raise ValueError(f"{name} is an IA3 layer (is_feedforward={layer.is_feedforward}); the adapter's entry "
                             "does not match it")
        pairs.append((layer.ia3_l, module_adapter.ia3_scale.reshape(layer.ia3_l.shape)))
    else:
        if module_adapter.lora_a is None or (module_adapter.magnitude is None) == isinstance(layer, DoraLinear):
            raise ValueError(f"{name} is a {type(layer).__name__}; the adapter's entry is of another kind")
        if module_adapter.rank != layer.r:
            raise ValueError(f"{name}: the adapter has rank {module_adapter.rank}, the layer rank {layer.r}")
        pairs += [(layer.lora_A, module_adapter.lora_a), (layer.lora_B, module_adapter.lora_b)]
        if isinstance(layer, DoraLinear):
            pairs.append((layer.lora_magnitude_vector, module_adapter.magnitude))
        layer.scaling = module_adapter.scaling
    for param, value in pairs:
        param.copy_(value)


def load_model_adapter(model: nn.Module, source: Union[str, Path, Adapter], trainable: bool = True) -> PatchSummary:
    """Load a PEFT-format adapter (a directory or an :class:`~fastpeft.adapters.Adapter`; LoRA, DoRA or
    IA3) into a model without peft: into its fastpeft layers if :func:`inject` or an earlier load made them,
    else replacing each adapted ``nn.Linear`` / ``Linear4bit`` with a fastpeft layer holding a copy. The model
    then holds this adapter alone: a fastpeft layer it does not adapt is unmerged and replaced by its base layer.
    Every error (a module the model lacks, a shape that does not fit, a layer of another kind) names the
    module and is raised before the model is changed. With ``trainable`` only the adapter trains, without it
    nothing does (inference)."""
    adapter = source if isinstance(source, Adapter) else load_adapter(source)
    modules = dict(model.named_modules())
    entries = adapter.modules(modules)
    for name, entry in entries.items():
        module = modules[name]
        if isinstance(module, _FAST_LAYERS):
            _check_shapes(name, module, entry)
        elif _linear_kind(module) is None:
            raise TypeError(f"the adapter adapts {name!r}, a {type(module).__name__}; fastpeft adapts float "
                            "torch.nn.Linear and bitsandbytes Linear4bit layers")
        else:
            _check_shapes(name, module, entry)
    summary = PatchSummary()
    for name, layer in _fast_layers(model).items():
        if name not in entries:
            layer.unmerge()
            _set_submodule(model, name, layer.base_layer)
            summary.removed[name] = _fast_layer_kind(layer)
    dropout = float(adapter.config.get("lora_dropout", 0.0) or 0.0)
    for name, entry in entries.items():
        module = modules[name]
        if isinstance(module, _FAST_LAYERS):
            _copy_into(name, module, entry)
            layer = module
        else:
            layer = _build_layer(module, entry, dropout)
            _set_submodule(model, name, layer)
        summary.replaced[name] = _fast_layer_kind(layer)
    if trainable:
        _freeze_all_but_adapters(model)
    else:
        model.requires_grad_(False)
    model._fastpeft_adapter_config = dict(adapter.config)
    logger.info("%s", summary)
    return summary


# ---------------------------------------------------------------------------------------------- counting
def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, as PEFT's ``get_nb_trainable_parameters`` counts them: a
    bitsandbytes 4-bit parameter holds two values per storage byte."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if type(param).__name__ == "Params4bit":
            count *= 2 * param.element_size()
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: ``trainable params: … || all params: … || trainable%: …``."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")
