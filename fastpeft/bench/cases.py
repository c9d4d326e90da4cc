"""The bench cases: a registry of (case, implementation) jobs.

A case is one thing measured (``lora.fwd`` at one shape, ``train_step`` on one model, ...). Each names
its implementations: ``fastpeft`` (the package's modules / ops, or a PEFT model after
``fastpeft.accelerate``), ``fastpeft-serving`` (``MultiLoraModel``, for decode), ``reference`` (``fastpeft.reference``,
plain PyTorch: in a plain layer, :class:`_ReferenceLayer`, where fastpeft's row is a layer), ``peft`` (Hugging Face
PEFT's own layer or model), ``bnb`` (bitsandbytes) and, for
decode, ``hf`` (the model without adapters). A setup function builds one implementation and returns a
:class:`Prepared` call; when a third-party package it compares against is not importable it raises
:class:`Unavailable` and the job is reported as skipped with that reason and the command that installs it
(``pip install -e ".[bench]"`` brings everything the default suites compare against).

Every implementation of a case is built from the same seeded weights. Inputs rotate over
``config.rotations`` sets. Micro cases carry a cost model (FLOPs and minimum bytes moved) for the roofline.
"""

from __future__ import annotations

import importlib
import math
import random
import tempfile
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import reference
from ..nf4 import NF4Weight
from ..nn import DoraLinear, IA3Linear, LoraLinear
from ..integration.accelerate import accelerate
from ..ops import sparse_delta_linear
from ..sparse_delta import SparseDelta
from ..integration.multi_adapter_training import train_adapters
from ..serving import MultiLoraModel


class Unavailable(Exception):
    """An implementation cannot run here; the message says why."""


@dataclass
class Prepared:
    """One implementation ready to time: ``run(i)`` does one call on input set ``i``."""

    run: Callable[[int], object]
    tokens: Optional[int] = None  # tokens processed per call (for tokens/s)
    flops: Optional[float] = None
    bytes_moved: Optional[float] = None
    note: str = ""


@dataclass
class BenchConfig:
    device: torch.device
    dtype: torch.dtype
    rank: int
    micro_m: list
    micro_features: list  # (out_features, in_features)
    micro_adapters: int  # adapters in the multi-LoRA micro case
    warmup: int
    repeats: int  # rounds, the implementations of a case taking turns call by call (timing.measure_interleaved)
    rotations: int
    llama: dict  # LlamaConfig kwargs of the built-in model
    model_path: Optional[str] = None
    train_batch: int = 2
    seq_len: int = 32
    decode_prompt: int = 8
    decode_tokens: int = 8
    serving_adapters: list = field(default_factory=lambda: [1, 4])
    serving_seqs: int = 4
    train_adapters: list = field(default_factory=lambda: [1, 4, 16])  # adapters trained at once (multi_adapter_train)
    rows_per_adapter: int = 4
    cases: Optional[list] = None  # substrings; None = every case
    min_round_ms: float = 0.0  # per round, calls enough that the fastest implementation runs this long (0: one)
    clock: str = "wall"  # CPU: "wall" or "process" (fastpeft.bench.timing.CLOCKS)


@dataclass
class Job:
    case: str
    impl: str
    params: dict
    setup: Callable[[BenchConfig], Prepared]


_LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Built-in random-weight Llamas (no download). Feature sizes are multiples of 64 so bitsandbytes'
# blocks never span rows. "gpu" is a ~0.2B-parameter model: big enough for kernels to matter, small
# enough that the whole GPU suite fits in its 10-minute budget.
LLAMA_SIZES = {
    "quick": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "cpu": dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=4),
    "gpu": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=4),
}


# pip package that provides each optional import, for the "how to get it" part of a skip reason
_PIP_NAMES = {"peft": "peft", "bitsandbytes": "bitsandbytes", "transformers": "transformers"}


def quiet_bitsandbytes_import() -> None:
    """Imports bitsandbytes, when installed, before PEFT or transformers do (they import it too): without its
    warning about an optional Hub kernel (``fastpeft._bitsandbytes``)."""
    from .._bitsandbytes import import_bitsandbytes

    try:
        import_bitsandbytes()
    except ImportError:
        pass


def _require(module: str):
    """The third-party ``module``, or :class:`Unavailable` naming what is missing and how to install it
    (everything the default suite compares against comes with ``pip install -e ".[bench]"``)."""
    try:
        quiet_bitsandbytes_import()
        return importlib.import_module(module)
    except ImportError as exc:
        package = _PIP_NAMES.get(module.partition(".")[0], module.partition(".")[0])
        raise Unavailable(f"{module} not importable ({exc}): pip install -e \".[bench]\" (or pip install "
                          f"{package})") from None


# ---------------------------------------------------------------------------------------------- micro


@dataclass
class _Weights:
    """Seeded weights shared by every implementation of one micro case."""

    weight: torch.Tensor  # (out, in)
    lora_a: torch.Tensor  # (r, in)
    lora_b: torch.Tensor  # (out, r), non-zero so the LoRA path does real work
    magnitude: torch.Tensor  # (out,)
    ia3_scale: torch.Tensor  # (out,)
    scaling: float


