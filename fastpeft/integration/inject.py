"""Adding adapters to any model without peft: ``inject(model, r=..., ...)`` replaces the targeted ``nn.Linear`` /
bitsandbytes ``Linear4bit`` layers with :class:`~fastpeft.nn.LoraLinear` / :class:`~fastpeft.nn.DoraLinear` over
them and freezes the rest, as PEFT's ``get_peft_model`` would; the adapter's PEFT config stays on the model for
:func:`~fastpeft.save_model_adapter`. The helpers that put fastpeft's own layers into a model and freeze all but
their adapters serve :mod:`fastpeft.integration.adapter_files` too."""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence, Union

from torch import nn

from ..adapters import matches_any
from ..nn.dora import DoraLinear
from ..nn.ia3 import IA3Linear
from ..nn.lora import LoraLinear, is_bnb_linear4bit
from .summary import PatchSummary

__all__ = ["inject"]

logger = logging.getLogger("fastpeft")

FAST_LAYERS = (LoraLinear, IA3Linear)  # fastpeft's own adapter layers (DoraLinear is a LoraLinear)


def linear_kind(module) -> Optional[str]:
    """``"dense"`` / ``"nf4"`` for a base fastpeft can adapt, else None."""
    if is_bnb_linear4bit(module):
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
            if linear_kind(module) is not None:
                chosen.append(name)
            continue
        if matches_any(name, target_modules):
            if linear_kind(module) is None:
                skipped[name] = f"{type(module).__name__} is not a float torch.nn.Linear or bitsandbytes Linear4bit"
            else:
                chosen.append(name)
    return chosen, skipped


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def freeze_all_but_adapters(model: nn.Module) -> None:
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
) -> PatchSummary:
    """Add a LoRA (or DoRA) adapter to any model without peft, in place: every targeted ``nn.Linear`` /
    bitsandbytes ``Linear4bit`` becomes a :class:`~fastpeft.nn.LoraLinear` (:class:`~fastpeft.nn.DoraLinear`
    with ``use_dora``) over it, and every other parameter is frozen. ``target_modules`` follows PEFT: module
    names (``["q_proj", "v_proj"]``), a regex for the full path, or ``"all-linear"`` (every linear layer but
    the output head). Returns the :class:`PatchSummary`; targeted layers of another kind are reported in it.
    The adapter's PEFT config is kept on the model for :func:`~fastpeft.save_model_adapter`."""
    if any(isinstance(m, FAST_LAYERS) for m in model.modules()):
        raise ValueError("this model already has fastpeft adapter layers (inject or load_model_adapter ran on it)")
    if "peft" in sys.modules:
        from peft.tuners.tuners_utils import BaseTunerLayer

        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ValueError("this is a PEFT model: use fastpeft.accelerate(model) on it instead of inject")
    if not target_modules:
        raise ValueError("target_modules is empty: give module names, a regex, or 'all-linear'")
    chosen, skipped = _targets(model, target_modules)
    if not chosen:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if linear_kind(m) is not None})
        raise ValueError(f"target_modules={target_modules!r} matched no linear layer; the model's linear layers "
                         f"are named {linear}")
    layer_class = DoraLinear if use_dora else LoraLinear
    summary = PatchSummary(skipped=skipped)
    for name in chosen:
        base = model.get_submodule(name)
        kind = ("dora" if use_dora else "lora") + ("+nf4" if linear_kind(base) == "nf4" else "")
        set_submodule(model, name, layer_class(base, r, alpha, dropout, use_rslora, init_lora_weights))
        summary.replaced[name] = kind
    freeze_all_but_adapters(model)
    model._fastpeft_adapter_config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_dora": use_dora,
        "use_rslora": use_rslora, "init_lora_weights": init_lora_weights, "bias": "none", "fan_in_fan_out": False,
        "target_modules": target_modules if isinstance(target_modules, str) else sorted(set(target_modules)),
        "modules_to_save": None, "task_type": None, "base_model_name_or_path": _base_model_name(model),
    }
    (logger.warning if skipped else logger.info)("%s", summary)
    return summary
