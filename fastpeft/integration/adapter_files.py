"""A fastpeft model's adapter in PEFT's format, without peft: ``save_model_adapter`` writes the adapter of a model
prepared by :func:`~fastpeft.inject` or ``load_model_adapter`` as a PEFT adapter directory, and
``load_model_adapter`` reads one (LoRA, DoRA or IA3, PEFT's or fastpeft's) into a model's fastpeft layers,
making them where the model has none (through :mod:`fastpeft.adapters`), so PEFT loads what fastpeft trained
and the other way round."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Union

import torch
from torch import nn

from ..adapters import Adapter, ModuleAdapter, load_adapter, save_adapter
from ..bank import peft_adapter_dtype
from ..nn.dora import DoraLinear
from ..nn.ia3 import IA3Linear
from ..nn.lora import LoraLinear, is_bnb_linear4bit
from .inject import FAST_LAYERS, freeze_all_but_adapters
from .targets import linear_kind, set_submodule
from .summary import PatchSummary

__all__ = ["save_model_adapter", "load_model_adapter"]

logger = logging.getLogger("fastpeft")

_PEFT_PREFIX = "base_model.model."


def _fast_layers(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, FAST_LAYERS)}


def _fast_layer_kind(layer) -> str:
    """The :class:`PatchSummary` kind of a fastpeft layer."""
    kind = "ia3" if isinstance(layer, IA3Linear) else "dora" if isinstance(layer, DoraLinear) else "lora"
    return kind + ("+nf4" if layer.is_nf4 else "")


def save_model_adapter(model: nn.Module, path: Union[str, Path]) -> None:
    """Write the adapter of a model prepared by :func:`~fastpeft.inject` or :func:`load_model_adapter` as a PEFT adapter
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
    dtype = peft_adapter_dtype(torch.float32 if is_bnb_linear4bit(base) else base.weight.dtype)
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
    IA3) into a model without peft: into its fastpeft layers if :func:`~fastpeft.inject` or an earlier load made them,
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
        if isinstance(module, FAST_LAYERS):
            _check_shapes(name, module, entry)
        elif linear_kind(module) is None:
            raise TypeError(f"the adapter adapts {name!r}, a {type(module).__name__}; fastpeft adapts float "
                            "torch.nn.Linear and bitsandbytes Linear4bit layers")
        else:
            _check_shapes(name, module, entry)
    summary = PatchSummary()
    for name, layer in _fast_layers(model).items():
        if name not in entries:
            layer.unmerge()
            set_submodule(model, name, layer.base_layer)
            summary.removed[name] = _fast_layer_kind(layer)
    dropout = float(adapter.config.get("lora_dropout", 0.0) or 0.0)
    for name, entry in entries.items():
        module = modules[name]
        if isinstance(module, FAST_LAYERS):
            _copy_into(name, module, entry)
            layer = module
        else:
            layer = _build_layer(module, entry, dropout)
            set_submodule(model, name, layer)
        summary.replaced[name] = _fast_layer_kind(layer)
    if trainable:
        freeze_all_but_adapters(model)
    else:
        model.requires_grad_(False)
    model._fastpeft_adapter_config = dict(adapter.config)
    logger.info("%s", summary)
    return summary
