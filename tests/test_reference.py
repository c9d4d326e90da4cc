"""fastpeft.reference against Hugging Face PEFT's own layers (peft 0.21), forward and gradients, fp32 CPU.

Each PEFT layer gets random non-zero adapter weights (PEFT initialises lora_B to zero and IA3 to one,
which would make a comparison vacuous). Dropout is replaced by a fixed mask so both sides drop the same
elements: that checks *where* PEFT applies dropout (DoRA recomputes the base on the dropped input).
"""

import threading

import numpy as np
import pytest
import torch
from torch import nn

from fastpeft import reference
from fastpeft.nf4 import NF4Weight

from conftest import assert_rel_close

peft = pytest.importorskip("peft")

IN, OUT = 64, 48


class FixedMaskDropout(nn.Module):
    """Inverted dropout with a fixed mask (scales kept elements by 1/(1-p) like nn.Dropout)."""

    def __init__(self, mask: torch.Tensor, p: float):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask / (1 - self.p)


class OneLinear(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.proj = nn.Linear(IN, OUT, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _randomise(layer):
    """Random values in every adapter parameter of a PEFT layer."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.requires_grad:
                if "ia3" in name:
                    p.copy_(1 + 0.5 * torch.randn_like(p))
                elif "magnitude" in name:
                    p.copy_(p * (1 + 0.3 * torch.rand_like(p)))
                else:
                    p.normal_(0, 0.2)


def _peft_layer(config, bias=True):
    model = peft.get_peft_model(OneLinear(bias), config)
    layer = model.base_model.model.proj
    _randomise(layer)
    return layer


def _peft_4bit_layer(tiny_llama_4bit, config):
    model = peft.get_peft_model(tiny_llama_4bit, config)
    layer = model.base_model.model.model.layers[0].mlp.down_proj  # Linear4bit, in 128, out 64
    _randomise(layer)
    return layer


def _grads(out, tensors, seed=1):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(out.shape, generator=g)
    return torch.autograd.grad(out, tensors, dy)


def _compare(peft_out, ref_out, peft_params, ref_params):
    assert_rel_close(ref_out, peft_out, torch.float32)
    for g_ref, g_peft in zip(_grads(ref_out, ref_params), _grads(peft_out, peft_params)):
        assert_rel_close(g_ref, g_peft, torch.float32)


def _lora_tensors(layer):
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return a, b, layer.scaling["default"]


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_matches_peft_linear(dropout, use_rslora, bias):
    layer = _peft_layer(
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=dropout, use_rslora=use_rslora),
        bias,
    )
    x = torch.randn(3, 5, IN, requires_grad=True)
    x_dropped = None
    if dropout:
        mask = (torch.rand(x.shape) > dropout).float()
        layer.lora_dropout["default"] = FixedMaskDropout(mask, dropout)
        x_dropped = x * mask / (1 - dropout)
    a, b, s = _lora_tensors(layer)
    assert s == (8 / 4**0.5 if use_rslora else 8 / 4)
    base = layer.base_layer
    ref = reference.lora_linear(x, base.weight, base.bias, a, b, s, x_dropped=x_dropped)
    _compare(layer(x), ref, (x, a, b), (x, a, b))


def test_lora_matches_peft_linear4bit(tiny_llama_4bit):
    layer = _peft_4bit_layer(tiny_llama_4bit, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["down_proj"]))
    x = torch.randn(2, 7, 128, requires_grad=True)
    a, b, s = _lora_tensors(layer)
    weight = NF4Weight.from_bnb(layer.base_layer)
    ref = reference.lora_linear(x, weight, layer.base_layer.bias, a, b, s)
    _compare(layer(x), ref, (x, a, b), (x, a, b))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_dora_matches_peft_linear(dropout, bias):
    layer = _peft_layer(
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=dropout, use_dora=True), bias
    )
    x = torch.randn(4, IN, requires_grad=True)
    x_dropped = None
    if dropout:
        mask = (torch.rand(x.shape) > dropout).float()
        layer.lora_dropout["default"] = FixedMaskDropout(mask, dropout)
        x_dropped = x * mask / (1 - dropout)
    a, b, s = _lora_tensors(layer)
    m = layer.lora_magnitude_vector["default"].weight
    base = layer.base_layer
    ref = reference.dora_linear(x, base.weight, base.bias, a, b, s, m, x_dropped=x_dropped)
    _compare(layer(x), ref, (x, a, b, m), (x, a, b, m))


def test_dora_matches_peft_linear4bit(tiny_llama_4bit):
    layer = _peft_4bit_layer(
        tiny_llama_4bit, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["down_proj"], use_dora=True)
    )
    x = torch.randn(6, 128, requires_grad=True)
    a, b, s = _lora_tensors(layer)
    m = layer.lora_magnitude_vector["default"].weight
    ref = reference.dora_linear(x, NF4Weight.from_bnb(layer.base_layer), layer.base_layer.bias, a, b, s, m)
    _compare(layer(x), ref, (x, a, b, m), (x, a, b, m))


def test_dora_norm_is_detached_and_matches_peft_init():
    # PEFT initialises the magnitude to the weight norm: with B = 0 it is ‖W‖ per output row
    model = peft.get_peft_model(OneLinear(), peft.LoraConfig(r=4, target_modules=["proj"], use_dora=True))
    layer = model.base_model.model.proj
    a, b, s = _lora_tensors(layer)
    norm = reference.dora_weight_norm(layer.base_layer.weight, a, b, s)
    assert not norm.requires_grad
    assert_rel_close(norm, layer.lora_magnitude_vector["default"].weight.detach(), torch.float32)


@pytest.mark.parametrize("feedforward", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_ia3_matches_peft_linear(feedforward, bias):
    config = peft.IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if feedforward else [])
    layer = _peft_layer(config, bias)
    x = torch.randn(2, 3, IN, requires_grad=True)
    scale = layer.ia3_l["default"]
    assert scale.shape == ((1, IN) if feedforward else (OUT, 1))
    base = layer.base_layer
    ref = reference.ia3_linear(x, base.weight, base.bias, scale.view(-1), is_feedforward=feedforward)
    _compare(layer(x), ref, (x, scale), (x, scale))


@pytest.mark.parametrize("feedforward", [True, False])
def test_ia3_matches_peft_linear4bit(tiny_llama_4bit, feedforward):
    config = peft.IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"] if feedforward else [])
    layer = _peft_4bit_layer(tiny_llama_4bit, config)
    x = torch.randn(5, 128, requires_grad=True)
    scale = layer.ia3_l["default"]
    weight = NF4Weight.from_bnb(layer.base_layer)
    ref = reference.ia3_linear(x, weight, layer.base_layer.bias, scale.view(-1), is_feedforward=feedforward)
    _compare(layer(x), ref, (x, scale), (x, scale))


def test_multi_lora_matches_peft_mixed_batch():
    model = peft.get_peft_model(OneLinear(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]), "a")
    model.add_adapter("b", peft.LoraConfig(r=7, lora_alpha=3, target_modules=["proj"]))
    layer = model.base_model.model.proj
    _randomise(layer)
    names = ["a", "__base__", "b", "a", "b"]
    x = torch.randn(len(names), 3, IN)
    expected = layer(x, adapter_names=names)
    ids = torch.tensor([{"a": 0, "b": 1, "__base__": -1}[n] for n in names]).unsqueeze(1).expand(-1, 3)
    lora_as = [layer.lora_A[k].weight for k in ("a", "b")]
    lora_bs = [layer.lora_B[k].weight for k in ("a", "b")]
    scalings = [layer.scaling[k] for k in ("a", "b")]
    base = layer.base_layer
    out = reference.multi_lora_linear(x, base.weight, base.bias, lora_as, lora_bs, scalings, ids)
    assert_rel_close(out, expected, torch.float32)


def test_multi_lora_rejects_out_of_range_ids():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    a, b = [torch.randn(2, 8)], [torch.randn(4, 2)]
    with pytest.raises(ValueError, match=r"adapter ids must be in \[-1, 0\], got range \[-1, 1\]"):
        reference.multi_lora_linear(x, w, None, a, b, [1.0], torch.tensor([-1, 1]))
    with pytest.raises(ValueError, match="adapter_ids shape"):
        reference.multi_lora_linear(x, w, None, a, b, [1.0], torch.tensor([0]))



def test_multi_lora_delta_weighted_slots_out_and_gradients():
    d = dict(dtype=torch.float64)
    x = torch.randn(2, 3, 6, **d, requires_grad=True)
    a = [torch.randn(r, 6, **d, requires_grad=True) for r in (2, 3, 1)]
    b = [torch.randn(5, r, **d, requires_grad=True) for r in (2, 3, 1)]
    ids = torch.tensor([[[0, 2], [1, -1], [-1, -1]], [[2, 2], [0, 1], [1, 0]]])
    weights = torch.rand(ids.shape, **d)
    scalings = [0.5, 2.0, 1.5]
    delta = reference.multi_lora_delta(x, a, b, scalings, ids, weights)
    expected = torch.zeros(2, 3, 5, **d)
    for t in np.ndindex(2, 3):
        for k, w in zip(ids[t].tolist(), weights[t].tolist()):
            if k >= 0:
                expected[t] += w * scalings[k] * (b[k] @ (a[k] @ x[t]))
    torch.testing.assert_close(delta, expected)
    y = torch.randn(6, 5, **d)
    got = reference.multi_lora_delta(x.detach().reshape(6, 6), a, b, scalings, ids.reshape(6, 2),
                                     weights.reshape(6, 2), out=y.clone())
    torch.testing.assert_close(got, y + expected.reshape(6, 5))
    with pytest.raises(ValueError, match=r"out needs a 2-D x \(M, in\) and is \(M, 5\); got x \(2, 3, 6\), out \(6, 5\)"):
        reference.multi_lora_delta(x, a, b, scalings, ids, weights, out=y)
    torch.autograd.gradcheck(lambda x, *ab: reference.multi_lora_delta(x, ab[:3], ab[3:], scalings, ids, weights),
                             (x, *a, *b))

def test_reference_gradcheck_float64():
    torch.manual_seed(0)
    d = dict(dtype=torch.float64)
    x = torch.randn(3, 6, **d, requires_grad=True)
    w, bias = torch.randn(5, 6, **d), torch.randn(5, **d)
    a = torch.randn(2, 6, **d, requires_grad=True)
    b = torch.randn(5, 2, **d, requires_grad=True)
    m = torch.rand(5, **d, requires_grad=True)
    l_in = torch.rand(6, **d, requires_grad=True)
    torch.autograd.gradcheck(lambda x, a, b: reference.lora_linear(x, w, bias, a, b, 0.7), (x, a, b))
    # DoRA's norm is detached by design, so its numerical derivative in A and B differs from the analytic
    # one; A and B gradients are checked against PEFT above. In x and m the norm is a constant.
    a_, b_ = a.detach(), b.detach()
    torch.autograd.gradcheck(lambda x, m: reference.dora_linear(x, w, bias, a_, b_, 0.7, m), (x, m))
    torch.autograd.gradcheck(lambda x, l: reference.ia3_linear(x, w, bias, l, True), (x, l_in))


@pytest.mark.parametrize("native", [True, False], ids=["ctypes", "torch-ops"])
@pytest.mark.parametrize("nested", [False, True])
def test_nf4_base_weight_on_cpu_is_bitwise_the_reference_dequantisation(nested, native, monkeypatch):
    """base_weight hands CPU NF4 to bitsandbytes' C++ dequantiser only where it is exact: blocks inside rows;
    called through ctypes, or through bitsandbytes' ops where its library lacks a function (the same values)."""
    bnb = pytest.importorskip("bitsandbytes")
    assert reference._bnb_cpu_function("cdequantize_blockwise_cpu_fp32") is not None
    assert reference._bnb_cpu_function("no_such_function") is None  # not bitsandbytes' raising stub
    if not native:
        monkeypatch.setattr(reference, "_bnb_cpu_function", lambda name: None)
    for (out_f, in_f), blocksize in [((33, 256), 64), ((7, 128), 128), ((5, 96), 64), ((3, 64), 256)]:
        packed = bnb.nn.Params4bit(torch.randn(out_f, in_f), requires_grad=False, quant_type="nf4",
                                   blocksize=blocksize, compress_statistics=nested).to("cpu")
        weight = NF4Weight.from_bnb(packed)
        fast = reference._bnb_cpu_dequantizes(weight, torch.float32)
        assert fast == (in_f % blocksize == 0)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            assert torch.equal(reference.base_weight(weight, dtype), weight.dequantize(dtype))
            assert torch.equal(reference.base_weight(weight, dtype, scratch=True), weight.dequantize(dtype))


@pytest.mark.parametrize("base", ["dense", "dense-bf16", "nf4"])
def test_dora_weight_norm_in_the_reusable_buffer(base, monkeypatch):
    """The CPU path's norm (``scratch=True``): ``W + s·B A`` formed by one ``addmm`` in the thread's reusable
    buffer, the caller's weight untouched, within fp32 rounding of float64; half precision keeps PEFT's
    arithmetic (the same values as without ``scratch``)."""
    from fastpeft import nf4 as nf4_module

    monkeypatch.setattr(nf4_module, "_thread_buffers", threading.local())
    dense = torch.randn(37, 64)
    weight = {"dense": dense, "dense-bf16": dense.bfloat16(), "nf4": NF4Weight.quantize(dense, 64, True)}[base]
    before = weight.clone() if isinstance(weight, torch.Tensor) else weight.packed.clone()
    lora_a, lora_b = torch.randn(5, 64) / 8, torch.randn(37, 5)
    w64 = weight.dequantize(torch.float64) if base == "nf4" else weight.double()
    exact = reference.dora_weight_norm(w64, lora_a.double(), lora_b.double(), 0.37)
    norm = reference.dora_weight_norm(weight, lora_a, lora_b, 0.37, dtype=torch.float32, scratch=True)
    assert norm.dtype == torch.float32
    assert_rel_close(norm, exact, torch.float32)
    assert torch.equal(weight if isinstance(weight, torch.Tensor) else weight.packed, before)
    (buffer,) = nf4_module.dequant_buffers(torch.device("cpu")).values()  # the sum was formed there
    assert torch.equal(torch.linalg.vector_norm(buffer.view(37, 64), dim=1), norm)
    half = reference.dora_weight_norm(weight, lora_a, lora_b, 0.37, dtype=torch.bfloat16, scratch=True)
    assert torch.equal(half, reference.dora_weight_norm(weight, lora_a, lora_b, 0.37, dtype=torch.bfloat16))
