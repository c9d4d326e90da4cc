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


def _accelerated_peft_layer(base, **config):
    """A PEFT DoRA layer over ``base`` and the same layer accelerated (two models from one seed)."""
    import fastpeft

    layers = []
    for _ in range(2):
        torch.manual_seed(4)
        config_ = peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["proj"], **config)
        layers.append(peft.get_peft_model(Holder(copy.deepcopy(base)), config_).base_model.model.proj)
    fastpeft.accelerate(layers[1])
    return layers


@pytest.mark.parametrize("nf4", [False, True])
def test_at_initialisation_the_output_is_the_base_layers_bit_for_bit(nf4):
    """PEFT's DoRA at initialisation adds an exact 0 to the base layer's output (m = n, B = 0); so must the fused
    path, also where rounding near zero would show (1024 inputs: the GEMM accumulates in blocks)."""
    torch.manual_seed(0)
    base = bnb_linear4bit(1024, 64, with_bias=True) if nf4 else nn.Linear(1024, 64)
    theirs, ours = _accelerated_peft_layer(base)
    x = torch.rand(10, 1024)
    for training in (False, True):
        theirs.train(training), ours.train(training)
        with torch.no_grad():
            base_out = ours.base_layer(x)  # over NF4: fastpeft's NF4 op (accelerate switched it), as the fused path's
            assert torch.equal(ours(x), base_out)
            if not nf4:
                assert torch.equal(ours(x), theirs(x))


def test_bf16_training_with_dropout_follows_peft():
    """A bf16 base with PEFT's fp32 adapters and dropout: PEFT casts x to fp32 before its dropout and recomputes
    x'Wᵀ there; the gradients are then within fp32 rounding of float64 (PEFT's ~1e-7), as fastpeft's must be."""
    from conftest import rel_error

    torch.manual_seed(0)
    theirs, ours = _accelerated_peft_layer(nn.Linear(64, 40).bfloat16(), lora_dropout=0.3, init_lora_weights=False)
    with torch.no_grad():
        theirs.lora_magnitude_vector["default"].weight.mul_(1 + 0.1 * torch.randn(40))
    ours.load_state_dict(theirs.state_dict())
    exact = copy.deepcopy(theirs).double()
    x, dy = torch.randn(16, 64).bfloat16(), torch.randn(16, 40).bfloat16()
    results = []
    for layer, dtype in ((theirs, torch.bfloat16), (ours, torch.bfloat16), (exact, torch.float64)):
        layer.train()
        torch.manual_seed(1)  # the same dropout mask
        results.append(layer_grads(layer, x.to(dtype), dy.to(dtype), _peft_params(layer)))
    (y_ref, dx_ref, *ref), (y, dx, *got), (_, _, *grads64) = results
    assert torch.equal(y, y_ref)
    assert_rel_close(dx, dx_ref, tol=1e-2)
    for g, g_ref, g64 in zip(got, ref, grads64):
        assert g.dtype == g_ref.dtype == torch.float32
        assert rel_error(g, g64) <= max(2 * rel_error(g_ref, g64), 1e-6)


def _bf16_stored_nf4(in_features, out_features):
    """A bitsandbytes NF4 layer quantised from a bf16 weight (its quant state's dtype: bf16), bf16 compute."""
    bnb = pytest.importorskip("bitsandbytes")
    dense = nn.Linear(in_features, out_features)
    layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.bfloat16(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer.bias = nn.Parameter(dense.bias.data.bfloat16())
    return layer.to(DEVICE)


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
def test_norm_over_a_bf16_stored_nf4_base_is_peft_s(triton, monkeypatch):
    """bitsandbytes dequantises a bf16-stored NF4 base to bf16, so PEFT's norm (fp32, with fp32 adapters) is over
    bf16 values: fastpeft's norm sees the same values (within fp32 rounding of PEFT's and of float64 over them),
    and the layer's outputs and gradients follow PEFT's."""
    from peft.utils.integrations import dequantize_module_weight

    from fastpeft.ops import dora_weight_norm
    from fastpeft.integration.peft_paths import base_weight

    if triton:
        monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    torch.manual_seed(0)
    theirs, ours = _accelerated_peft_layer(_bf16_stored_nf4(128, 40), init_lora_weights=False)
    weight = base_weight(ours)
    assert weight.dtype == torch.bfloat16
    lora_a, lora_b, magnitude = _peft_params(theirs)
    scaling = theirs.scaling["default"]
    norm = dora_weight_norm(weight, lora_a, lora_b, scaling)
    with torch.no_grad():  # PEFT's forward computes its norm so
        peft_norm = theirs.lora_magnitude_vector["default"].get_weight_norm(
            dequantize_module_weight(theirs.base_layer).to(torch.float32), (lora_b @ lora_a), scaling)
    exact = torch.linalg.vector_norm(weight.dequantize(torch.bfloat16).double()  # bitsandbytes' values
                                     + scaling * (lora_b.double() @ lora_a.double()), dim=1)
    assert_rel_close(peft_norm, exact, tol=1e-6)
    assert_rel_close(norm, exact, tol=1e-6)
    if not triton:
        assert_rel_close(norm, peft_norm, tol=1e-6)
        x, dy = torch.randn(4, 5, 128, dtype=torch.bfloat16), torch.randn(4, 5, 40, dtype=torch.bfloat16)
        (y_ref, dx_ref, *ref), (y, dx, *got) = (layer_grads(layer.train(), x, dy, _peft_params(layer))
                                                for layer in (theirs, ours))
        assert torch.equal(y, y_ref)
        assert_rel_close(dx, dx_ref, tol=1e-2)
        for g, g_ref in zip(got, ref):
            assert_rel_close(g, g_ref, tol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_output_is_peft_s_bit_for_bit(with_bias):
    """On a dense fp32 base with a random adapter the fused path runs PEFT's operations in PEFT's order: the
    same output, not only a close one."""
    torch.manual_seed(0)
    theirs, ours = _accelerated_peft_layer(nn.Linear(300, 200, bias=with_bias), init_lora_weights=False)
    x = torch.randn(2, 10, 300)
    for training in (False, True):  # no dropout: training takes the same path
        with torch.no_grad():
            assert torch.equal(ours.train(training)(x), theirs.train(training)(x))
