"""State that outlives a call, called in every order: the reusable dequantisation buffers of ``fastpeft.nf4``
(the CPU DoRA norm and the NF4 ops write into them), the Triton DoRA norm's cached ``‖W‖²``, the cached NF4 view
of a bitsandbytes layer and ``IA3Linear``'s plain-path cache. Each layer is called in each mode first
(``torch.inference_mode``, ``torch.no_grad``, training, bf16 autocast training, training in another thread),
then in every other mode; every call must give, bit for bit, what the same call gives on fresh state. Two
threads calling one layer at once must each get what a lone call gets."""

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

import fastpeft
from fastpeft import nf4 as nf4_module
from fastpeft.ops import dora as dora_ops

from conftest import Holder, bnb_linear4bit

peft = pytest.importorskip("peft")

MODES = ("inference_mode", "no_grad", "training", "autocast", "thread")


def _peft_layer(config, base):
    torch.manual_seed(3)
    model = peft.get_peft_model(Holder(base), config)
    with torch.no_grad():  # every adapter tensor away from its identity initialisation
        for param in model.parameters():
            if param.requires_grad:
                param.mul_(1.1).add_(0.05)
    fastpeft.accelerate(model)
    return model.base_model.model.proj


def _lora(**kwargs):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False, **kwargs)


def _nf4_base():
    torch.manual_seed(2)
    return bnb_linear4bit(64, 40, with_bias=True)


def _dense_base():
    torch.manual_seed(2)
    return nn.Linear(64, 40)


LAYERS = {
    "dora-dense": lambda: _peft_layer(_lora(use_dora=True), _dense_base()),
    "dora-nf4": lambda: _peft_layer(_lora(use_dora=True), _nf4_base()),
    "lora-nf4": lambda: _peft_layer(_lora(), _nf4_base()),
    "ia3-dense": lambda: fastpeft.IA3Linear(_dense_base(), init_ia3_weights=False),
}


def _call(layer, x, mode):
    """``(output, *gradients of the trainable parameters)`` of one call in ``mode`` (no gradients where the mode
    records none)."""
    if mode == "thread":
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(_call, layer, x, "training").result()
    grad = mode in ("training", "autocast")
    context = {"inference_mode": torch.inference_mode(), "no_grad": torch.no_grad(),
               "autocast": torch.autocast("cpu", dtype=torch.bfloat16)}.get(mode, contextlib.nullcontext())
    with context:
        y = layer(x)
    if not grad:
        return (y.clone(),)  # an inference tensor cloned outside inference mode is a normal one
    params = [p for p in layer.parameters() if p.requires_grad]
    return (y.detach(), *torch.autograd.grad(y.float().square().sum(), params))


def _fresh_state(monkeypatch):
    monkeypatch.setattr(nf4_module, "_thread_buffers", threading.local(), raising=False)
    monkeypatch.setattr(dora_ops, "_weight_sq_norms", WeakTensorKeyDictionary())


def _assert_same(got, expected, what):
    assert len(got) == len(expected), what
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and torch.equal(g, e), what


def _check_every_order(make_layer, x, monkeypatch, modes=MODES):
    fresh = {}
    for mode in modes:
        _fresh_state(monkeypatch)
        fresh[mode] = _call(make_layer(), x, mode)
    for first in modes:
        _fresh_state(monkeypatch)
        layer = make_layer()
        for mode in (first, *[m for m in modes if m != first]):
            _assert_same(_call(layer, x, mode), fresh[mode], f"{mode} after {first} first")


@pytest.mark.parametrize("kind", list(LAYERS))
def test_layers_in_every_order(kind, monkeypatch):
    if "nf4" in kind:
        pytest.importorskip("bitsandbytes")
    _check_every_order(LAYERS[kind], torch.randn(3, 5, 64), monkeypatch)


def test_triton_dora_norm_in_every_order(triton_backend, monkeypatch):
    # the cached ‖W‖² of the Triton norm and the buffer its NF4 base is dequantised into (interpreter on CPU)
    pytest.importorskip("bitsandbytes")
    _check_every_order(LAYERS["dora-nf4"], torch.randn(2, 64), monkeypatch, ("inference_mode", "training", "thread"))


@pytest.mark.parametrize("kind", ["dora-dense", "dora-nf4", "lora-nf4"])
def test_two_threads_at_once(kind, monkeypatch):
    if "nf4" in kind:
        pytest.importorskip("bitsandbytes")
    _fresh_state(monkeypatch)
    layer = LAYERS[kind]()
    inputs = [torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)) for seed in range(8)]
    alone = [_call(layer, x, "training") for x in inputs]
    start = threading.Barrier(2)

    def worker(offset):
        start.wait()
        return [_call(layer, inputs[i], "training") for i in range(offset, len(inputs), 2) for _ in range(3)]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(worker, (0, 1)))
    for offset, got in enumerate(results):
        for k, result in enumerate(got):
            _assert_same(result, alone[offset + 2 * (k // 3)], f"thread {offset}, call {k}")
