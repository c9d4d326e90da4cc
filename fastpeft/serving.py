"""Multi-adapter batched inference over a Hugging Face model: ``MultiLoraModel``.

Each adapted ``nn.Linear`` (dense or bitsandbytes NF4) is replaced by a :class:`~fastpeft.nn.MultiLoraLinear`;
the model's adapters live in one immutable :class:`~fastpeft.bank.AdapterBank`. ``forward`` and
``generate`` take ``adapter_names``, one entry per batch row: ``None`` (base model), a name, or
``{name: weight, ...}`` (a weighted sum of LoRA terms, no merge). The base matmuls run once for the
whole batch. Adding or removing an adapter swaps in a new bank; a :class:`MultiLoraBatch` already built
keeps the bank it was built against.

``generate`` with ``num_beams`` or ``num_return_sequences`` above 1 works as in Hugging Face: each row's
adapters follow it as ``generate`` repeats the row (``max(num_beams, num_return_sequences)`` copies, each
row's next to each other, as ``_expand_inputs_for_generation`` does).

Every bad request (an unknown adapter name, ``adapter_names`` of the wrong length, an adapter file that
cannot be read or does not fit the model) raises before the model runs and leaves the served adapters as
they were.

Inference only (everything runs under ``torch.no_grad``). Not supported: ``modules_to_save``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .adapters import Adapter, load_adapter
from .bank import AdapterBank, LayerSpec
from .nn.multi_lora import MultiLoraBatch, MultiLoraLinear, serving_batch

__all__ = ["MultiLoraModel"]

AdapterSource = Union[str, Path, Adapter]
RowAdapters = Union[None, str, Mapping[str, float]]


def _base_weight(module: nn.Linear):
    """The layer's weight as ``fastpeft.reference`` takes it (dense tensor or NF4Weight; only DoRA needs it).

    None for a Linear4bit that bitsandbytes has already repacked for its CPU kernel (it does so in place
    on the first eval-mode no-grad CPU forward, with bf16 absmax): that is no longer NF4, so DoRA adapters
    cannot be packed for it. A view taken before the repack stays valid (bitsandbytes swaps in new
    tensors rather than overwriting the old ones)."""
    if type(module.weight).__name__ == "Params4bit":
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            return None
        from .nf4 import NF4Weight

        return NF4Weight.from_bnb(module.weight)
    return module.weight.detach()


class MultiLoraModel(nn.Module):
    """``MultiLoraModel(hf_model, {"name": path_or_Adapter, ...})``.

    ``target_modules``: extra layer-name suffixes (e.g. ``["q_proj", "v_proj"]``) to make adaptable even if
    no adapter given now touches them, so adapters added later may; by default the layers the initial
    adapters target.
    """

    def __init__(self, model: nn.Module, adapters: Optional[Mapping[str, AdapterSource]] = None,
                 target_modules: Optional[Sequence[str]] = None):
        super().__init__()
        self.model = model
        loaded = {name: self._load(name, source) for name, source in (adapters or {}).items()}
        module_names = {path for path, _ in model.named_modules()}
        targets = set()
        for name, adapter in loaded.items():
            try:
                targets |= set(adapter.modules(module_names))
            except ValueError as exc:
                raise ValueError(f"adapter {name!r}: {exc}") from None
        suffixes = tuple(target_modules or ())
        specs = {}
        self.multi_lora_layers: dict[str, MultiLoraLinear] = {}
        for path, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            if path not in targets and not any(path == s or path.endswith("." + s) for s in suffixes):
                continue
            weight = module.weight
            dtype = weight.dtype if weight.is_floating_point() else (getattr(module, "compute_dtype", None)
                                                                      or torch.float32)
            specs[path] = LayerSpec(module.in_features, module.out_features, dtype, weight.device,
                                    _base_weight(module))
            layer = MultiLoraLinear(module, path)
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path), child, layer)
            self.multi_lora_layers[path] = layer
        missing = targets - set(specs)
        if missing:
            raise ValueError(f"adapters target modules that are not nn.Linear layers of the model: {sorted(missing)[:5]}")
        self.bank = AdapterBank(specs).with_adapters(loaded)
        self._last_batch: Optional[tuple] = None  # (bank, rows key, MultiLoraBatch) of the last batch() call

    @staticmethod
    def _load(name: str, source: AdapterSource) -> Adapter:
        if isinstance(source, Adapter):
            return source
        try:
            return load_adapter(source)
        except (OSError, ValueError) as exc:
            raise type(exc)(f"adapter {name!r}: {exc}") from None

    @property
    def adapter_names(self) -> tuple:
        return self.bank.names

    def add_adapter(self, name: str, source: AdapterSource) -> None:
        """Add (or replace) an adapter. Batches built before keep using the bank they were built on."""
        self.bank = self.bank.with_adapter(name, self._load(name, source))

    def remove_adapter(self, name: str) -> None:
        """Remove an adapter. Batches built before keep using the bank they were built on."""
        self.bank = self.bank.without_adapter(name)

    def batch(self, adapter_names: Sequence[RowAdapters]) -> MultiLoraBatch:
        """The per-row adapter choice for the current bank: ``adapter_names[b]`` is ``None``, a name, or
        ``{name: weight}`` (LoRA adapters only: DoRA and IA3 rescale the base output, which does not sum).

        The same ``adapter_names`` against the same bank as the previous call give the previous batch back: its
        per-step metadata and the CPU path's gathered adapter factors are built once, not at every ``generate``
        (they cost more than several decode steps of a small model). It holds them until another choice of
        adapters or another bank comes."""
        bank = self.bank
        key = _rows_key(adapter_names)
        last = self._last_batch
        if key is not None and last is not None and last[0] is bank and last[1] == key:
            return last[2]
        rows = []
        for entry in adapter_names:
            if entry is None:
                rows.append([])
            elif isinstance(entry, str):
                rows.append([(bank.index(entry), 1.0)])
            elif isinstance(entry, Mapping):
                row = [(bank.index(name), float(weight)) for name, weight in entry.items()]
                combined = [name for name in entry if bank.kind(name) != "lora"]
                if combined and (len(row) > 1 or row[0][1] != 1.0):
                    raise ValueError(f"adapters {combined} are DoRA/IA3: they cannot be weighted or combined "
                                     f"(only LoRA adapters can), got {dict(entry)}")
                rows.append(row)
            else:
                raise TypeError(f"adapter_names entries must be None, a name or {{name: weight}}, got {entry!r}")
        slots = max([1] + [len(r) for r in rows])
        slot_ids = torch.full((len(rows), slots), -1, dtype=torch.int32)
        slot_weights = torch.zeros(len(rows), slots, dtype=torch.float32)
        for b, row in enumerate(rows):
            for j, (k, weight) in enumerate(row):
                slot_ids[b, j], slot_weights[b, j] = k, weight
        batch = MultiLoraBatch(bank, slot_ids, slot_weights)
        if key is not None:
            self._last_batch = (bank, key, batch)
        return batch

    def _checked_batch(self, adapter_names, batch: Optional[MultiLoraBatch], args: tuple, kwargs: dict,
                       expand: int = 1) -> MultiLoraBatch:
        """The call's batch, checked against the rows of its input before the model runs, its rows repeated
        ``expand`` times each (``generate``'s beams / return sequences)."""
        if (adapter_names is None) == (batch is None):
            raise ValueError("pass exactly one of adapter_names (one entry per row) or batch")
        if adapter_names is not None:
            if isinstance(adapter_names, (str, Mapping)):
                raise TypeError(f"adapter_names takes one entry per row (a list), got {adapter_names!r}")
            batch = self.batch(adapter_names)
        elif not isinstance(batch, MultiLoraBatch) or batch.bank.layer_specs is not self.bank.layer_specs:
            # every bank of this model (each add / remove makes one) shares its layer specs; another model's
            # batch would index adapters this model does not hold, or hold under other names
            raise ValueError("batch was not built by this MultiLoraModel: build it with this model's batch(...)")
        rows = _input_rows(args, kwargs)
        if rows is not None and rows != batch.num_rows:
            what = "adapter_names has" if adapter_names is not None else "the batch has"
            raise ValueError(f"{what} {batch.num_rows} entries for an input of {rows} rows: give one per row "
                             "(None for the base model)")
        return batch if expand == 1 else batch.repeated(expand)

    def _run(self, batch: MultiLoraBatch, call, /, *args, **kwargs):
        """``call(*args, **kwargs)`` without grad, every adapted layer using ``batch`` for the duration (in this
        thread only: calls from other threads serve their own batches at the same time)."""
        with serving_batch(batch), torch.no_grad():
            return call(*args, **kwargs)

    def forward(self, *args, adapter_names: Optional[Sequence[RowAdapters]] = None,
                batch: Optional[MultiLoraBatch] = None, **kwargs):
        """The wrapped model's forward, row ``b`` with ``adapter_names[b]`` (or a prebuilt ``batch``)."""
        return self._run(self._checked_batch(adapter_names, batch, args, kwargs), self._modules["model"], *args,
                         **kwargs)

    def generate(self, *args, adapter_names: Optional[Sequence[RowAdapters]] = None,
                 batch: Optional[MultiLoraBatch] = None, **kwargs):
        """The wrapped model's ``generate``, row ``b`` with ``adapter_names[b]`` (or a prebuilt ``batch``);
        with beams or several return sequences, every copy of row ``b`` keeps row ``b``'s adapters."""
        generation_config = copy.deepcopy(kwargs.get("generation_config") or self.model.generation_config)
        generation_config.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})
        expand = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        return self._run(self._checked_batch(adapter_names, batch, args, kwargs, expand), self.model.generate, *args,
                         **kwargs)


def _rows_key(adapter_names) -> Optional[tuple]:
    """A hashable copy of ``adapter_names`` for :meth:`MultiLoraModel.batch`'s reuse, or None when an entry is
    not a name, None or ``{name: number}`` (then no reuse; ``batch`` checks the entries)."""
    key = []
    for entry in adapter_names:
        if entry is None or isinstance(entry, str):
            key.append(entry)
        elif isinstance(entry, Mapping) and all(isinstance(w, (int, float)) for w in entry.values()):
            key.append(tuple(entry.items()))  # in order: the order of a row's slots
        else:
            return None
    return tuple(key)


def _input_rows(args: tuple, kwargs: dict) -> Optional[int]:
    """The batch size of a forward / generate call (its first positional tensor, ``input_ids``, ``inputs``
    or ``inputs_embeds``), or None if there is none to read it from."""
    for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None
