"""fastpeft.nn.IA3Linear against PEFT's own IA3 layers (ia3.Linear / ia3.Linear4bit, is_feedforward both
ways) on identical weights (fp32 CPU, outputs and gradients of x and the IA3 vector), plus merge/unmerge
against PEFT's, disable_adapter, and loading a PEFT IA3 adapter file."""

import copy

import pytest
import torch
from torch import nn

from fastpeft import load_adapter
from fastpeft.nf4 import NF4Weight
from fastpeft.nn import IA3Linear

from conftest import (DEVICE, Holder, assert_rel_close, bnb_linear4bit, layer_grads, make_tiny_llama, non_contiguous,
                      save_peft_adapter)

peft = pytest.importorskip("peft")


def _pair(nf4, with_bias, is_feedforward):
    """A PEFT IA3 layer (random vector) and an IA3Linear built independently with a copy of it."""
    base = bnb_linear4bit(128, 40, with_bias) if nf4 else nn.Linear(64, 40, bias=with_bias)
    ours = IA3Linear(copy.deepcopy(base), is_feedforward=is_feedforward, init_ia3_weights=False)
    config = peft.IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if is_feedforward else [],
                            init_ia3_weights=False)
    theirs = peft.get_peft_model(Holder(base), config).base_model.model.proj
    assert theirs.is_feedforward == is_feedforward
    assert ours.ia3_l.shape == theirs.ia3_l["default"].shape
    with torch.no_grad():
        ours.ia3_l.copy_(theirs.ia3_l["default"])
    return theirs, ours


def _assert_same_outputs_and_grads(theirs, ours, x, dy):
    """Outputs, dx and d ia3_l of PEFT's layer and ours, fp32 rounding apart."""
    y_ref, *ref = layer_grads(theirs, x, dy, [theirs.ia3_l["default"]])
    y, *got = layer_grads(ours, x, dy, [ours.ia3_l])
    assert_rel_close(y, y_ref, torch.float32)
    for g, g_ref in zip(got, ref):
        assert_rel_close(g, g_ref, torch.float32)


@pytest.mark.parametrize("is_feedforward", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_matches_peft(nf4, with_bias, is_feedforward):
    theirs, ours = _pair(nf4, with_bias, is_feedforward)
    x = non_contiguous(torch.randn(2, 5, ours.in_features, device=DEVICE))
    dy = torch.randn(2, 5, 40)
    _assert_same_outputs_and_grads(theirs, ours, x, dy)


@pytest.mark.parametrize("is_feedforward", [False, True])
def test_merge_matches_peft_and_unmerges(is_feedforward):
    theirs, ours = _pair(nf4=False, with_bias=True, is_feedforward=is_feedforward)
    x = torch.randn(6, 64)
    with torch.no_grad():
        y = ours(x)
        weight, bias = ours.base_layer.weight.clone(), ours.base_layer.bias.clone()
        ours.merge()
        theirs.merge()
        assert_rel_close(ours.base_layer.weight, theirs.base_layer.weight, torch.float32)
        assert_rel_close(ours.base_layer.bias, theirs.base_layer.bias, torch.float32)
        assert_rel_close(ours(x), y, torch.float32)
        with ours.disable_adapter():
            assert not ours.merged
            assert_rel_close(ours(x), ours.base_layer(x), torch.float32)
        assert ours.merged
        ours.unmerge()
        assert_rel_close(ours.base_layer.weight, weight, torch.float32)
        assert_rel_close(ours.base_layer.bias, bias, torch.float32)
        assert_rel_close(ours(x), y, torch.float32)


def test_nf4_weight_base_and_no_nf4_merge():
    dense = torch.randn(40, 128)
    layer = IA3Linear(NF4Weight.quantize(dense, 64, double_quant=True), bias=torch.randn(40))
    assert layer.ia3_l.shape == (40, 1) and torch.equal(layer.ia3_l, torch.ones(40, 1))
    x = torch.randn(3, 128)
    with torch.no_grad():
        expected = x @ layer.base_weight().dequantize(torch.float32).t() + layer.bias
        assert_rel_close(layer(x), expected, torch.float32)
    with pytest.raises(ValueError, match="merges only into a dense base"):
        layer.merge()


def test_from_peft_adapter_file(tmp_path):
    config = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    path = save_peft_adapter(tmp_path, config)
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), path).eval()
    adapters = load_adapter(path).modules()
    base = make_tiny_llama()
    for name, feedforward in (("model.layers.0.self_attn.k_proj", False), ("model.layers.1.mlp.down_proj", True)):
        ours = IA3Linear.from_adapter(base.get_submodule(name), adapters[name])
        assert ours.is_feedforward == feedforward
        x = torch.randn(3, ours.in_features)
        with torch.no_grad():
            assert_rel_close(ours(x), theirs.base_model.model.get_submodule(name)(x), torch.float32)


def test_errors():
    with pytest.raises(TypeError, match="base_layer must be torch.nn.Linear"):
        IA3Linear(nn.Conv1d(3, 4, 1))
    with pytest.raises(ValueError, match="bias= is only for an NF4Weight base"):
        IA3Linear(nn.Linear(3, 4), bias=torch.ones(4))


@pytest.mark.parametrize("is_feedforward", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_reference_ia3_linear_is_peft(nf4, is_feedforward):
    """fastpeft.reference.ia3_linear, the oracle of the kernel tests, on PEFT's own tensors."""
    from fastpeft import reference

    theirs, ours = _pair(nf4, True, is_feedforward)
    x = torch.randn(4, ours.in_features)
    with torch.no_grad():
        ref = reference.ia3_linear(x, ours.base_weight(), ours.bias, theirs.ia3_l["default"].view(-1), is_feedforward)
        assert_rel_close(ref, theirs(x), torch.float32)


@pytest.mark.parametrize("is_feedforward", [False, True])
def test_matches_peft_on_triton_kernels(triton_backend, is_feedforward):
    """The NF4 layer end to end on the Triton kernels (interpreter on CPU)."""
    theirs, ours = _pair(True, True, is_feedforward)
    x, dy = torch.randn(19, 128), torch.randn(19, 40)
    _assert_same_outputs_and_grads(theirs, ours, x, dy)


@pytest.mark.parametrize("is_feedforward", [False, True])
def test_fp16_base_matches_peft(is_feedforward):
    """An fp16 base: PEFT keeps ia3_l in fp32 (autocast_adapter_dtype), and so does IA3Linear."""
    base = nn.Linear(64, 40).half()
    ours = IA3Linear(copy.deepcopy(base), is_feedforward, init_ia3_weights=False)
    config = peft.IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if is_feedforward else [],
                            init_ia3_weights=False)
    theirs = peft.get_peft_model(Holder(base), config).base_model.model.proj
    assert ours.ia3_l.dtype == theirs.ia3_l["default"].dtype == torch.float32
    with torch.no_grad():
        ours.ia3_l.copy_(theirs.ia3_l["default"])
    x, dy = torch.randn(5, 64, dtype=torch.float16), torch.randn(5, 40, dtype=torch.float16)
    y_ref, *ref = layer_grads(theirs, x, dy, [theirs.ia3_l["default"]])
    y, *got = layer_grads(ours, x, dy, [ours.ia3_l])
    assert y.dtype == torch.float16
    assert_rel_close(y, y_ref, torch.float16)
    for g, g_ref in zip(got, ref):
        assert g.dtype == g_ref.dtype
        assert_rel_close(g, g_ref, torch.float16)
