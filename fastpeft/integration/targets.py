"""Which layers of a model an adapter method targets (PEFT's ``target_modules`` rules), and putting a layer in place."""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..adapters import matches_any
from ..nn.lora import is_bnb_linear4bit

__all__ = ["linear_kind", "select_targets", "set_submodule", "base_model_name"]


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


def select_targets(model: nn.Module, target_modules) -> tuple[list, dict]:
    """``([module paths to adapt], {targeted path: reason it cannot be})`` for PEFT-style ``target_modules``:
    a list of names (a path or its last components), a regex matched against the full path, or
    ``"all-linear"``. ``ValueError`` when ``target_modules`` is empty or matches no linear layer."""
    if not target_modules:
        raise ValueError("target_modules is empty: give module names, a regex, or 'all-linear'")
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
    if not chosen:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if linear_kind(m) is not None})
        raise ValueError(f"target_modules={target_modules!r} matched no linear layer; the model's linear layers "
                         f"are named {linear}")
    return chosen, skipped


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def base_model_name(model: nn.Module) -> Optional[str]:
    """The model's ``name_or_path`` from its config, as PEFT records ``base_model_name_or_path``; None without one."""
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