def _randn(cfg: BenchConfig, g: torch.Generator, *shape) -> torch.Tensor:
    """Normal samples drawn on the bench device (a 14336x4096 weight drawn on CPU would take a second)."""
    return torch.randn(*shape, generator=g, device=cfg.device, dtype=torch.float32)


def _generator(cfg: BenchConfig, seed: int) -> torch.Generator:
    return torch.Generator(device=cfg.device).manual_seed(seed)


# The last shape's weights, handed to every implementation of its cases (their setups run one after another): the
# same computation on two copies of one weight differs by up to 16 % on a 2-core CPU host from where the copies lie in
# memory (identical reference calls on three copies, 2816x1024 fp32, M = 1: 1.00 / 1.11 / 1.16), which would read as
# a difference between implementations. One copy, read by all of them, leaves only their code to compare.
_SHARED_WEIGHTS: dict = {}


def _weights(cfg: BenchConfig, out_f: int, in_f: int) -> _Weights:
    key = (cfg.device, cfg.dtype, cfg.rank, out_f, in_f)
    if key not in _SHARED_WEIGHTS:
        _SHARED_WEIGHTS.clear()
        _SHARED_WEIGHTS[key] = _seeded_weights(cfg, out_f, in_f)
    return _SHARED_WEIGHTS[key]


def _seeded_weights(cfg: BenchConfig, out_f: int, in_f: int) -> _Weights:
    g = _generator(cfg, out_f * 7919 + in_f)
    weight = _randn(cfg, g, out_f, in_f) / math.sqrt(in_f)
    lora_a = _randn(cfg, g, cfg.rank, in_f) / math.sqrt(in_f)
    lora_b = 0.02 * _randn(cfg, g, out_f, cfg.rank)
    magnitude = torch.linalg.vector_norm(weight, dim=1) * (1 + 0.1 * _randn(cfg, g, out_f))
    ia3_scale = 1 + 0.1 * _randn(cfg, g, out_f)
    return _Weights(*(t.to(cfg.dtype) for t in (weight, lora_a, lora_b, magnitude, ia3_scale)), scaling=2.0)


def _inputs(cfg: BenchConfig, m: int, n_features: int, seed: int) -> list:
    g = _generator(cfg, seed)
    return [_randn(cfg, g, m, n_features).to(cfg.dtype) for _ in range(cfg.rotations)]


def _timed_call(cfg: BenchConfig, forward: Callable, m: int, in_f: int, out_f: int, mode: str,
                params: list) -> Callable[[int], object]:
    """``run(i)``: the forward on input set ``i`` (no grad), or forward + backward to ``x`` and ``params``."""
    xs = _inputs(cfg, m, in_f, seed=1)
    if mode == "fwd":
        def run(i):
            with torch.no_grad():
                return forward(xs[i % len(xs)])
        return run
    xs = [x.requires_grad_(True) for x in xs]
    grads = _inputs(cfg, m, out_f, seed=2)
    wrt = [*params]

    def run(i):
        x = xs[i % len(xs)]
        return torch.autograd.grad(forward(x), [x, *wrt], grads[i % len(grads)])
    return run


class _OneLinear(nn.Module):
    """A model whose only layer is ``proj``: what PEFT's get_peft_model wraps to give us its layer."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _ReferenceLayer(nn.Module):
    """``fastpeft.reference``'s math as a plain PyTorch layer: the ``reference`` implementation of the LoRA, QLoRA,
    DoRA, IA3 and multi-LoRA micro cases. Their ``fastpeft`` rows are layers, so their references are too: the ratio
    then compares the two layers' code, not the cost of being called as an ``nn.Module``, which alone is a few
    percent of an M = 1 call on CPU (``bench/ia3_floor.py`` times the bare function beside both). Registered as a
    layer registers its tensors (the frozen base weight as ``nn.Linear`` holds it, the trainable ones as parameters),
    read as attributes at each call."""

    def __init__(self, weight, scaling: float = 1.0, **trainable: torch.Tensor):
        super().__init__()
        self.weight = weight if isinstance(weight, NF4Weight) else nn.Parameter(weight, requires_grad=False)
        self.scaling = scaling
        for name, tensor in trainable.items():
            setattr(self, name, nn.Parameter(tensor.detach()))


class _ReferenceLora(_ReferenceLayer):
    def forward(self, x):
        return reference.lora_linear(x, self.weight, None, self.lora_a, self.lora_b, self.scaling)


class _ReferenceDora(_ReferenceLayer):
    def forward(self, x):
        return reference.dora_linear(x, self.weight, None, self.lora_a, self.lora_b, self.scaling, self.magnitude)


class _ReferenceIA3(_ReferenceLayer):
    def forward(self, x):
        return reference.ia3_linear(x, self.weight, None, self.ia3_l, is_feedforward=False)


class _ReferenceMultiLora(_ReferenceLayer):
    """Frozen adapters (serving): the factors and each token's adapter id as plain attributes."""

    def __init__(self, weight, scaling: float, lora_as: list, lora_bs: list, adapter_ids: torch.Tensor):
        super().__init__(weight, scaling)
        self.lora_as, self.lora_bs, self.adapter_ids = lora_as, lora_bs, adapter_ids
        self.scalings = [scaling] * len(lora_as)

    def forward(self, x):
        return reference.multi_lora_linear(x, self.weight, None, self.lora_as, self.lora_bs, self.scalings,
                                           self.adapter_ids)


