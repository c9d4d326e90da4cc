"""DiffPruning on a whole model without peft: inject, penalise, project, save, load, merge.

The workflow of the paper (Guo, Rush, Kim, ACL 2021), each step one call::

    fastpeft.inject(model, method="diffprune", sparsity=0.005)   # or fastpeft.diffprune.inject(model, ...)
    loss = task_loss + fastpeft.diffprune.l0_penalty(model)      # train w and the gates (AdamW)
    fastpeft.diffprune.project(model)                            # keep the top 0.5 % of |δ|, mask fixed
    ...                                                          # a short fine-tune of the kept values
    fastpeft.diffprune.save(model, "diff/")                      # later: fastpeft.diffprune.load(base, "diff/")

``sparsity`` is the paper's target sparsity rate: the fraction of the diff's entries that stay nonzero, in
``(0, 1]`` (0.005 keeps 0.5 %); :func:`fastpeft.reference.projection_count` defines the exact count.

The file format (a directory): ``diffprune.safetensors`` holds, for each projected layer at module path
``<name>``, the CSR tensors of its :class:`~fastpeft.sparse_delta.SparseDelta` under the prefix ``<name>.``
(``SparseDelta.state_dict``; the values fp32); ``diffprune_config.json`` holds ``{"format": "fastpeft-diffprune",
"version": 1, "layers": {<name>: [out, in], ...}, "sparsity": ..., "projection": "global" | "layer",
"base_model_name_or_path": ...}``. :func:`load` checks everything before it changes the model: the format and
version, that the tensors are exactly the listed layers', each layer a linear layer of the model of that shape,
and each sparse diff valid (``SparseDelta.from_state_dict``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import reference
from .nn.diffprune import DiffPruneLinear, check_gate_constants
from .nn.ia3 import IA3Linear
from .nn.lora import LoraLinear
from .integration.summary import PatchSummary
from .integration.targets import base_model_name, linear_kind, select_targets, set_submodule
from .sparse_delta import SparseDelta

__all__ = ["inject", "l0_penalty", "project", "save", "load", "merge", "diffprune_layers", "CONFIG_NAME",
           "WEIGHTS_NAME"]

CONFIG_NAME = "diffprune_config.json"
WEIGHTS_NAME = "diffprune.safetensors"
_FORMAT, _VERSION = "fastpeft-diffprune", 1
_PROJECTIONS = ("global", "layer")


def diffprune_layers(model: nn.Module) -> dict:
    """``{module path: DiffPruneLinear}`` of the model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DiffPruneLinear)}


def _require_layers(model: nn.Module) -> dict:
    layers = diffprune_layers(model)
    if not layers:
        raise ValueError("this model has no DiffPruning layers: prepare it with fastpeft.diffprune.inject (or "
                         "fastpeft.inject(model, method='diffprune')) or fastpeft.diffprune.load")
    return layers


def _freeze_all_but_diffs(model: nn.Module) -> None:
    """Only the diff trains: ``w`` and the gates' log-odds, or after projection the kept values."""
    model.requires_grad_(False)
    for layer in diffprune_layers(model).values():
        for param in layer.parameters(recurse=False):
            param.requires_grad_(True)


def inject(
    model: nn.Module,
    target_modules: Union[Sequence[str], str] = "all-linear",
    sparsity: float = 0.005,
    structured: Union[bool, int] = False,
    l0_lambda: float = 1.25e-7,
    beta: float = 1.0,
    gamma: float = -1.5,
    zeta: float = 1.5,
    log_alpha_init: float = 5.0,
    projection: str = "global",
) -> PatchSummary:
    """Put a :class:`~fastpeft.nn.DiffPruneLinear` over every targeted ``nn.Linear`` / bitsandbytes ``Linear4bit``
    (``target_modules`` as in :func:`fastpeft.inject`: names, a regex for the full path, or ``"all-linear"``, which
    leaves out the output head) and freeze everything else, in place.

    ``sparsity`` and ``projection`` are what :func:`project` uses when called without them; ``l0_lambda`` the weight
    :func:`l0_penalty` applies; ``structured``, ``beta``, ``gamma``, ``zeta``, ``log_alpha_init`` go to every layer
    (their meaning there). The defaults are the paper's: 0.5 % of the entries kept, projected globally,
    ``l0_lambda = 1.25e-7``, ``beta = 1``, ``gamma = -1.5``, ``zeta = 1.5``, ``log_alpha_init = 5``, unstructured.
    Returns the :class:`~fastpeft.PatchSummary` (kind ``diffprune`` or ``diffprune+nf4``)."""
    if any(isinstance(m, (LoraLinear, IA3Linear, DiffPruneLinear)) for m in model.modules()):
        raise ValueError("this model already has fastpeft layers (inject or load ran on it)")
    if "peft" in sys.modules:  # a model with PEFT layers has imported peft already
        from peft.tuners.tuners_utils import BaseTunerLayer

        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ValueError("this is a PEFT model: DiffPruning adds its diffs to a plain model")
    reference.projection_count(1, sparsity)  # raises on a sparsity outside (0, 1]
    _check_projection(projection)
    if isinstance(l0_lambda, bool) or not isinstance(l0_lambda, (int, float)) or not (
            math.isfinite(l0_lambda) and l0_lambda >= 0):
        raise ValueError(f"l0_lambda must be a finite number >= 0, got {l0_lambda!r}")
    check_gate_constants(beta, gamma, zeta, log_alpha_init)
    chosen, skipped = select_targets(model, target_modules)
    # every layer built (a structured group size that does not fit raises here) before the model changes
    layers = {name: DiffPruneLinear(model.get_submodule(name), structured, beta=beta, gamma=gamma, zeta=zeta,
                                    log_alpha_init=log_alpha_init) for name in chosen}
    summary = PatchSummary(skipped=skipped)
    for name, layer in layers.items():
        set_submodule(model, name, layer)
        summary.replaced[name] = "diffprune" + ("+nf4" if layer.is_nf4 else "")
    _freeze_all_but_diffs(model)
    model._fastpeft_diffprune_config = {"sparsity": sparsity, "projection": projection, "l0_lambda": l0_lambda}
    return summary


