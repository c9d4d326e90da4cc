"""Adapter banks: N adapters packed into stacked tensors, per layer and per model, copy-on-write.

A :class:`LoraBank` holds one linear layer's adapters as ``lora_a`` ``(N, R, in)``, ``lora_b``
``(N, out, R)`` (``R`` = the largest rank, zero-padded; the kernels read only each adapter's own
``ranks[k]`` columns), ``ranks`` ``(N,)`` int32 and ``scalings`` ``(N,)`` fp32. :class:`AdapterBank` packs
a layer's tensors in the dtype PEFT loads adapters into (:func:`peft_adapter_dtype`: fp32, also on a bf16
model and for an fp16 file), so an adapter computes the same beside any other, and the multi-LoRA op computes
their terms in fp32. An adapter that does not
touch the layer has rank 0. DoRA and IA3 adapters add per-adapter vectors applied around the base
matmul (``y = g_k ⊙ (x' Wᵀ + s_k·(x Aᵀ)Bᵀ) + c_k ⊙ b`` with ``x' = x ⊙ l_k`` for feed-forward IA3):
``out_scale`` ``(N, out)`` (DoRA's ``m/‖W + sBA‖``, IA3's output ``l``; ones otherwise),
``bias_scale`` ``(N, out)`` (IA3 scales the bias, DoRA does not) and ``in_scale`` ``(N, in)`` (feed-forward
IA3's ``l``). The DoRA norm is computed once when the adapter is packed: serving never trains, and
PEFT detaches it anyway.

Banks are immutable. :class:`AdapterBank` (one model's named adapters and every layer's
``LoraBank``) returns a NEW bank from ``with_adapter`` / ``without_adapter`` with freshly packed
tensors and a bumped ``version``; a batch keeps the bank it was built against, so adding or removing
an adapter while a batch is in flight never changes what that batch computes (copy-on-write).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from . import reference
from .adapters import Adapter, ModuleAdapter
from .ops.inputs import fusable_scaling

__all__ = ["LoraBank", "AdapterBank", "MAX_RANK", "peft_adapter_dtype"]

MAX_RANK = 256


@dataclass(frozen=True)
class LoraBank:
    """One linear layer's N adapters, packed (see the module docstring for shapes)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor
    out_scale: Optional[torch.Tensor] = None
    bias_scale: Optional[torch.Tensor] = None
    in_scale: Optional[torch.Tensor] = None

    @property
    def num_adapters(self) -> int:
        return self.lora_a.shape[0]

    @property
    def max_rank(self) -> int:
        return self.lora_a.shape[1]

    # Host-side views read by the CPU path of the multi-LoRA op at every layer call (a bank never changes, so they
    # are made once): converting ``ranks`` / ``scalings`` and slicing one adapter's factors out of the padded
    # tensors there cost more than a decode step's LoRA term.
    @functools.cached_property
    def rank_list(self) -> list:
        """``ranks`` as Python ints."""
        return self.ranks.tolist()

    @functools.cached_property
    def scalings_fuse(self) -> bool:
        """Whether the scaling of every adapter that touches this layer (rank > 0; the others hold 0) may go into a
        fused product (``fastpeft.ops.inputs.fusable_scaling`` for this bank's dtype); otherwise the multi-LoRA op's
        CPU path forms PEFT's ``(x Aᵀ Bᵀ) · s`` op by op."""
        return all(fusable_scaling(s, self.lora_a.dtype)
                   for s, rank in zip(self.scalings.tolist(), self.rank_list) if rank > 0)

    @functools.cached_property
    def _factors(self) -> dict:
        return {}

    def adapter_factors(self, k: int) -> tuple:
        """``(A_kᵀ, B_kᵀ, s_k)``: adapter ``k``'s factors at its own rank ``r_k`` as ``(in, r_k)`` and ``(r_k, out)``
        views of ``lora_a`` / ``lora_b`` (padding never read) and its scaling as a float; made at the first call."""
        factors = self._factors.get(k)
        if factors is None:
            rank = self.rank_list[k]
            factors = self._factors[k] = (self.lora_a[k, :rank].t(), self.lora_b[k, :, :rank].t(),
                                          float(self.scalings[k]))
        return factors

    def transposed(self) -> "LoraBank":
        """The bank of the transposed adapters, ``A'_k = B_kᵀ`` ``(N, R, out)`` and ``B'_k = A_kᵀ`` ``(N, in, R)`` (views
        of this bank's tensors, no copy), with the same ranks and scalings: ``multi_lora_add_(dx, dy,
        bank.transposed(), meta)`` adds ``w · s_k · (dy B_k) A_k``, the adapters' share of the multi-adapter
        backward's ``dx``. Made once per bank, so the multi-LoRA CPU path's per-bank caches keep applying. A bank with
        DoRA or IA3 vectors has no such transpose (their backward is not the LoRA factors'): ValueError."""
        return self._transposed

    @functools.cached_property
    def _transposed(self) -> "LoraBank":
        if self.out_scale is not None or self.bias_scale is not None or self.in_scale is not None:
            raise ValueError("a bank with DoRA / IA3 vectors (out_scale, bias_scale, in_scale) has no transposed "
                             "LoRA bank: only plain LoRA adapters train through the multi-LoRA primitives")
        return LoraBank(self.lora_b.transpose(1, 2), self.lora_a.transpose(1, 2), self.ranks, self.scalings)

    @classmethod
    def pack(
        cls,
        adapters: Sequence[Optional[ModuleAdapter]],
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        device,
        base_weight: Optional[reference.Weight] = None,
        labels: Optional[Sequence[str]] = None,
        rank_limit: Optional[int] = MAX_RANK,
    ) -> "LoraBank":
        """Pack ``adapters`` (``None`` = this adapter leaves the layer alone). ``base_weight`` is needed
        only for DoRA (its norm). ``labels[k]`` names adapter ``k`` in error messages (default
        ``"adapter k"``); every check runs before anything is packed. ``rank_limit``: the largest rank accepted
        (serving's :data:`MAX_RANK`; None: any, as the multi-LoRA op takes any, for a PEFT layer's own adapters)."""
        labels = [f"adapter {k}" for k in range(len(adapters))] if labels is None else labels
        ranks = [0 if a is None else a.rank for a in adapters]
        for k, a in enumerate(adapters):
            if a is not None:
                _check_adapter(a, in_features, out_features, labels[k], base_weight is not None, rank_limit)
        n, max_rank = len(adapters), max(ranks, default=0)
        loras = [None if a is None or a.ia3_scale is not None else a for a in adapters]
        lora_a = _stacked([None if a is None else a.lora_a for a in loras], (max_rank, in_features), dtype, device)
        lora_b = _stacked([None if a is None else a.lora_b for a in loras], (out_features, max_rank), dtype, device)
        # rounded to fp32 as PEFT's product with a Python float rounds it (inf beyond fp32's range)
        scalings = torch.tensor([0.0 if a is None else a.scaling for a in loras], dtype=torch.float64).to(
            device=device, dtype=torch.float32)
        out_scale = bias_scale = in_scale = None
        uses_out, uses_in = False, False
        if any(a is not None and (a.ia3_scale is not None or a.magnitude is not None) for a in adapters):
            out_scale = torch.ones(n, out_features, dtype=dtype, device=device)
            bias_scale = torch.ones(n, out_features, dtype=dtype, device=device)
            in_scale = torch.ones(n, in_features, dtype=dtype, device=device)
            for k, a in enumerate(adapters):
                if a is None:
                    continue
                if a.ia3_scale is not None:
                    if a.is_feedforward:
                        in_scale[k] = a.ia3_scale
                        uses_in = True
                    else:
                        out_scale[k] = bias_scale[k] = a.ia3_scale
                        uses_out = True
                elif a.magnitude is not None:
                    norm = reference.dora_weight_norm(base_weight, a.lora_a.float(), a.lora_b.float(), a.scaling,
                                                      dtype=torch.float32)
                    out_scale[k] = a.magnitude.float() / norm
                    uses_out = True
        return cls(
            lora_a=lora_a, lora_b=lora_b,
            ranks=torch.tensor(ranks, dtype=torch.int32, device=device), scalings=scalings,
            out_scale=out_scale if uses_out else None,
            bias_scale=bias_scale if uses_out else None,
            in_scale=in_scale if uses_in else None,
        )