def _dense_linear(w: _Weights) -> nn.Linear:
    """A frozen ``nn.Linear`` over ``w.weight`` itself (no copy: see ``_SHARED_WEIGHTS``)."""
    layer = nn.Linear(w.weight.shape[1], w.weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(w.weight, requires_grad=False)
    return layer


def _bnb_linear(w: _Weights) -> nn.Module:
    """A bitsandbytes NF4 ``Linear4bit`` (double quantisation, blocksize 64) holding ``w.weight``."""
    bnb = _require("bitsandbytes")
    out_f, in_f = w.weight.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=w.weight.dtype, quant_type="nf4",
                              compress_statistics=True, device="meta")
    layer.weight = bnb.nn.Params4bit(w.weight.detach(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True).to(w.weight.device)
    return layer


def _peft_layer(base: nn.Module, config) -> nn.Module:
    peft = _require("peft")
    model = peft.get_peft_model(_OneLinear(base), config)
    return model.base_model.model.proj


def _set_peft_lora(layer, w: _Weights, dora: bool) -> None:
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(w.lora_a)
        layer.lora_B["default"].weight.copy_(w.lora_b)
        layer.scaling["default"] = w.scaling
        if dora:
            layer.lora_magnitude_vector["default"].weight.copy_(w.magnitude)


def _lora_cost(m, out_f, in_f, r, elsize, weight_bytes, mode):
    """FLOPs and minimum HBM bytes of a LoRA layer call (frozen base: no weight gradient)."""
    flops = 2 * m * in_f * (out_f + r) + 2 * m * r * out_f
    bytes_moved = weight_bytes + elsize * (m * in_f + m * out_f + r * (in_f + out_f))
    if mode == "fwd_bwd":  # dx = dy W + s (dy B) A, dA, dB: the base matmul again plus 3 small ones
        flops += 2 * m * in_f * out_f + 3 * 2 * m * r * (in_f + out_f)
        bytes_moved += weight_bytes + elsize * (2 * m * in_f + m * out_f + 2 * r * (in_f + out_f))
    return flops, bytes_moved


def _micro_lora(op: str, mode: str, impl: str, m: int, out_f: int, in_f: int,
                fp32_adapters: bool = False) -> Callable[[BenchConfig], Prepared]:
    """Setup of LoRA (``lora``), QLoRA (``qlora``: NF4 base) and DoRA (``dora``) layers. ``fp32_adapters``:
    the factors and magnitude in fp32 over a ``cfg.dtype`` base and activations — what PEFT's
    ``get_peft_model`` gives a bf16 / fp16 model (``autocast_adapter_dtype=True``), so what users run."""
    def setup(cfg: BenchConfig) -> Prepared:
        w = _weights(cfg, out_f, in_f)
        if fp32_adapters:
            w = replace(w, lora_a=w.lora_a.float(), lora_b=w.lora_b.float(), magnitude=w.magnitude.float())
        elsize = w.weight.element_size()
        nf4 = op == "qlora"
        dora = op == "dora"
        note = ""
        if impl == "peft":
            peft = _require("peft")
            base = _bnb_linear(w) if nf4 else _dense_linear(w)
            layer = _peft_layer(base, peft.LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=["proj"],
                                                      use_dora=dora))
            _set_peft_lora(layer, w, dora)
            forward = layer
            params = [p for p in layer.parameters() if p.requires_grad]
            note = "peft + bitsandbytes Linear4bit" if nf4 else ""
        else:
            # the bits bitsandbytes would store (NF4Weight.quantize is bit-exact with it): no bitsandbytes needed
            base_weight = NF4Weight.quantize(w.weight, 64, double_quant=True) if nf4 else w.weight
            if impl == "reference":
                factors = dict(lora_a=w.lora_a, lora_b=w.lora_b)
                if dora:
                    forward = _ReferenceDora(base_weight, w.scaling, **factors, magnitude=w.magnitude)
                else:
                    forward = _ReferenceLora(base_weight, w.scaling, **factors)
                params = [p for p in forward.parameters() if p.requires_grad]
            else:
                forward, params = _fastpeft_lora_module(op, cfg, w, base_weight)
        # NF4 with double quantisation: half a byte per element plus one uint8 absmax per 64
        weight_bytes = (out_f * in_f) // 2 + (out_f * in_f) // 64 if nf4 else out_f * in_f * elsize
        flops, bytes_moved = _lora_cost(m, out_f, in_f, cfg.rank, elsize, weight_bytes, mode)
        if dora:  # the weight-norm pass reads W and B A once more per call
            flops += 2 * out_f * in_f * cfg.rank
            bytes_moved += weight_bytes
        return Prepared(_timed_call(cfg, forward, m, in_f, out_f, mode, params), tokens=m, flops=flops,
                        bytes_moved=bytes_moved, note=note)
    return setup


def _fastpeft_lora_module(op: str, cfg: BenchConfig, w: _Weights, base_weight):
    """The fastpeft module for ``op`` over ``w.weight`` (or ``base_weight`` when it is NF4) and its trainables."""
    base = base_weight if isinstance(base_weight, NF4Weight) else _dense_linear(w)
    adapter = (base, nn.Parameter(w.lora_a.detach()), nn.Parameter(w.lora_b.detach()), w.scaling, nn.Identity())
    if op == "dora":
        layer = DoraLinear.from_parameters(
            *adapter, nn.Parameter(w.magnitude.detach()))
    else:
        layer = LoraLinear.from_parameters(*adapter)
    return layer, [p for p in layer.parameters() if p.requires_grad]