def _check_projection(projection) -> None:
    if projection not in _PROJECTIONS:
        raise ValueError(f"projection must be 'global' (the paper's: one top-k over every layer's diff) or 'layer' "
                         f"(each layer's own top-k), got {projection!r}")


def _config(model: nn.Module) -> dict:
    return getattr(model, "_fastpeft_diffprune_config", None) or {}


def l0_penalty(model: nn.Module, l0_lambda: Optional[float] = None) -> torch.Tensor:
    """``l0_lambda · Σ_layers E[‖δ‖₀]``, a 0-d fp32 tensor to add to the task loss: the expected number of
    nonzero diff entries of every layer still training (:meth:`DiffPruneLinear.l0_penalty`; projected layers count
    0), weighted by ``l0_lambda`` (default: the one given to :func:`inject`, else the paper's 1.25e-7). The sum is on
    the first layer's device."""
    layers = list(_require_layers(model).values())
    weight = _config(model).get("l0_lambda", 1.25e-7) if l0_lambda is None else l0_lambda
    device = layers[0].base_weight().device
    return weight * sum((layer.l0_penalty().to(device) for layer in layers), torch.zeros((), device=device))


@torch.no_grad()
def project(model: nn.Module, sparsity: Optional[float] = None, projection: Optional[str] = None) -> dict:
    """Magnitude projection: keep the entries of largest ``|δ|`` (``δ`` = deterministic gate ⊙ ``w``,
    :meth:`DiffPruneLinear.delta_weight`) so that exactly ``projection_count(N, sparsity)`` stay, ``N`` the diff
    entries counted over all layers (``projection="global"``, the paper's) or per layer (``"layer"``); ties go to
    the earlier layer (module order) and the lower index. Every layer then holds a fixed-mask sparse diff whose
    values alone train (build the fine-tune's optimizer afterwards: ``w`` and the gates are gone). Defaults: what
    :func:`inject` was given. Returns ``{module path: entries kept}``."""
    layers = _require_layers(model)
    config = _config(model)
    sparsity = config.get("sparsity", 0.005) if sparsity is None else sparsity
    projection = config.get("projection", "global") if projection is None else projection
    reference.projection_count(1, sparsity)
    _check_projection(projection)
    projected = [name for name, layer in layers.items() if layer.projected]
    if projected:
        raise ValueError(f"{len(projected)} layers ({projected[0]}, ...) are projected already; project runs once "
                         "on a trained model")
    if projection == "layer":
        masks = {name: reference.magnitude_projection(layer.delta_weight(), sparsity) for name, layer in layers.items()}
    else:
        diffs = {name: layer.delta_weight() for name, layer in layers.items()}
        device = next(iter(diffs.values())).device
        flat = torch.cat([diff.reshape(-1).to(device) for diff in diffs.values()])
        kept = reference.magnitude_projection(flat, sparsity)
        masks, start = {}, 0
        for name, diff in diffs.items():
            masks[name] = kept[start:start + diff.numel()].view(diff.shape)
            start += diff.numel()
    for name, layer in layers.items():
        layer.project(masks[name])
    _freeze_all_but_diffs(model)
    model._fastpeft_diffprune_config = {**config, "sparsity": sparsity, "projection": projection}
    return {name: int(masks[name].sum()) for name in layers}


def save(model: nn.Module, path: Union[str, Path]) -> None:
    """Write the projected diff of a model as a DiffPruning directory (the module docstring's format)."""
    from safetensors.torch import save_file

    layers = _require_layers(model)
    unprojected = [name for name, layer in layers.items() if not layer.projected]
    if unprojected:
        raise ValueError(f"{len(unprojected)} layers ({unprojected[0]}, ...) are not projected: the saved diff is the "
                         "sparse one, run fastpeft.diffprune.project(model) first")
    tensors, shapes = {}, {}
    for name, layer in layers.items():
        tensors.update({k: v.detach().contiguous().cpu()
                        for k, v in layer.sparse_delta.state_dict(prefix=name + ".").items()})
        shapes[name] = [layer.out_features, layer.in_features]
    config = _config(model)
    meta = {"format": _FORMAT, "version": _VERSION, "layers": shapes, "sparsity": config.get("sparsity"),
            "projection": config.get("projection"), "base_model_name_or_path": base_model_name(model)}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})


