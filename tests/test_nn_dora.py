"""fastpeft.nn.DoraLinear against PEFT's own DoRA layers (lora.Linear / lora.Linear4bit with use_dora=True) on
identical weights (fp32 CPU, outputs and gradients incl. the magnitude), plus magnitude init, dropout in
training, merge/unmerge, and loading a PEFT DoRA adapter file."""

import copy

import pytest
import torch
from torch import nn

from fastpeft import load_adapter
from fastpeft.nn import DoraLinear

from conftest import (DEVICE, Holder, assert_rel_close, bnb_linear4bit, layer_grads, make_tiny_llama, non_contiguous,
                      save_peft_adapter)

peft = pytest.importorskip("peft")


def _pair(nf4, with_bias, dropout=0.0, use_rslora=False):
    """A PEFT DoRA layer (random A, B, magnitude) and a DoraLinear built independently with copies of them."""
    # in_features a multiple of 64: bitsandbytes' CPU dequantiser is wrong for blocks spanning rows
    base = bnb_linear4bit(128, 40, with_bias) if nf4 else nn.Linear(64, 40, bias=with_bias)
    ours = DoraLinear(copy.deepcopy(base), r=8, lora_alpha=16, lora_dropout=dropout, use_rslora=use_rslora,
                      init_lora_weights=False)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, use_rslora=use_rslora, use_dora=True,
                             target_modules=["proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(Holder(base), config).base_model.model.proj
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
        # PEFT initialised its magnitude to the norm of these very A, B: ours must compute the same
        assert_rel_close(ours.weight_norm(), theirs.lora_magnitude_vector["default"].weight, torch.float32)
        theirs.lora_magnitude_vector["default"].weight.mul_(1 + 0.3 * torch.randn(40))  # a trained magnitude
        ours.lora_magnitude_vector.copy_(theirs.lora_magnitude_vector["default"].weight)
    return theirs, ours


def _peft_params(layer):
    return [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
            layer.lora_magnitude_vector["default"].weight]


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_matches_peft(nf4, with_bias, use_rslora):
    theirs, ours = _pair(nf4, with_bias, dropout=0.1, use_rslora=use_rslora)
    theirs.eval(), ours.eval()  # dropout off (PEFT then reuses the base result, as ours does)
    assert ours.scaling == pytest.approx(theirs.scaling["default"])
    x = non_contiguous(torch.randn(2, 5, ours.in_features, device=DEVICE))
    dy = torch.randn(2, 5, 40)
    y_ref, *ref = layer_grads(theirs, x, dy, _peft_params(theirs))
    y, *got = layer_grads(ours, x, dy, [ours.lora_A, ours.lora_B, ours.lora_magnitude_vector])
    assert_rel_close(y, y_ref, torch.float32)
    for g, g_ref in zip(got, ref):
        assert_rel_close(g, g_ref, torch.float32)


@pytest.mark.parametrize("nf4", [False, True])
def test_dropout_in_training_matches_peft_with_the_same_mask(nf4):
    """In training with dropout PEFT recomputes the base product on drop(x); sharing PEFT's own parameters
    and dropout module (from_parameters) and the RNG seed, the two layers draw the same mask."""
    theirs, _ = _pair(nf4, with_bias=True, dropout=0.3)
    ours = DoraLinear.from_parameters(theirs.base_layer, theirs.lora_A["default"].weight,
                                      theirs.lora_B["default"].weight, theirs.scaling["default"],
                                      theirs.lora_dropout["default"], theirs.lora_magnitude_vector["default"].weight)
    theirs.train(), ours.train()
    x, dy = torch.randn(3, 4, ours.in_features), torch.randn(3, 4, 40)
    torch.manual_seed(1)
    y_ref, *ref = layer_grads(theirs, x, dy, _peft_params(theirs))
    torch.manual_seed(1)
    y, *got = layer_grads(ours, x, dy, _peft_params(theirs))
    assert_rel_close(y, y_ref, torch.float32)
    for g, g_ref in zip(got, ref):
        assert_rel_close(g, g_ref, torch.float32)


def test_merge_matches_peft_and_unmerges():
    theirs, ours = _pair(nf4=False, with_bias=True)
    x = torch.randn(6, 64)
    with torch.no_grad():
        y = ours(x)
        original = ours.base_layer.weight.clone()
        ours.merge()
        theirs.merge()
        assert_rel_close(ours.base_layer.weight, theirs.base_layer.weight, torch.float32)
        assert_rel_close(ours(x), y, torch.float32)
        ours.unmerge()
        assert_rel_close(ours.base_layer.weight, original, torch.float32)
        assert_rel_close(ours(x), y, torch.float32)
        with ours.disable_adapter():
            assert_rel_close(ours(x), ours.base_layer(x), torch.float32)


def test_nf4_merge_leaves_the_packed_base_alone():
    _, ours = _pair(nf4=True, with_bias=False)
    x = torch.randn(6, 128)
    packed = ours.base_weight().packed.clone()
    with torch.no_grad():
        y = ours(x)
        ours.merge()
        assert_rel_close(ours(x), y, torch.float32)
        ours.unmerge()
    assert torch.equal(ours.base_weight().packed, packed)


def test_from_peft_adapter_file(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"])
    path = save_peft_adapter(tmp_path, config)
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), path).eval()
    adapters = load_adapter(path).modules()
    base = make_tiny_llama()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        ours = DoraLinear.from_adapter(base.get_submodule(name), adapters[name])
        their_layer = theirs.base_model.model.get_submodule(name)
        x = torch.randn(3, ours.in_features)
        with torch.no_grad():
            assert_rel_close(ours(x), their_layer(x), torch.float32)


