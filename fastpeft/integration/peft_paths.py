"""Fused paths for PEFT LoRA layer states beyond "one plain adapter active": the pieces
:mod:`fastpeft.integration.fused_forward` calls from an accelerated layer's forward.

A path is a ``*_reason`` function, which ``fused_forward._fused_path`` asks at each call (why the fused op
would not compute exactly what PEFT's forward does at this call, or None; PEFT's forward runs then), and the
function computing it. They read PEFT's state at each call (``active_adapters``, ``scaling``, dropout
modules, parameters), so nothing goes stale.

- :func:`combined_lora_factors`: several LoRA adapters active in one layer (``set_adapter([...])`` on the
  tuner). PEFT adds ``s_i · B_i A_i drop_i(x)`` adapter by adapter; without active dropout that sum is one
  LoRA term with concatenated factors ``A = cat(A_i)`` ``(Σr_i, in)`` and ``B = cat(s_i · B_i)``
  ``(out, Σr_i)`` (the scalings folded into ``B`` differentiably, so each ``A_i`` / ``B_i`` gets PEFT's
  gradient through ``cat``), plus ``Σ s_i · b_i`` for adapters with ``lora_bias``.
- :func:`mixed_batch_lora`: ``model(..., adapter_names=[...])`` / ``generate(adapter_names=...)``. PEFT's
  ``_mixed_batch_forward`` runs the base once and, per distinct adapter, the LoRA term of its rows; here the
  layer's LoRA adapters are packed into a :class:`~fastpeft.bank.LoraBank` (:meth:`~fastpeft.bank.LoraBank.pack`,
  as serving packs them) once per call of the PEFT model (a forward, or a whole ``generate``) and
  :func:`~fastpeft.nn.multi_lora.add_lora_terms` adds every row's term in one call of the multi-LoRA op. Inference
  only; a call that trains (autograd recording, a factor or ``x`` requiring a gradient) takes the training path of
  :mod:`fastpeft.integration.multi_adapter_training` instead.
- :func:`adalora_factors`: AdaLoRA's ``SVDLinear`` term as plain LoRA factors for the fused op.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import nn

from ..adapters import ModuleAdapter
from ..bank import LoraBank
from ..nn.lora import LoraLinear
from ..nn.multi_lora import add_lora_terms
from ..ops.multi_lora import MultiLoraMeta

__all__ = ["base_weight", "is_conv1d", "several_adapters_reason", "combined_lora_factors", "adalora_factors",
           "mixed_batch_adapters", "mixed_batch_reason", "mixed_batch_lora", "forget_bank", "dropout_active"]


def dropout_active(dropout: nn.Module) -> bool:
    """Whether PEFT's LoRA dropout module changes its input at this call."""
    if isinstance(dropout, nn.Identity):
        return False
    if isinstance(dropout, nn.Dropout):
        return dropout.training and dropout.p > 0.0
    return True  # an unknown module: assume it does


def _lora_bias(layer, name: str) -> Optional[torch.Tensor]:
    return layer.lora_B[name].bias if layer.lora_bias.get(name, False) else None


def _dtypes(layer, names) -> set:
    return {layer.lora_A[name].weight.dtype for name in names} | {layer.lora_B[name].weight.dtype for name in names}


def several_adapters_reason(layer, names: Sequence[str]) -> Optional[str]:
    """Why PEFT's sum over the active LoRA adapters ``names`` of a PEFT ``lora`` layer is not one fused LoRA
    term (:func:`combined_lora_factors`) at this call, or None: a LoRA variant (DoRA) among them, adapters of
    different dtypes (PEFT casts ``x`` to each), or dropout active on any (PEFT draws one mask per adapter)."""
    if any(name in layer.lora_variant for name in names):
        return "several active adapters, one with a LoRA variant (DoRA)"
    if len(_dtypes(layer, names)) != 1:
        return "several active adapters of different dtypes"
    if any(dropout_active(layer.lora_dropout[name]) for name in names):
        return "several active adapters with dropout in training (PEFT draws one mask per adapter)"
    return None