def _micro_ia3(mode: str, impl: str, m: int, out_f: int, in_f: int) -> Callable[[BenchConfig], Prepared]:
    def setup(cfg: BenchConfig) -> Prepared:
        w = _weights(cfg, out_f, in_f)
        scale = w.ia3_scale
        note = ""
        if impl == "reference":
            forward = _ReferenceIA3(w.weight, ia3_l=scale)
            params = [forward.ia3_l]
        elif impl == "peft":
            peft = _require("peft")
            layer = _peft_layer(_dense_linear(w), peft.IA3Config(target_modules=["proj"], feedforward_modules=[]))
            with torch.no_grad():
                layer.ia3_l["default"].copy_(scale.detach().reshape(layer.ia3_l["default"].shape))
            forward, params = layer, [layer.ia3_l["default"]]
        else:
            layer = IA3Linear(_dense_linear(w), is_feedforward=False)
            with torch.no_grad():
                layer.ia3_l.copy_(scale.detach().reshape(layer.ia3_l.shape))
            forward, params = layer, [layer.ia3_l]
        elsize = w.weight.element_size()
        flops = 2 * m * in_f * out_f + m * out_f
        bytes_moved = elsize * (out_f * in_f + m * in_f + m * out_f + out_f)
        if mode == "fwd_bwd":
            flops *= 2
            bytes_moved *= 2
        return Prepared(_timed_call(cfg, forward, m, in_f, out_f, mode, params), tokens=m, flops=flops,
                        bytes_moved=bytes_moved, note=note)
    return setup


def _micro_nf4_dequant(impl: str, out_f: int, in_f: int) -> Callable[[BenchConfig], Prepared]:
    def setup(cfg: BenchConfig) -> Prepared:
        w = _weights(cfg, out_f, in_f)
        nf4 = NF4Weight.quantize(w.weight, 64, double_quant=True)  # bitsandbytes' bits, without bitsandbytes
        note = ""
        if impl == "fastpeft":
            from ..ops import nf4_dequantize

            def run(i):
                return nf4_dequantize(nf4, cfg.dtype)
        elif impl == "reference":
            def run(i):
                return nf4.dequantize(cfg.dtype)
        else:
            functional = _require("bitsandbytes.functional")
            bnb_weight = _bnb_linear(w).weight
            packed, state = bnb_weight, bnb_weight.quant_state

            def run(i):
                return functional.dequantize_4bit(packed, state)
        # packed nibbles + uint8 absmax + nested absmax in, the dense weight out; no arithmetic worth counting
        bytes_moved = nf4.nbytes + out_f * in_f * w.weight.element_size()
        return Prepared(run, flops=0, bytes_moved=bytes_moved, note=note)
    return setup


def _micro_multi_lora(impl: str, m: int, out_f: int, in_f: int, n_adapters: int, fp32_adapters: bool = False):
    """Setup of one layer serving ``n_adapters`` LoRA adapters, one per token. ``fp32_adapters``: the factors in
    fp32 over a ``cfg.dtype`` base (PEFT's default on a bf16 / fp16 model; the bank keeps them fp32)."""
    def setup(cfg: BenchConfig) -> Prepared:
        w = _weights(cfg, out_f, in_f)
        g = _generator(cfg, 3)
        dtype = torch.float32 if fp32_adapters else cfg.dtype
        lora_as = [(_randn(cfg, g, cfg.rank, in_f) / math.sqrt(in_f)).to(dtype) for _ in range(n_adapters)]
        lora_bs = [(0.02 * _randn(cfg, g, out_f, cfg.rank)).to(dtype) for _ in range(n_adapters)]
        ids = torch.randint(0, n_adapters, (m,), generator=torch.Generator().manual_seed(3))
        names = [f"a{k}" for k in ids.tolist()]
        note = ""
        if impl == "reference":
            forward = _ReferenceMultiLora(w.weight, w.scaling, lora_as, lora_bs, ids.to(cfg.device))
        elif impl == "peft":
            peft = _require("peft")
            model = peft.get_peft_model(_OneLinear(_dense_linear(w)), _lora_config(peft, cfg, ["proj"]), "a0")
            for k in range(1, n_adapters):
                model.add_adapter(f"a{k}", _lora_config(peft, cfg, ["proj"]))
            model.eval()  # PEFT refuses adapter_names in training mode
            layer = model.base_model.model.proj
            with torch.no_grad():
                for k in range(n_adapters):
                    layer.lora_A[f"a{k}"].weight.copy_(lora_as[k])
                    layer.lora_B[f"a{k}"].weight.copy_(lora_bs[k])

            def forward(x):  # one token per row: PEFT's mixed batch takes one adapter name per sample
                return model(x.unsqueeze(1), adapter_names=names).squeeze(1)
            note = "peft mixed batch (adapter_names)"
        else:
            adapters = {f"a{k}": _single_layer_adapter(cfg, "proj", lora_as[k], lora_bs[k]) for k in range(n_adapters)}
            model = MultiLoraModel(_OneLinear(_dense_linear(w)), adapters)
            batch = model.batch(names)

            def forward(x):
                return model(x.unsqueeze(1), batch=batch).squeeze(1)
        elsize = w.weight.element_size()
        flops = 2 * m * in_f * out_f + 2 * m * cfg.rank * (in_f + out_f)
        used = len(set(ids.tolist()))
        bytes_moved = elsize * (out_f * in_f + m * (in_f + out_f) + used * cfg.rank * (in_f + out_f))
        return Prepared(_timed_call(cfg, forward, m, in_f, out_f, "fwd", []), tokens=m, flops=flops,
                        bytes_moved=bytes_moved, note=note)
    return setup