def _stacked(factors: Sequence[Optional[torch.Tensor]], shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """``(N, *shape)``: each 2-D factor (None: zeros) in ``dtype`` on ``device``, zero-padded to ``shape`` (a rank
    below the largest), in one ``torch.stack`` (a copy into a preallocated bank per factor costs more: a PEFT
    layer's mixed batch packs at every model call)."""
    if not factors:
        return torch.zeros(0, *shape, dtype=dtype, device=device)
    parts = [torch.zeros(shape, dtype=dtype, device=device) if f is None else f.to(device, dtype) for f in factors]
    return torch.stack([p if p.shape == shape else F.pad(p, (0, shape[1] - p.shape[1], 0, shape[0] - p.shape[0]))
                        for p in parts])


def peft_adapter_dtype(layer_dtype: torch.dtype) -> torch.dtype:
    """The dtype PEFT's ``PeftModel.from_pretrained`` / ``load_adapter`` gives an adapter's tensors on a layer of
    ``layer_dtype`` (a 4-bit layer: its compute dtype), whatever the file holds and whichever adapters sit beside
    it: PEFT makes the parameters in the layer's dtype, upcasts fp16 / bf16 ones to fp32
    (``autocast_adapter_dtype``) and copies the file's values into them. fp64 on an fp64 layer, else fp32."""
    return torch.float64 if layer_dtype == torch.float64 else torch.float32


def _check_adapter(a: ModuleAdapter, in_features: int, out_features: int, label: str, has_base: bool,
                   rank_limit: Optional[int]) -> None:
    """Raise a ``ValueError`` naming ``label`` if ``a`` does not fit an ``(out, in)`` layer of this bank."""
    if a.ia3_scale is not None:
        _check_shape(a.ia3_scale, (in_features,) if a.is_feedforward else (out_features,), label, "ia3_scale")
        return
    if rank_limit is not None and a.rank > rank_limit:
        raise ValueError(f"{label}: rank {a.rank} > {rank_limit}, the largest rank a bank holds")
    _check_shape(a.lora_a, (a.rank, in_features), label, "lora_a")
    _check_shape(a.lora_b, (out_features, a.rank), label, "lora_b")
    if a.magnitude is not None:
        if not has_base:
            raise ValueError(f"{label} is DoRA: packing it needs the base weight (a bitsandbytes 4-bit layer "
                             "already repacked for its CPU kernel has none: build the MultiLoraModel before "
                             "running the model on CPU in eval mode)")
        _check_shape(a.magnitude, (out_features,), label, "magnitude")


def _check_shape(t: torch.Tensor, shape: tuple, label: str, what: str) -> None:
    if t.shape != shape:
        raise ValueError(f"{label}: {what} has shape {tuple(t.shape)}, the layer needs {shape}")


@dataclass(frozen=True)
class LayerSpec:
    """What packing needs to know about one adapted base layer."""

    in_features: int
    out_features: int
    dtype: torch.dtype
    device: torch.device
    base_weight: Optional[reference.Weight] = None


@dataclass(frozen=True)
class AdapterBank:
    """A model's named adapters (slot ``k`` = ``names[k]``) and each adapted layer's :class:`LoraBank`.

    Immutable: ``with_adapter`` / ``without_adapter`` return a new bank (new tensors, ``version + 1``)."""

    layer_specs: Mapping[str, LayerSpec]
    names: tuple = ()
    modules: tuple = ()  # per adapter: {layer path: ModuleAdapter}
    layers: Mapping[str, LoraBank] = field(default_factory=dict)
    version: int = 0

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown adapter {name!r}; loaded: {list(self.names)}") from None

    def kind(self, name: str) -> str:
        """``"lora"``, ``"dora"`` or ``"ia3"``."""
        mods = self.modules[self.index(name)].values()
        if any(m.ia3_scale is not None for m in mods):
            return "ia3"
        return "dora" if any(m.magnitude is not None for m in mods) else "lora"

    def with_adapter(self, name: str, adapter: Adapter) -> "AdapterBank":
        """A new bank with ``adapter`` added under ``name`` (replacing one of that name)."""
        return self.with_adapters({name: adapter})

    def with_adapters(self, adapters: Mapping[str, Adapter]) -> "AdapterBank":
        """A new bank with every ``{name: adapter}`` added (packed once for all of them)."""
        names, mods = list(self.names), list(self.modules)
        for name, adapter in adapters.items():
            try:
                # the file's layers checked against this model's before the config's patterns meet their names
                unknown = sorted(set(adapter.module_names()) - set(self.layer_specs))
                modules = None if unknown else adapter.modules(self.layer_specs)
            except ValueError as exc:
                raise ValueError(f"adapter {name!r}: {exc}") from None
            if unknown:
                raise ValueError(f"adapter {name!r} targets layers this model does not adapt: {unknown[:5]}")
            if name in names:
                mods[names.index(name)] = modules
            else:
                names.append(name)
                mods.append(modules)
        return self._repacked(tuple(names), tuple(mods))

    def without_adapter(self, name: str) -> "AdapterBank":
        """A new bank without ``name``; later adapters move down one slot."""
        k = self.index(name)
        return self._repacked(self.names[:k] + self.names[k + 1:], self.modules[:k] + self.modules[k + 1:])

    def _repacked(self, names: tuple, mods: tuple) -> "AdapterBank":
        layers = {}
        for path, spec in self.layer_specs.items():
            adapters = [m.get(path) for m in mods]
            layers[path] = LoraBank.pack(adapters, spec.in_features, spec.out_features,
                                         peft_adapter_dtype(spec.dtype), spec.device, spec.base_weight,
                                         [f"adapter {n!r} at layer {path}" for n in names])
        return AdapterBank(self.layer_specs, names, mods, layers, self.version + 1)