def combined_lora_factors(layer, names: Sequence[str]) -> tuple:
    """``(lora_a, lora_b, lora_bias)`` for one fused LoRA term equal to PEFT's sum over the active LoRA
    adapters ``names`` of a PEFT ``lora`` layer (where :func:`several_adapters_reason` is None), every scaling
    folded in (the term is ``(x lora_aᵀ) lora_bᵀ + lora_bias``, scaling 1): ``lora_a`` ``(Σr, in)``,
    ``lora_b`` ``(out, Σr)``, ``lora_bias`` ``(out,)`` or None."""
    lora_a = torch.cat([layer.lora_A[name].weight for name in names])
    lora_b = torch.cat([layer.lora_B[name].weight * layer.scaling[name] for name in names], dim=1)
    biases = [_lora_bias(layer, name) * layer.scaling[name] for name in names if _lora_bias(layer, name) is not None]
    lora_bias = None if not biases else torch.stack(biases).sum(0) if len(biases) > 1 else biases[0]
    return lora_a, lora_b, lora_bias


def is_conv1d(module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2 style: ``y = x W + b``, ``weight`` ``(in, out)``)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")


def base_weight(layer):
    """The base weight of a PEFT layer as fastpeft's ops take it, ``(out, in)``, no copy: the dense weight, a
    ``Conv1D``'s ``(in, out)`` weight as its transposed view (the ops read any strides), or an
    :class:`~fastpeft.nf4.NF4Weight` view of a bitsandbytes 4-bit one (with the same repacking check as
    fastpeft's own layer)."""
    # LoraLinear's reads layer.base_layer from _modules, without PEFT's get_base_layer walk (never a PEFT layer itself
    # on a fused path: stacked adapters run PEFT's forward)
    weight = LoraLinear.base_weight(layer)
    base = layer._modules["base_layer"]
    return weight if type(base) is nn.Linear or not is_conv1d(base) else weight.t()


def adalora_factors(layer, name: str) -> tuple:
    """``(lora_a, lora_b)`` of AdaLoRA adapter ``name`` of a PEFT ``SVDLinear`` / ``SVDLinear4bit``, for the
    LoRA term ``(drop(x) lora_aᵀ) lora_bᵀ`` at scaling 1: PEFT's ``drop(x) (A ∘ E)ᵀ Bᵀ · s / (ranknum + 1e-5)``
    with ``lora_a = A ∘ E`` ``(r, in)`` and ``lora_b = B · s / (ranknum + 1e-5)`` ``(out, r)``. Built
    differentiably from PEFT's parameters at each call, so ``A``, ``E`` and ``B`` get PEFT's gradients and the
    rank masking of ``update_and_allocate`` (zeros written into ``E``) applies at once; ``ranknum`` stays a
    tensor (no device sync)."""
    lora_b = layer.lora_B[name]
    rank_scale = layer.scaling[name] / (layer.ranknum[name] + 1e-5)
    return layer.lora_A[name] * layer.lora_E[name], lora_b * rank_scale.to(lora_b.dtype)


# ---------------------------------------------------------------------------------------------- mixed batches
# A packed bank is a copy of the adapters' parameters, and an edit through ``.data`` (``lora_B.weight.data.copy_``)
# changes them without any trace on the tensor (no version bump, same storage): a bank is therefore used for one
# call of the PEFT model only, the call PEFT marks by the pre-forward hook it registers on every LoRA layer for its
# duration (``adapter_names=`` in a forward, or a whole ``generate``). Its first layer call packs the bank, the
# others (and generate's decode steps) reuse it; a layer called directly, outside such a model call, packs at every
# call. The per-token metadata depends only on the names, the layer's adapter order and the activation shape (a few
# recent ones are kept across calls); the reference path's gathered adapter factors kept in it are per bank, so each
# model call gets the metadata with a fresh dict for them.
_META_CACHE: "OrderedDict[tuple, list]" = OrderedDict()  # key -> [metadata, model call, its copy for that call]
_META_CACHE_SIZE = 16
_PEFT_HOOK: list = []  # PEFT's adapter_names pre-forward hook function, looked up at the first mixed batch