# DiffPruning's density (0.5 % of the entries, the paper's) and ten times that
SPARSE_DELTA_DENSITIES = (0.005, 0.05)


def _micro_sparse_delta(impl: str, m: int, out_f: int, in_f: int, density: float) -> Callable[[BenchConfig], Prepared]:
    """Setup of DiffPruning's served layer ``x Wᵀ + x δᵀ``, ``δ`` with ``density`` of its entries set:
    ``fastpeft`` (``sparse_delta_linear`` over the stored CSR delta), ``reference`` (``fastpeft.reference``:
    the same sum with ``δ`` dense, two dense products), ``merged`` (one dense product with ``W + δ`` merged
    beforehand: the base's cost, no delta kept apart) and ``hf`` (the base layer alone, no delta). The fastpeft
    row's note compares the stored delta's bytes with a LoRA of as many parameters."""
    def setup(cfg: BenchConfig) -> Prepared:
        w = _weights(cfg, out_f, in_f)
        g = _generator(cfg, 5)
        mask = torch.rand(out_f, in_f, generator=g, device=cfg.device) < density
        dense = (0.01 * _randn(cfg, g, out_f, in_f) * mask).to(cfg.dtype)
        delta = SparseDelta.from_dense(dense, mask)
        note = ""
        if impl == "fastpeft":
            def forward(x):
                return sparse_delta_linear(x, w.weight, None, delta)
            elsize = w.weight.element_size()
            rank = delta.nnz / (in_f + out_f)  # a LoRA with as many parameters as the delta has entries
            lora_bytes = delta.nnz * elsize
            note = (f"stored delta {delta.nbytes / 2**20:.2f} MiB ({delta.nnz} entries: int32 column + "
                    f"{elsize}-byte value each, int64 row pointers) vs a LoRA of equal parameter count (r = {rank:.1f}) "
                    f"{lora_bytes / 2**20:.2f} MiB: {delta.nbytes / max(lora_bytes, 1):.2f}x")
        elif impl == "reference":
            def forward(x):
                return reference.sparse_delta_linear(x, w.weight, None, dense)
        elif impl == "merged":
            merged = w.weight.clone()
            delta.merge_into(merged)

            def forward(x):
                return F.linear(x, merged)
            note = "W + δ merged beforehand"
        else:
            def forward(x):
                return F.linear(x, w.weight)
            note = "the base layer alone, no delta"
        elsize = w.weight.element_size()
        flops = 2 * m * in_f * out_f + (2 * m * delta.nnz if impl == "fastpeft" else 0)
        bytes_moved = elsize * (out_f * in_f + m * (in_f + out_f)) + (delta.nbytes if impl == "fastpeft" else 0)
        return Prepared(_timed_call(cfg, forward, m, in_f, out_f, "fwd", []), tokens=m, flops=flops,
                        bytes_moved=bytes_moved, note=note)
    return setup


def _lora_config(peft, cfg: BenchConfig, targets: list):
    return peft.LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=targets)


def _single_layer_adapter(cfg: BenchConfig, path: str, lora_a: torch.Tensor, lora_b: torch.Tensor):
    from ..adapters import Adapter

    config = {"peft_type": "LORA", "r": cfg.rank, "lora_alpha": 2 * cfg.rank, "target_modules": [path]}
    return Adapter(config, {f"base_model.model.{path}.lora_A.weight": lora_a,
                            f"base_model.model.{path}.lora_B.weight": lora_b})


def micro_jobs(cfg: BenchConfig) -> list:
    jobs = []
    for out_f, in_f in cfg.micro_features:
        for m in cfg.micro_m:
            shape = {"M": m, "out": out_f, "in": in_f, "r": cfg.rank}
            for op in ("lora", "qlora", "dora"):
                for mode in ("fwd", "fwd_bwd"):
                    for impl in ("fastpeft", "reference", "peft"):
                        jobs.append(Job(f"{op}.{mode}", impl, shape, _micro_lora(op, mode, impl, m, out_f, in_f)))
                        if cfg.dtype != torch.float32:  # the mixed-precision plan: fp32 adapters
                            jobs.append(Job(f"{op}.{mode}.fp32_adapters", impl, shape,
                                            _micro_lora(op, mode, impl, m, out_f, in_f, fp32_adapters=True)))
            for mode in ("fwd", "fwd_bwd"):
                for impl in ("fastpeft", "reference", "peft"):
                    jobs.append(Job(f"ia3.{mode}", impl, shape, _micro_ia3(mode, impl, m, out_f, in_f)))
            for impl in ("fastpeft", "reference", "peft"):
                jobs.append(Job("multi_lora.fwd", impl, {**shape, "adapters": cfg.micro_adapters},
                                _micro_multi_lora(impl, m, out_f, in_f, cfg.micro_adapters)))
                if cfg.dtype != torch.float32:
                    jobs.append(Job("multi_lora.fwd.fp32_adapters", impl, {**shape, "adapters": cfg.micro_adapters},
                                    _micro_multi_lora(impl, m, out_f, in_f, cfg.micro_adapters, fp32_adapters=True)))
            for density in SPARSE_DELTA_DENSITIES:
                for impl in ("fastpeft", "reference", "merged", "hf"):
                    jobs.append(Job("sparse_delta.fwd", impl, {"M": m, "out": out_f, "in": in_f, "density": density},
                                    _micro_sparse_delta(impl, m, out_f, in_f, density)))
        for impl in ("fastpeft", "reference", "bnb"):
            jobs.append(Job("nf4_dequant", impl, {"out": out_f, "in": in_f}, _micro_nf4_dequant(impl, out_f, in_f)))
    return jobs