def _read(path: Path) -> tuple:
    """``(config, tensors)`` of a DiffPruning directory, the config's own fields checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"no {file.name} in {path}")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        raise ValueError(f"{config_file} is not a fastpeft DiffPruning config (no \"format\": \"{_FORMAT}\")")
    if config.get("version") != _VERSION:
        raise ValueError(f"{config_file} has format version {config.get('version')!r}; this fastpeft reads {_VERSION}")
    layers = config.get("layers")
    if not isinstance(layers, dict) or not layers or not all(
            isinstance(shape, list) and len(shape) == 2 and all(type(n) is int and n > 0 for n in shape)
            for shape in layers.values()):
        raise ValueError(f"{config_file}: \"layers\" must map each module path to its [out, in] shape")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{weights_file} is not a readable safetensors file (truncated or corrupted?): "
                         f"{type(exc).__name__}: {exc}") from None
    return config, tensors


def load(model: nn.Module, path: Union[str, Path], trainable: bool = True) -> PatchSummary:
    """Load a DiffPruning directory written by :func:`save` into a model: each listed layer (a plain linear layer,
    or a :class:`~fastpeft.nn.DiffPruneLinear` whose base is used) becomes a projected ``DiffPruneLinear`` holding the
    saved diff, and any other ``DiffPruneLinear`` of the model goes back to its base layer, so the model holds this
    diff alone. Everything is checked (module docstring) before the model changes; every error names the file or
    the module. With ``trainable`` only the diff's values train, without it nothing does."""
    path = Path(path)
    config, tensors = _read(path)
    modules = dict(model.named_modules())
    deltas, expected_keys = {}, set()
    for name, shape in config["layers"].items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"{path}: the diff names the module {name!r}, which this model does not have")
        base = module.base_layer if isinstance(module, DiffPruneLinear) else module
        if linear_kind(base) is None:
            raise TypeError(f"{path}: the diff adapts {name!r}, a {type(module).__name__}; DiffPruning adapts float "
                            "torch.nn.Linear and bitsandbytes Linear4bit layers")
        if [base.out_features, base.in_features] != shape:
            raise ValueError(f"{path}: the diff of {name!r} is {tuple(shape)}; the layer is "
                             f"({base.out_features}, {base.in_features})")
        prefix = name + "."
        try:
            delta = SparseDelta.from_state_dict(tensors, prefix, tuple(shape))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: the sparse diff of {name!r} is invalid: {exc}") from None
        deltas[name] = base, delta
        expected_keys.update(delta.state_dict(prefix))  # the layout's own keys: any other tensor is refused
    extra = sorted(set(tensors) - expected_keys)
    if extra:
        raise ValueError(f"{path}: {len(extra)} tensors ({extra[0]}, ...) belong to no layer the config lists")
    summary = PatchSummary()
    for name, layer in diffprune_layers(model).items():
        if name not in deltas:
            set_submodule(model, name, layer.base_layer)
            summary.removed[name] = "diffprune" + ("+nf4" if layer.is_nf4 else "")
    for name, (base, delta) in deltas.items():
        layer = DiffPruneLinear.from_sparse_delta(base, delta)
        set_submodule(model, name, layer)
        summary.replaced[name] = "diffprune" + ("+nf4" if layer.is_nf4 else "")
    if trainable:
        _freeze_all_but_diffs(model)
    else:
        model.requires_grad_(False)
    model._fastpeft_diffprune_config = {"sparsity": config.get("sparsity"), "projection": config.get("projection")}
    return summary


@torch.no_grad()
def merge(model: nn.Module) -> int:
    """Fold every layer's diff into its dense base weight and put the base layer back in the model: a plain model
    with the fine-tuned weights. ``W + δ`` at the diff's entries, each formed in float64 and rounded once
    (:meth:`SparseDelta.merge_into`); before projection ``δ`` is :meth:`DiffPruneLinear.delta_weight`. Returns how
    many layers. An NF4 base raises before anything changes (``W + δ`` would have to be re-quantised, which loses
    most of a sparse diff's small entries: keep the projected layer for it)."""
    layers = _require_layers(model)
    nf4 = [name for name, layer in layers.items() if layer.is_nf4]
    if nf4:
        raise ValueError(f"{len(nf4)} layers ({nf4[0]}, ...) have an NF4 base: merge folds diffs into dense weights "
                         "only (re-quantising W + δ would lose the diff)")
    for name, layer in layers.items():
        delta = layer.sparse_delta if layer.projected else SparseDelta.from_dense(layer.delta_weight())
        delta.merge_into(layer.base_layer.weight)
        set_submodule(model, name, layer.base_layer)
    model.__dict__.pop("_fastpeft_diffprune_config", None)
    return len(layers)