def model_call(layer) -> Optional[object]:
    """The pre-forward hook PEFT registered on ``layer`` for the model call in progress (a new object at each call
    of the model), or None when the layer is called outside one."""
    if not _PEFT_HOOK:
        try:
            from peft.tuners.lora.model import _adapter_names_pre_forward_hook as hook
        except ImportError:
            hook = None
        _PEFT_HOOK.append(hook)
    peft_hook = _PEFT_HOOK[0]
    if peft_hook is not None:
        for hook in layer._forward_pre_hooks.values():
            if getattr(hook, "func", None) is peft_hook:
                return hook
    return None


def _for_call(meta: MultiLoraMeta) -> MultiLoraMeta:
    """``meta`` with an empty cache of gathered adapter factors (the rest shared)."""
    plan = meta.reference_plan
    return meta if plan is None else dataclasses.replace(meta, reference_plan=dataclasses.replace(plan, gathered={}))


def rows_meta(call, row_ids: tuple, lead_shape: tuple, device: torch.device) -> MultiLoraMeta:
    """The metadata of ``row_ids`` for an activation of ``lead_shape``, shared by the layers of the model call
    ``call`` (None: this layer call alone)."""
    key = (row_ids, lead_shape, str(device))
    entry = _META_CACHE.get(key)
    if entry is None:
        tokens_per_row = 1
        for size in lead_shape[1:]:
            tokens_per_row *= size
        ids = torch.tensor(row_ids, dtype=torch.int32).repeat_interleave(tokens_per_row).to(device)
        entry = _META_CACHE[key] = [MultiLoraMeta.build(ids, decode=tokens_per_row == 1), None, None]
        if len(_META_CACHE) > _META_CACHE_SIZE:
            _META_CACHE.popitem(last=False)
    else:
        _META_CACHE.move_to_end(key)
    if call is None:
        return _for_call(entry[0])
    if entry[1] is not call:
        entry[1:] = call, _for_call(entry[0])
    return entry[2]


_BANK_KEY = "_fastpeft_bank"  # the layer's ``__dict__`` entry: (model call, parameters' key, (bank, bias table))


def _bank(layer, call, names: tuple) -> tuple:
    """``(LoraBank, bias table or None)`` of ``names`` (slot ``k`` = ``names[k]``), packed from the layer's
    parameters in their dtype (:func:`mixed_batch_reason` has made sure it is one) by
    :meth:`~fastpeft.bank.LoraBank.pack`, at any rank; cached on the layer for the rest of the model call ``call``
    (None: not cached), as long as those parameters and scalings stay the same objects, values (in-place updates
    bump their versions) and dtypes. The bias table's row ``k`` is ``s_k · b_k`` (zeros for an adapter without
    ``lora_bias``), its last row zeros for tokens of no adapter. (:func:`mixed_batch_reason` has made sure autograd
    records nothing here.)"""
    lora_a_dict, lora_b_dict = layer._modules["lora_A"]._modules, layer._modules["lora_B"]._modules
    lora_as = [lora_a_dict[name]._parameters["weight"] for name in names]
    lora_bs = [lora_b_dict[name]._parameters["weight"] for name in names]
    biases = [_lora_bias(layer, name) for name in names]
    scalings = [layer.scaling[name] for name in names]
    key = None
    if call is not None:
        key = (names, tuple(scalings), tuple((p.data_ptr(), p._version, p.dtype, p.device)
                                             for p in (*lora_as, *lora_bs, *biases) if p is not None))
        cached = layer.__dict__.get(_BANK_KEY)
        if cached is not None and cached[0] is call and cached[1] == key:
            return cached[2]
    (out_features, _), (_, in_features) = lora_bs[0].shape, lora_as[0].shape
    adapters = [ModuleAdapter(lora_a=a, lora_b=b, scaling=s) for a, b, s in zip(lora_as, lora_bs, scalings)]
    bank = LoraBank.pack(adapters, in_features, out_features, lora_as[0].dtype, lora_as[0].device,
                         labels=[f"adapter {name!r}" for name in names], rank_limit=None)
    bias_table = None
    if any(b is not None for b in biases):
        zeros = bank.lora_b.new_zeros(out_features)
        bias_table = torch.stack([zeros if b is None else b * s for b, s in zip(biases, scalings)] + [zeros])
    if call is None:
        layer.__dict__.pop(_BANK_KEY, None)
    else:
        layer.__dict__[_BANK_KEY] = (call, key, (bank, bias_table))
    return bank, bias_table