# ------------------------------------------------------------------------------------------ end to end


def _model(cfg: BenchConfig) -> nn.Module:
    """The model of the end-to-end cases: ``cfg.model_path`` or the built-in random-weight Llama."""
    transformers = _require("transformers")
    if cfg.model_path:
        model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=cfg.dtype)
    else:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                          pad_token_id=0, **cfg.llama)
        with torch.device(cfg.device):  # initialised where it runs: no slow CPU init of a large model
            model = transformers.LlamaForCausalLM(config).to(cfg.dtype)
    return model.to(cfg.device).eval()


def _model_4bit(cfg: BenchConfig, compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The model of the end-to-end cases loaded as bitsandbytes NF4 (double quantisation, compute dtype
    ``compute_dtype``, default ``cfg.dtype``), the way users load QLoRA models: through ``BitsAndBytesConfig``."""
    transformers = _require("transformers")
    _require("bitsandbytes")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=compute_dtype or cfg.dtype)
    load = dict(quantization_config=quantization, dtype=cfg.dtype, device_map={"": cfg.device.type})
    if cfg.model_path:
        return transformers.AutoModelForCausalLM.from_pretrained(cfg.model_path, **load).eval()
    with tempfile.TemporaryDirectory() as path:
        _model(cfg).save_pretrained(path)
        return transformers.AutoModelForCausalLM.from_pretrained(path, **load).eval()


def _token_batches(cfg: BenchConfig, batch: int, length: int, vocab: int) -> list:
    g = torch.Generator().manual_seed(4)
    return [torch.randint(1, vocab, (batch, length), generator=g).to(cfg.device) for _ in range(cfg.rotations)]


def _randomise_adapters(model: nn.Module) -> None:
    """PEFT starts lora_B at zero and DoRA magnitudes and IA3 vectors at the identity; random adapters (around 1
    for magnitudes and IA3 vectors, around 0 for the rest) make the adapter path do real arithmetic. Seeded, so
    models of one architecture get the same values in any dtype."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                centre = 1.0 if "magnitude" in name or "ia3_l" in name else 0.0
                p.copy_(centre + 0.02 * torch.randn(p.shape, generator=g))


def _train_step(impl: str, four_bit: bool = False, compute_dtype: Optional[torch.dtype] = None
                ) -> Callable[[BenchConfig], Prepared]:
    def setup(cfg: BenchConfig) -> Prepared:
        peft = _require("peft")
        base = _model_4bit(cfg, compute_dtype) if four_bit else _model(cfg)
        model = peft.get_peft_model(base, _lora_config(peft, cfg, _LLAMA_TARGETS))
        _randomise_adapters(model)
        note = _accelerate(model, cfg) if impl == "fastpeft" else ""
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        batches = _token_batches(cfg, cfg.train_batch, cfg.seq_len, model.config.vocab_size)

        def run(i):
            ids = batches[i % len(batches)]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return Prepared(run, tokens=cfg.train_batch * cfg.seq_len, note=note)
    return setup


def _accelerate(model: nn.Module, cfg: BenchConfig) -> str:
    """Switch a PEFT model's adapted layers to fastpeft's ops in place (``fastpeft.accelerate``); the note."""
    summary = accelerate(model)
    return f"PEFT + fastpeft.accelerate ({len(summary.replaced)} layers)"


def _decode(impl: str, four_bit: bool = False, compute_dtype: Optional[torch.dtype] = None
            ) -> Callable[[BenchConfig], Prepared]:
    def setup(cfg: BenchConfig) -> Prepared:
        model = _model_4bit(cfg, compute_dtype) if four_bit else _model(cfg)
        vocab = model.config.vocab_size
        note = ""
        generate = model.generate
        kwargs = {}
        if impl in ("peft", "fastpeft"):
            peft = _require("peft")
            model = peft.get_peft_model(model, _lora_config(peft, cfg, _LLAMA_TARGETS)).eval()
            _randomise_adapters(model)
            if impl == "fastpeft":
                note = _accelerate(model, cfg)
            generate = model.generate
        elif impl == "fastpeft-serving":
            model = MultiLoraModel(model, {"a0": _model_adapter(cfg, model, seed=0)})
            generate, kwargs = model.generate, {"adapter_names": ["a0"]}
            note = "fastpeft.MultiLoraModel, one adapter"
        prompts = _token_batches(cfg, 1, cfg.decode_prompt, vocab)
        n = cfg.decode_tokens

        def run(i):
            with torch.no_grad():
                return generate(input_ids=prompts[i % len(prompts)], max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0, **kwargs)
        return Prepared(run, tokens=n, note=note)
    return setup


def _linear_paths(model: nn.Module) -> dict:
    return {path: module for path, module in model.named_modules()
            if isinstance(module, nn.Linear) and path.rpartition(".")[2] in _LLAMA_TARGETS}


def _model_adapter(cfg: BenchConfig, model: nn.Module, seed: int):
    """A random LoRA adapter (PEFT's format, in memory) on every attention and MLP projection."""
    from ..adapters import Adapter

    g = _generator(cfg, 100 + seed)
    tensors = {}
    for path, module in _linear_paths(model).items():
        a = _randn(cfg, g, cfg.rank, module.in_features) / math.sqrt(module.in_features)
        b = 0.02 * _randn(cfg, g, module.out_features, cfg.rank)
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.to(cfg.dtype)
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.to(cfg.dtype)
    config = {"peft_type": "LORA", "r": cfg.rank, "lora_alpha": 2 * cfg.rank, "target_modules": _LLAMA_TARGETS}
    return Adapter(config, tensors)


def _peft_multi_adapter(cfg: BenchConfig, model: nn.Module, adapters: list) -> nn.Module:
    """A PEFT model holding ``adapters`` as ``a0``, ``a1``, ... (eval mode: PEFT's mixed batches need it)."""
    peft = _require("peft")
    model = peft.get_peft_model(model, _lora_config(peft, cfg, _LLAMA_TARGETS), "a0")
    for k in range(1, len(adapters)):
        model.add_adapter(f"a{k}", _lora_config(peft, cfg, _LLAMA_TARGETS))
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, adapter in enumerate(adapters):
            for key, tensor in adapter.tensors.items():
                # PEFT's in-memory names carry the adapter: ...lora_A.a3.weight
                module, kind, _ = key.rsplit(".", 2)
                params[f"{module}.{kind}.a{k}.weight"].copy_(tensor)
    return model.eval()


def _serving(impl: str, n_adapters: int) -> Callable[[BenchConfig], Prepared]:
    """Prefill throughput of a mixed batch: ``serving_seqs`` sequences, each with one of ``n_adapters``."""
    def setup(cfg: BenchConfig) -> Prepared:
        model = _model(cfg)
        vocab = model.config.vocab_size
        adapters = [_model_adapter(cfg, model, seed=k) for k in range(n_adapters)]
        rng = random.Random(6)
        names = [f"a{rng.randrange(n_adapters)}" for _ in range(cfg.serving_seqs)]
        note = ""
        if impl == "peft":
            model = _peft_multi_adapter(cfg, model, adapters)

            def forward(ids):
                return model(input_ids=ids, adapter_names=names)
            note = "peft mixed batch (adapter_names)"
        else:
            model = MultiLoraModel(model, {f"a{k}": adapter for k, adapter in enumerate(adapters)})
            batch = model.batch(names)

            def forward(ids):
                return model(input_ids=ids, batch=batch)
        batches = _token_batches(cfg, cfg.serving_seqs, cfg.seq_len, vocab)

        def run(i):
            with torch.no_grad():
                return forward(batches[i % len(batches)])
        return Prepared(run, tokens=cfg.serving_seqs * cfg.seq_len, note=note)
    return setup


def _serving_decode(impl: str, n_adapters: int) -> Callable[[BenchConfig], Prepared]:
    """Greedy decode of a ``serving_seqs``-row batch, row ``b`` with adapter ``a{b % n_adapters}`` (every adapter
    used when ``n_adapters <= serving_seqs``): ``MultiLoraModel`` against PEFT's ``adapter_names`` generate."""
    def setup(cfg: BenchConfig) -> Prepared:
        model = _model(cfg)
        vocab = model.config.vocab_size
        adapters = [_model_adapter(cfg, model, seed=k) for k in range(n_adapters)]
        names = [f"a{b % n_adapters}" for b in range(cfg.serving_seqs)]
        if impl == "peft":
            model = _peft_multi_adapter(cfg, model, adapters)
            note = "peft generate(adapter_names=...)"
        else:
            model = MultiLoraModel(model, {f"a{k}": adapter for k, adapter in enumerate(adapters)})
            note = "fastpeft.MultiLoraModel"
        prompts = _token_batches(cfg, cfg.serving_seqs, cfg.decode_prompt, vocab)
        n = cfg.decode_tokens

        def run(i):
            with torch.no_grad():
                return model.generate(input_ids=prompts[i % len(prompts)], adapter_names=names, max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)
        return Prepared(run, tokens=n * cfg.serving_seqs, note=note)
    return setup


def _multi_adapter_train(impl: str, n_adapters: int, four_bit: bool = False) -> Callable[[BenchConfig], Prepared]:
    """One training step of ``n_adapters`` LoRA adapters, ``rows_per_adapter`` rows each: fastpeft's one mixed batch
    (``train_adapters``, ``adapter_names=``) against PEFT's ``n_adapters`` steps one after the other, each with its
    adapter set active (``set_adapter``) on its own rows; one AdamW over every adapter either way."""
    def setup(cfg: BenchConfig) -> Prepared:
        peft = _require("peft")
        base = _model_4bit(cfg) if four_bit else _model(cfg)
        names = [f"a{k}" for k in range(n_adapters)]
        model = peft.get_peft_model(base, _lora_config(peft, cfg, _LLAMA_TARGETS), names[0])
        for name in names[1:]:
            model.add_adapter(name, _lora_config(peft, cfg, _LLAMA_TARGETS))
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)  # every adapter random (_randomise_adapters sets trainable ones)
        _randomise_adapters(model)
        model.train()
        rows = cfg.rows_per_adapter
        row_names = [name for name in names for _ in range(rows)]
        batches = _token_batches(cfg, rows * n_adapters, cfg.seq_len, model.config.vocab_size)
        if impl == "fastpeft":
            optimizer = torch.optim.AdamW(train_adapters(model, names, lr=1e-4))
            note = f"fastpeft.train_adapters, one batch of {n_adapters} adapters"

            def run(i):
                ids = batches[i % len(batches)]
                model(input_ids=ids, labels=ids, adapter_names=row_names).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        else:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            note = f"peft, {n_adapters} steps (set_adapter) of {rows} rows"

            def run(i):
                ids = batches[i % len(batches)]
                for k, name in enumerate(names):
                    model.set_adapter(name)
                    part = ids[k * rows:(k + 1) * rows]
                    model(input_ids=part, labels=part).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        return Prepared(run, tokens=rows * n_adapters * cfg.seq_len, note=note)
    return setup


