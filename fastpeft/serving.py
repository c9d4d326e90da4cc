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

Training (:meth:`MultiLoraModel.train_adapters`): several LoRA adapters trained at once in mixed batches, in
training mode, ``model(input_ids, labels=..., adapter_names=[...])`` (names or None per row): each adapted layer runs
the base once and adds the trainable adapters' terms by the multi-LoRA training op
(:mod:`fastpeft.ops.multi_lora_train`), the loss is the sum of each adapter's own loss over its rows, as for a PEFT
model (:mod:`fastpeft.integration.multi_adapter_training`). :meth:`~MultiLoraModel.trained_adapter` gives an adapter
with its trained tensors (PEFT's format: :func:`fastpeft.save_adapter`), :meth:`~MultiLoraModel.serve_trained` puts
them in the served bank. LoRA adapters only (no DoRA / IA3), no gradient checkpointing.

Otherwise inference only (everything runs under ``torch.no_grad``). Not supported: ``modules_to_save``.
"""

from __future__ import annotations

import copy
from functools import partial
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
        self._sources = dict(loaded)  # each adapter as loaded (its config, for trained_adapter)
        self._last_batch: Optional[tuple] = None  # (bank, rows key, MultiLoraBatch) of the last batch() call
        # training: {adapter: {layer path: (lora_a, lora_b) Parameters}}, dropout, generators, hooks
        self._trained: dict = {}
        self._training_rows: Optional[list] = None
        self._training_hooks: list = []

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
        adapter = self._load(name, source)
        self.bank = self.bank.with_adapter(name, adapter)
        self._sources[name] = adapter
        self._trained.pop(name, None)

    def remove_adapter(self, name: str) -> None:
        """Remove an adapter. Batches built before keep using the bank they were built on."""
        self.bank = self.bank.without_adapter(name)
        self._sources.pop(name, None)
        self._trained.pop(name, None)

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
        """The wrapped model's forward, row ``b`` with ``adapter_names[b]`` (or a prebuilt ``batch``); in training
        mode with adapters from :meth:`train_adapters`, the training forward (the module docstring)."""
        if self.training and self._trained and adapter_names is not None and torch.is_grad_enabled():
            return self._training_forward(args, kwargs, adapter_names)
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


    # --------------------------------------------------------------------------------------------- training
    def train_adapters(self, adapter_names: Sequence[str], lr, weight_decay=0.0,
                       dropout_seeds: Optional[Mapping[str, int]] = None) -> list:
        """Make the LoRA adapters ``adapter_names`` trainable: each gets its own Parameters (copies of its packed
        factors, in the bank's dtype) and one optimizer parameter group, ``{"params", "lr", "weight_decay",
        "adapter"}`` (``lr`` / ``weight_decay``: a number or ``{name: number}``); the base stays frozen. Dropout at
        each adapter's ``lora_dropout``, from its own generator when ``dropout_seeds`` names it. ValueError /
        TypeError before anything changes for an unknown, DoRA or IA3 adapter or bad arguments."""
        from .integration.multi_adapter_training import _per_adapter

        if isinstance(adapter_names, str) or not adapter_names or len(set(adapter_names)) != len(adapter_names):
            raise ValueError(f"adapter_names must be a list of distinct adapter names, got {adapter_names!r}")
        names = list(adapter_names)
        for name in names:
            if self.bank.kind(name) != "lora":  # (KeyError for an unknown name)
                raise ValueError(f"adapter {name!r} is {self.bank.kind(name)}: MultiLoraModel trains LoRA adapters")
        lrs, decays = _per_adapter(lr, names, "lr"), _per_adapter(weight_decay, names, "weight_decay")
        seeds = dict(dropout_seeds or {})
        if set(seeds) - set(names):
            raise ValueError(f"dropout_seeds names adapters not trained here: {sorted(set(seeds) - set(names))}")
        for param in self.model.parameters():
            param.requires_grad_(False)
        groups = []
        for name in names:
            modules = self.bank.modules[self.bank.index(name)]
            spec_dtype = {path: self.bank.layers[path].lora_a.dtype for path in modules}
            factors = {path: (nn.Parameter(m.lora_a.detach().to(spec_dtype[path]).clone()),
                              nn.Parameter(m.lora_b.detach().to(spec_dtype[path]).clone()), float(m.scaling))
                       for path, m in modules.items() if m is not None and m.rank > 0}
            device = next(iter(factors.values()))[0].device if factors else torch.device("cpu")
            generator = None if name not in seeds else torch.Generator(device=device).manual_seed(seeds[name])
            rate = float(self._sources[name].config.get("lora_dropout", 0.0) or 0.0)
            self._trained[name] = (factors, rate, generator)
            groups.append({"params": [p for a, b, _ in factors.values() for p in (a, b)], "lr": lrs[name],
                           "weight_decay": decays[name], "adapter": name})
        if not self._training_hooks:
            for path, layer in self.multi_lora_layers.items():
                self._training_hooks.append(layer.register_forward_hook(partial(self._add_trained_terms, path)))
        return groups

    def _training_forward(self, args: tuple, kwargs: dict, adapter_names):
        from .integration.multi_adapter_training import with_adapter_losses

        if isinstance(adapter_names, (str, Mapping)):
            raise TypeError(f"adapter_names takes one entry per row (a list), got {adapter_names!r}")
        rows = _input_rows(args, kwargs)
        if rows is not None and rows != len(adapter_names):
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for an input of {rows} rows")
        unknown = sorted({n for n in adapter_names if n is not None and n not in self._trained})
        if unknown:
            raise ValueError(f"adapters {unknown} are not being trained (train_adapters): {sorted(self._trained)}")
        if any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules()):
            raise ValueError("MultiLoraModel training does not run with gradient checkpointing: disable it")
        labels = kwargs.pop("labels", None)
        self._training_rows = list(adapter_names)
        try:
            out = self.model(*args, **kwargs)  # no served batch: each adapted layer is its base, plus the hook
        finally:
            self._training_rows = None
        return with_adapter_losses(self.model, out, labels, adapter_names, base_name=None)

    def _add_trained_terms(self, path: str, layer, inputs, output):
        """Forward hook of adapted layer ``path`` during a training forward: ``output`` plus each row's trainable
        adapter's term (the multi-LoRA training op over the adapters present at this layer)."""
        rows = self._training_rows
        if rows is None:
            return None
        from .ops.multi_lora import MultiLoraMeta
        from .ops.multi_lora_train import AdapterDropout, multi_lora_train_term

        present = sorted({n for n in rows if n is not None and path in self._trained[n][0]})
        if not present:
            return None
        x = inputs[0]
        slot = {name: k for k, name in enumerate(present)}
        tokens_per_row = x[0].numel() // x.shape[-1]
        ids = torch.tensor([slot.get(n, -1) for n in rows], dtype=torch.int32).repeat_interleave(tokens_per_row)
        factors = [self._trained[n][0][path] for n in present]
        dropouts = [AdapterDropout(self._trained[n][1] if self.training else 0.0, self._trained[n][2]) for n in present]
        term = multi_lora_train_term(x.reshape(-1, x.shape[-1]), [f[0] for f in factors], [f[1] for f in factors],
                                     [f[2] for f in factors], MultiLoraMeta.build(ids.to(x.device)), dropouts)
        return output + term.to(output.dtype).reshape(output.shape)

    def trained_adapter(self, name: str) -> Adapter:
        """Adapter ``name`` as loaded (its config) with the current values of its trained factors, in PEFT's
        format (:func:`fastpeft.save_adapter` writes it)."""
        if name not in self._trained:
            raise KeyError(f"adapter {name!r} is not being trained; trained: {sorted(self._trained)}")
        source = self._sources[name]
        tensors = dict(source.tensors)
        for path, (lora_a, lora_b, _) in self._trained[name][0].items():
            for key, value in ((f"base_model.model.{path}.lora_A.weight", lora_a),
                               (f"base_model.model.{path}.lora_B.weight", lora_b)):
                tensors[key] = value.detach().to(tensors[key].dtype).clone()
        return Adapter(source.config, tensors)

    def serve_trained(self) -> None:
        """Put every trained adapter's current values into the served bank (a new bank, as ``add_adapter``)."""
        self.bank = self.bank.with_adapters({name: self.trained_adapter(name) for name in self._trained})


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
