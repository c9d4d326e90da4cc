"""Read and write PEFT-format adapters without peft: ``adapter_config.json`` + ``adapter_model.safetensors``.

The tensors keep PEFT's own key names (``base_model.model.<module>.lora_A.weight``, ``.lora_B.weight``,
``.lora_magnitude_vector`` for DoRA, ``.ia3_l`` for IA3) and the config keeps every field PEFT wrote,
so ``save_adapter(load_adapter(p))`` is byte-for-byte what PEFT loads back. Only safetensors is read:
a pickled ``adapter_model.bin`` can run arbitrary code when loaded, so it is refused.

``Adapter.modules()`` turns the flat state dict into one :class:`ModuleAdapter` per adapted linear layer
(keyed by the module's path in the base model, e.g. ``model.layers.0.self_attn.q_proj``) with the
scaling PEFT would use (``lora_alpha / r``, ``/ sqrt(r)`` with rsLoRA, ``rank_pattern`` /
``alpha_pattern`` honoured). Given the model's module names, it refuses a module the model lacks before any
pattern of the config runs, so a pattern only ever meets the model's own names; each match is bounded in time
(the ``regex`` engine's timeout; Python's ``re`` cannot be interrupted), so a pattern that backtracks without end
is an error, not a hang.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Optional, Union

import torch

__all__ = ["Adapter", "ModuleAdapter", "load_adapter", "save_adapter", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
# PEFT's per-module parameter suffixes (peft/utils/save_and_load.py strips the adapter name from them).
_SUFFIXES = {
    ".lora_A.weight": "lora_a",
    ".lora_B.weight": "lora_b",
    ".lora_magnitude_vector": "magnitude",
    ".ia3_l": "ia3_scale",
}


@dataclass
class ModuleAdapter:
    """One adapted linear layer: LoRA ``lora_a`` ``(r, in)`` / ``lora_b`` ``(out, r)`` / ``scaling``,
    DoRA's ``magnitude`` ``(out,)`` on top, or IA3's ``ia3_scale`` (``(in,)`` when ``is_feedforward``,
    else ``(out,)``)."""

    lora_a: Optional[torch.Tensor] = None
    lora_b: Optional[torch.Tensor] = None
    scaling: float = 1.0
    magnitude: Optional[torch.Tensor] = None
    ia3_scale: Optional[torch.Tensor] = None
    is_feedforward: bool = False

    @property
    def rank(self) -> int:
        return 0 if self.lora_a is None else self.lora_a.shape[0]


# The longest one pattern may take to match one module name: patterns of real configs take microseconds.
PATTERN_TIMEOUT_S = 1.0


def _regex_matches(pattern: str, name: str, full: bool, shown: str) -> bool:
    """Whether ``pattern`` matches ``name`` (``full``: all of it, else from its start), as Python's ``re`` would;
    a ``ValueError`` naming ``shown`` (the pattern as the config gives it) for an invalid pattern or one that takes
    longer than :data:`PATTERN_TIMEOUT_S`."""
    import regex  # imported where a config pattern is matched, not with fastpeft

    try:
        return (regex.fullmatch if full else regex.match)(pattern, name, timeout=PATTERN_TIMEOUT_S) is not None
    except TimeoutError:
        raise ValueError(f"the pattern {shown!r} takes over {PATTERN_TIMEOUT_S} s to match the module name {name!r}: "
                         "refused (a pattern that backtracks without end)") from None
    except regex.error as exc:
        raise ValueError(f"{shown!r} is not a valid regular expression: {exc}") from None


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the end of the
    module path (as a regex, on a dot boundary) wins."""
    for key, value in (patterns or {}).items():
        if _regex_matches(rf"(.*\.)?({key})$", module, False, key):
            return value
    return default


def matches_any(module: str, targets) -> bool:
    if targets is None:
        return False
    if isinstance(targets, str):
        return _regex_matches(targets, module, True, targets)
    return any(module == t or module.endswith("." + t) for t in targets)


@dataclass
class Adapter:
    """A PEFT adapter in memory: its config dict as PEFT wrote it and its tensors under PEFT's key names."""

    config: dict
    tensors: dict = field(default_factory=dict)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "LORA")).upper()

    def _grouped(self) -> dict[str, dict]:
        """``{module path: {field name: tensor}}`` from the flat state dict (no config pattern involved)."""
        if self.peft_type not in ("LORA", "IA3"):
            raise ValueError(f"adapter type {self.peft_type!r} is not supported (LORA, IA3)")
        if not self.tensors:
            raise ValueError("the adapter holds no tensors (an empty adapter file?): it adapts no layer")
        grouped: dict[str, dict] = {}
        for key, tensor in self.tensors.items():
            for suffix, field_name in _SUFFIXES.items():
                if key.endswith(suffix):
                    module = key[: -len(suffix)]
                    module = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
                    grouped.setdefault(module, {})[field_name] = tensor
                    break
            else:
                raise ValueError(f"unsupported tensor {key!r} in the adapter (modules_to_save or bias "
                                 "training are not supported)")
        return grouped

    def module_names(self) -> list[str]:
        """The paths of the modules the adapter adapts, in the file's order."""
        return list(self._grouped())

    def modules(self, module_names: Optional[Collection[str]] = None) -> dict[str, ModuleAdapter]:
        """``{module path in the base model: ModuleAdapter}`` for every adapted layer. ``module_names``: the model's
        module paths; a module of the file outside them is a ``ValueError`` raised before the config's patterns
        run. An adapter without tensors is a ``ValueError`` too (it would adapt nothing)."""
        grouped = self._grouped()
        if module_names is not None:
            for module in grouped:
                if module not in module_names:
                    raise ValueError(f"the adapter adapts {module!r}, which this model does not have")
        out = {}
        for module, fields in grouped.items():
            if self.peft_type == "IA3":
                ff = matches_any(module, self.config.get("feedforward_modules"))
                out[module] = ModuleAdapter(ia3_scale=fields["ia3_scale"].reshape(-1), is_feedforward=ff)
                continue
            if "lora_a" not in fields or "lora_b" not in fields:
                raise ValueError(f"module {module!r} lacks lora_A or lora_B")
            rank = fields["lora_a"].shape[0]
            alpha = _pattern_value(self.config.get("alpha_pattern"), module, self.config.get("lora_alpha", 8))
            denom = math.sqrt(rank) if self.config.get("use_rslora", False) else rank
            out[module] = ModuleAdapter(
                lora_a=fields["lora_a"], lora_b=fields["lora_b"], scaling=alpha / denom,
                magnitude=fields.get("magnitude"),
            )
        return out


def load_adapter(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Adapter:
    """Read a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
    if not weights_file.is_file():
        if (path / _PICKLE_NAME).is_file():
            raise ValueError(f"{path / _PICKLE_NAME} is a pickle file, which fastpeft refuses to load (unpickling "
                             f"can run arbitrary code); re-save the adapter with safe_serialization=True")
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} holds a {type(config).__name__}, not a JSON object")
    try:
        tensors = load_file(str(weights_file), device=str(device))
    except SafetensorError as exc:
        raise ValueError(f"{weights_file} is not a readable safetensors file (truncated or corrupted?): "
                         f"{type(exc).__name__}: {exc}") from None
    return Adapter(config=config, tensors=tensors)


def save_adapter(adapter: Adapter, path: Union[str, Path]) -> None:
    """Write ``adapter`` as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(adapter.config, indent=2, sort_keys=True))
    tensors = {k: v.detach().contiguous() for k, v in adapter.tensors.items()}
    # PEFT writes this metadata; transformers' safetensors loader insists on it.
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