def e2e_jobs(cfg: BenchConfig) -> list:
    model = {"model": cfg.model_path or "built-in tiny Llama", "dtype": str(cfg.dtype).replace("torch.", "")}
    jobs = [Job("train_step", impl, {**model, "batch": cfg.train_batch, "seq": cfg.seq_len, "r": cfg.rank},
                _train_step(impl)) for impl in ("peft", "fastpeft")]
    jobs += [Job("decode", impl, {**model, "prompt": cfg.decode_prompt, "new_tokens": cfg.decode_tokens, "r": cfg.rank},
                 _decode(impl)) for impl in ("hf", "peft", "fastpeft", "fastpeft-serving")]
    nf4 = {**model, "base": "nf4"}  # QLoRA: the same model loaded in 4 bits; PEFT's layers call bitsandbytes
    jobs += [Job("train_step_4bit", impl, {**nf4, "batch": cfg.train_batch, "seq": cfg.seq_len, "r": cfg.rank},
                 _train_step(impl, four_bit=True)) for impl in ("peft", "fastpeft")]
    jobs += [Job("decode_4bit", impl, {**nf4, "prompt": cfg.decode_prompt, "new_tokens": cfg.decode_tokens,
                                       "r": cfg.rank}, _decode(impl, four_bit=True)) for impl in ("hf", "peft", "fastpeft")]
    if cfg.dtype == torch.float32:
        # an fp32 model with bnb_4bit_compute_dtype=bfloat16: bitsandbytes multiplies in bf16, so the adapted
        # layers run PEFT's forward (their 4-bit bases and the frozen ones on fastpeft's NF4 op)
        bf16 = {**nf4, "compute": "bfloat16"}
        jobs += [Job("train_step_4bit", impl, {**bf16, "batch": cfg.train_batch, "seq": cfg.seq_len, "r": cfg.rank},
                     _train_step(impl, True, torch.bfloat16)) for impl in ("peft", "fastpeft")]
        jobs += [Job("decode_4bit", impl, {**bf16, "prompt": cfg.decode_prompt, "new_tokens": cfg.decode_tokens,
                                           "r": cfg.rank}, _decode(impl, True, torch.bfloat16))
                 for impl in ("peft", "fastpeft")]
    for n in cfg.serving_adapters:
        jobs += [Job("multi_lora_decode", impl, {**model, "adapters": n, "seqs": cfg.serving_seqs,
                                                 "prompt": cfg.decode_prompt, "new_tokens": cfg.decode_tokens,
                                                 "r": cfg.rank}, _serving_decode(impl, n))
                 for impl in ("peft", "fastpeft-serving")]
    for case, four_bit, params in (("multi_adapter_train", False, model), ("multi_adapter_train_4bit", True, nf4)):
        for n in cfg.train_adapters:
            jobs += [Job(case, impl, {**params, "adapters": n, "rows": cfg.rows_per_adapter, "seq": cfg.seq_len,
                                      "r": cfg.rank}, _multi_adapter_train(impl, n, four_bit))
                     for impl in ("peft", "fastpeft")]
    for n in cfg.serving_adapters:
        jobs += [Job("multi_lora_serving", impl, {**model, "adapters": n, "seqs": cfg.serving_seqs, "seq": cfg.seq_len,
                                                  "r": cfg.rank}, _serving(impl, n)) for impl in ("peft", "fastpeft")]
    return jobs


def all_jobs(cfg: BenchConfig) -> list:
    jobs = micro_jobs(cfg) + e2e_jobs(cfg)
    if cfg.cases:
        jobs = [j for j in jobs if any(pattern in j.case for pattern in cfg.cases)]
    return jobs