def forget_bank(layer) -> None:
    """Drop the mixed-batch bank cached on ``layer`` (a layer put back on PEFT's class keeps none)."""
    layer.__dict__.pop(_BANK_KEY, None)


def mixed_batch_adapters(layer, adapter_names) -> list:
    """The adapters of a PEFT ``lora`` layer that ``adapter_names`` names (sorted)."""
    return sorted({name for name in adapter_names if name in layer.lora_A})


def mixed_batch_reason(layer, x: torch.Tensor, adapter_names) -> Optional[str]:
    """Why :func:`mixed_batch_lora` is not what PEFT's forward computes for ``adapter_names`` at this call (or
    PEFT raises), or None: ``adapter_names`` not one entry per row, autocast, autograd recording (the
    multi-LoRA op is inference only), dropout active, a LoRA variant among the named adapters (PEFT refuses
    DoRA), adapters of different dtypes."""
    if isinstance(adapter_names, str) or x.dim() < 2 or len(adapter_names) != len(x):
        return "adapter_names is not one entry per row"
    if torch.is_autocast_enabled(x.device.type):
        return "adapter_names under autocast"
    named = mixed_batch_adapters(layer, adapter_names)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.base_layer.parameters())
                                    or any(p.requires_grad for name in named for module in
                                           (layer.lora_A[name], layer.lora_B[name]) for p in module.parameters())):
        return "adapter_names with autograd recording (the multi-LoRA op is inference only)"
    if any(name in layer.lora_variant for name in named):
        return "adapter_names naming an adapter with a LoRA variant"
    if any(dropout_active(layer.lora_dropout[name]) for name in named):
        return "adapter_names with dropout active"
    if len(_dtypes(layer, named)) > 1:
        return "adapter_names naming adapters of different dtypes"
    return None


def mixed_batch_lora(layer, x: torch.Tensor, base_output: torch.Tensor, adapter_names) -> torch.Tensor:
    """PEFT's ``_mixed_batch_forward`` of a PEFT ``lora`` layer (where :func:`mixed_batch_reason` is None):
    ``base_output`` (the base layer's output for ``x`` ``(B, ..., in)``, ``(B, ..., out)``, a fresh tensor
    this function may change in place) plus, on each row ``b``, the LoRA term of adapter ``adapter_names[b]``
    (none for ``"__base__"`` or an adapter this layer does not have), computed in the adapters' dtype and
    added in the output's, as PEFT does."""
    named = mixed_batch_adapters(layer, adapter_names)
    if not named:
        return base_output
    names = tuple(named)
    call = model_call(layer)
    bank, bias_table = _bank(layer, call, names)
    slot = {name: k for k, name in enumerate(names)}
    row_ids = tuple(slot.get(name, -1) for name in adapter_names)
    meta = rows_meta(call, row_ids, tuple(x.shape[:-1]), x.device)
    out_features = base_output.shape[-1]
    y = base_output.reshape(-1, out_features)
    x_tokens = x.reshape(-1, x.shape[-1])
    if bias_table is not None:
        # PEFT adds (h Bᵀ + b) · s in the adapters' dtype: put s · b into the delta before the cast
        ids = meta.slot_ids[:, 0].long()
        delta = bias_table[torch.where(ids < 0, len(names), ids)]
        delta = add_lora_terms(delta, x_tokens.to(delta.dtype), bank, meta)
        y = y.add_(delta.to(y.dtype)) if y.dtype == delta.dtype else y + delta.to(y.dtype)
    else:
        y = add_lora_terms(y, x_tokens, bank, meta)
    return y.reshape(base_output.shape)