def test_errors():
    with pytest.raises(ValueError, match="needs the magnitude Parameter"):
        DoraLinear.from_parameters(nn.Linear(4, 3), nn.Parameter(torch.ones(2, 4)), nn.Parameter(torch.ones(3, 2)),
                                   1.0, nn.Identity())
    with pytest.raises(ValueError, match=r"magnitude must be \(3,\), got \(4,\)"):
        DoraLinear.from_parameters(nn.Linear(4, 3), nn.Parameter(torch.ones(2, 4)), nn.Parameter(torch.ones(3, 2)),
                                   1.0, nn.Identity(), nn.Parameter(torch.ones(4)))


@pytest.mark.parametrize("nf4", [False, True])
def test_reference_dora_linear_is_peft(nf4):
    """fastpeft.reference.dora_linear, the oracle of the kernel tests, on PEFT's own tensors."""
    from fastpeft import reference

    theirs, ours = _pair(nf4, with_bias=True)
    x = torch.randn(4, ours.in_features)
    with torch.no_grad():
        ref = reference.dora_linear(x, ours.base_weight(), ours.bias, *_peft_params(theirs)[:2],
                                    theirs.scaling["default"], _peft_params(theirs)[2])
        assert_rel_close(ref, theirs(x), torch.float32)


def test_matches_peft_on_triton_kernels(triton_backend):
    """The NF4 layer end to end on the Triton kernels (interpreter on CPU): norm, fused forward, fused dx."""
    theirs, ours = _pair(nf4=True, with_bias=True)
    theirs.eval(), ours.eval()
    x, dy = torch.randn(19, 128), torch.randn(19, 40)
    y_ref, *ref = layer_grads(theirs, x, dy, _peft_params(theirs))
    y, *got = layer_grads(ours, x, dy, [ours.lora_A, ours.lora_B, ours.lora_magnitude_vector])
    assert_rel_close(y, y_ref, torch.float32)
    for g, g_ref in zip(got, ref):
        assert_rel_close(g, g_ref, torch.float32)


def test_fp16_base_matches_peft():
    """An fp16 base. PEFT keeps its adapter in fp32 (autocast_adapter_dtype); LoraLinear's convention is the
    base's dtype, so the comparison is at fp16 precision."""
    base = nn.Linear(64, 40).half()
    ours = DoraLinear(copy.deepcopy(base), r=8, lora_alpha=16, init_lora_weights=False)
    config = peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(Holder(base), config).base_model.model.proj
    with torch.no_grad():
        for mine, peft_param in zip([ours.lora_A, ours.lora_B, ours.lora_magnitude_vector], _peft_params(theirs)):
            mine.copy_(peft_param)
    x, dy = torch.randn(5, 64, dtype=torch.float16), torch.randn(5, 40, dtype=torch.float16)
    y_ref, *ref = layer_grads(theirs, x, dy, _peft_params(theirs))
    y, *got = layer_grads(ours, x, dy, [ours.lora_A, ours.lora_B, ours.lora_magnitude_vector])
    assert y.dtype == torch.float16
    assert_rel_close(y, y_ref, torch.float16)
    for g, g_ref in zip(got, ref):
        assert_rel_close(g, g_ref, torch.float16)
