"""Accelerating a PEFT model in place: ``accelerate(model)`` walks it and switches every supported adapted layer
(PEFT's LoRA / DoRA / IA3 / AdaLoRA ``Linear`` layers over ``nn.Linear``, GPT-2-style ``Conv1D`` and bitsandbytes
``Linear4bit`` bases) to fastpeft's fused ops **by changing the layer's class in place** to a subclass of PEFT's
own class (:mod:`fastpeft.integration.layer_classes`) whose ``forward`` calls ``fastpeft.ops``
(:mod:`fastpeft.integration.fused_forward`). Nothing else changes: the layer keeps its ``base_layer``, its
``lora_A`` / ``lora_B`` / ``lora_magnitude_vector`` / ``ia3_l`` ModuleDicts and the very same Parameter objects, so
the optimizer's parameters, the state-dict keys and PEFT's ``save_pretrained`` / ``load_adapter`` /
``set_adapter`` / ``merge_and_unload`` / ``disable_adapter`` keep working (they see a PEFT layer; ``isinstance``
holds; the class keeps PEFT's name, so ``repr`` is PEFT's). The forward reads PEFT's state at each call, so nothing
goes stale, and runs a fused op only when it computes exactly what PEFT's forward would at that call (several
active LoRA adapters, ``adapter_names=`` mixed batches, ``lora_bias`` and AdaLoRA are fused too, see
:mod:`fastpeft.integration.peft_paths`); otherwise PEFT's own forward. The bitsandbytes 4-bit layers no PEFT layer
wraps, and the 4-bit base of an adapted layer whenever PEFT's forward calls it, run fastpeft's NF4 op too
(:mod:`fastpeft.integration.frozen_4bit`), unless ``frozen_4bit=False``. ``restore(model)`` puts PEFT's (and
bitsandbytes') classes back. Layers fastpeft cannot run at all (embeddings, convolutions, 8-bit bases, a PEFT layer
as base layer) are left on PEFT's class and reported in the returned :class:`PatchSummary` and a log line.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

import torch
from torch import nn

from ..nn.lora import is_bnb_linear4bit
from .frozen_4bit import accelerate_frozen_4bit
from .fused_forward import accelerated_forward, adapter_reason, dora_variant, layer_reason
from .layer_classes import fast_class, is_accelerated
from .peft_paths import forget_bank
from .summary import PatchSummary

__all__ = ["accelerate", "restore"]

logger = logging.getLogger("fastpeft")


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


def _kind_label(layer, kind: str) -> str:
    if kind == "lora" and any(type(v) is dora_variant() for v in layer.lora_variant.values()):
        kind = "dora"
    return kind + ("+nf4" if is_bnb_linear4bit(layer.base_layer) else "")


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
            peft_class = module._fastpeft_peft_class if is_accelerated(module) else type(module)
            kind = kinds.get(peft_class)
            if kind is None:
                summary.skipped[name] = f"PEFT layer {peft_class.__module__}.{peft_class.__qualname__} is not supported"
                continue
            reason = layer_reason(module)
            if reason is not None:
                module.__class__ = peft_class  # an earlier accelerate may have switched it
                summary.skipped[name] = reason
                continue
            module.__class__ = fast_class(peft_class, kind, accelerated_forward)
            summary.replaced[name] = _kind_label(module, kind)
            unfused = _compute_dtype_note(module.base_layer, activation_dtype)
            if unfused is not None:
                summary.unfused[name] = unfused
            adapters = module.ia3_l if kind == "ia3" else module.lora_A
            notes = [why for why in (adapter_reason(module, kind, a) for a in adapters) if why is not None]
            if notes:
                summary.peft_forward[name] = "; ".join(notes)
    accelerate_frozen_4bit(model, inside_peft_layers, frozen_4bit, summary)
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
    base whose compute dtype is another: ``fused_forward._compute_dtype_reason`` at every call), or None."""
    compute_dtype = getattr(base, "compute_dtype", None) if is_bnb_linear4bit(base) else None
    if activation_dtype is None or compute_dtype is None or compute_dtype == activation_dtype:
        return None
    return (f"bitsandbytes computes the 4-bit base in {compute_dtype} (bnb_4bit_compute_dtype) and this model's "
            f"activations are {activation_dtype}; load it with bnb_4bit_compute_dtype={activation_dtype} to fuse "
            "its calls")


def _nothing_to_accelerate(model: nn.Module, frozen_4bit: bool) -> str:
    """The error for a model with no layer :func:`accelerate` switches: what it holds, what fastpeft does."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return (f"{type(model).__name__} has no PEFT adapter layers: wrap it with peft.get_peft_model first, or add "
                "adapters without peft with fastpeft.inject(model, r=..., target_modules=...)")
    kinds = sorted({str(getattr(config.peft_type, "value", config.peft_type)) for config in configs.values()})
    text = (f"this PEFT model's adapters ({', '.join(kinds)}) add no adapted layers: fastpeft accelerates LoRA, DoRA "
            "and IA3 layers, and the frozen bitsandbytes 4-bit linear layers of any model; ")
    if not frozen_4bit and any(is_bnb_linear4bit(m) for m in model.modules()):
        return text + "its 4-bit layers were left on bitsandbytes by frozen_4bit=False. Nothing to accelerate"
    return text + "it has neither (prompt / prefix / P-tuning run in its embeddings and attention). Nothing to accelerate"


def restore(model: nn.Module) -> int:
    """Put PEFT's (and bitsandbytes') own layer classes back on every layer :func:`accelerate` switched;
    returns how many. Raises ``ValueError`` if none was."""
    count = 0
    for module in model.modules():
        if is_accelerated(module):
            module.__class__ = module._fastpeft_peft_class
            forget_bank(module)
            count += 1
    if count == 0:
        raise ValueError("no layer of this model was accelerated by fastpeft.accelerate")
    return count
