"""Adding adapters to any model without peft: ``inject(model, r=..., ...)`` replaces the targeted ``nn.Linear`` /
bitsandbytes ``Linear4bit`` layers with :class:`~fastpeft.nn.LoraLinear` / :class:`~fastpeft.nn.DoraLinear` over
them and freezes the rest, as PEFT's ``get_peft_model`` would; the adapter's PEFT config stays on the model for
:func:`~fastpeft.save_model_adapter`. The helpers that put fastpeft's own layers into a model and freeze all but
their adapters serve :mod:`fastpeft.integration.adapter_files` too."""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Sequence, Union

from torch import nn

from ..nn.diffprune import DiffPruneLinear
from ..nn.dora import DoraLinear
from ..nn.ia3 import IA3Linear
from ..nn.lora import LoraLinear
from ..diffprune import inject as inject_diffprune
from .summary import PatchSummary
from .targets import base_model_name, linear_kind, select_targets, set_submodule

__all__ = ["inject"]

logger = logging.getLogger("fastpeft")

FAST_LAYERS = (LoraLinear, IA3Linear)  # fastpeft's own adapter layers (DoraLinear is a LoraLinear)


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
    The adapter's PEFT config is kept on the model for :func:`~fastpeft.save_model_adapter`.

    ``method="diffprune"`` runs :func:`fastpeft.diffprune.inject` instead, with ``target_modules`` and the keyword
    arguments it takes (``sparsity=``, ``structured=``, ``l0_lambda=``, ...) in ``method_options``."""
    if method not in ("lora", "diffprune"):
        raise ValueError(f"unknown method={method!r}: 'lora' or 'diffprune'")
    if method == "diffprune":
        lora_options = {"r": r, "alpha": alpha, "dropout": dropout, "use_dora": use_dora, "use_rslora": use_rslora,
                        "init_lora_weights": init_lora_weights}
        given = sorted(k for k, v in lora_options.items() if v != _LORA_DEFAULTS[k])
        if given:
            raise ValueError(f"the LoRA options {given} do not apply to method='diffprune'")
        return inject_diffprune(model, target_modules, **method_options)
    if method_options:
        raise TypeError(f"inject() got unexpected keyword arguments {sorted(method_options)} for method='lora'")
    if any(isinstance(m, (*FAST_LAYERS, DiffPruneLinear)) for m in model.modules()):
        raise ValueError("this model already has fastpeft adapter layers (inject or load_model_adapter ran on it)")
    if "peft" in sys.modules:
        from peft.tuners.tuners_utils import BaseTunerLayer

        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ValueError("this is a PEFT model: use fastpeft.accelerate(model) on it instead of inject")
    chosen, skipped = select_targets(model, target_modules)
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
        "modules_to_save": None, "task_type": None, "base_model_name_or_path": base_model_name(model),
    }
    (logger.warning if skipped else logger.info)("%s", summary)
    return summary


# inject's LoRA keyword defaults: method='diffprune' refuses any other value of them
_LORA_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(inject).parameters.items()
                  if name in ("r", "alpha", "dropout", "use_dora", "use_rslora", "init_lora_weights")}
