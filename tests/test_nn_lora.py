"""fastpeft.nn.LoraLinear against PEFT's own lora.Linear / lora.Linear4bit on identical weights (fp32 CPU,
outputs and gradients), plus init, merge/unmerge, disable_adapter and parameter sharing."""

import copy
import math

import pytest
import torch
from torch import nn

from fastpeft.nf4 import NF4Weight
from fastpeft.nn import LoraLinear

from conftest import DEVICE, Holder, assert_rel_close, bnb_linear4bit, layer_grads, non_contiguous

peft = pytest.importorskip("peft")


def _peft_layer(base, r, alpha, dropout, use_rslora):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                             target_modules=["proj"], init_lora_weights=False)
    return peft.get_peft_model(Holder(base), config).base_model.model.proj


def _pair(nf4, with_bias, r=8, alpha=16, dropout=0.0, use_rslora=False):
    """A PEFT layer (non-trivial A and B) and a LoraLinear built independently with copies of its weights."""
    # in_features a multiple of 64: bitsandbytes' CPU dequantiser is wrong for blocks spanning rows
    base = bnb_linear4bit(128, 40, with_bias) if nf4 else nn.Linear(64, 40, bias=with_bias)
    ours_base = copy.deepcopy(base)
    theirs = _peft_layer(base, r, alpha, dropout, use_rslora)
    ours = LoraLinear(ours_base, r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                      init_lora_weights=False)
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
    return theirs, ours


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_matches_peft(nf4, with_bias, use_rslora):
    theirs, ours = _pair(nf4, with_bias, use_rslora=use_rslora, dropout=0.1)
    theirs.eval(), ours.eval()  # dropout off: PEFT draws its mask from torch's RNG in its own order
    assert ours.scaling == pytest.approx(theirs.scaling["default"])
    x = torch.randn(2, 5, ours.in_features, device=DEVICE)
    y_ref, *ref = layer_grads(theirs, x, torch.ones(2, 5, 40),
                              [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight])
    y, *got = layer_grads(ours, x, torch.ones(2, 5, 40), [ours.lora_A, ours.lora_B])
    assert_rel_close(y, y_ref, torch.float32)
    for g, g_ref in zip(got, ref):
        assert_rel_close(g, g_ref, torch.float32)


@pytest.mark.parametrize("wrapped_dropout", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_dropout_in_training_matches_peft_with_the_same_mask(nf4, wrapped_dropout):
    theirs, ours = _pair(nf4, with_bias=True, dropout=0.4)
    if wrapped_dropout:  # any other dropout module: applied by the layer, drop(x) handed to the op
        ours.lora_dropout = nn.Sequential(nn.Dropout(0.4))
    x = torch.randn(7, ours.in_features, device=DEVICE)
    dy = torch.randn(7, 40, device=DEVICE)
    torch.manual_seed(1)
    y_ref, *ref = layer_grads(theirs.train(), x, dy, [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight])
    torch.manual_seed(1)  # both draw one Bernoulli mask of x's shape, first thing in their forward
    y, *got = layer_grads(ours.train(), x, dy, [ours.lora_A, ours.lora_B])
    assert_rel_close(y, y_ref, torch.float32)
    for g, g_ref in zip(got, ref):
        assert_rel_close(g, g_ref, torch.float32)


def test_triton_kernels_match_peft_4bit(triton_backend):
    theirs, ours = _pair(nf4=True, with_bias=True, r=16)
    x = non_contiguous(torch.randn(3, 2, 128, device=DEVICE))
    dy = torch.randn(3, 2, 40, device=DEVICE)
    y_ref, *ref = layer_grads(theirs, x.contiguous(), dy,
                              [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight])
    y, *got = layer_grads(ours, x, dy, [ours.lora_A, ours.lora_B])
    assert_rel_close(y, y_ref, torch.float32)
    for g, g_ref in zip(got, ref):
        assert_rel_close(g, g_ref, torch.float32)


@pytest.mark.parametrize("nf4", [False, True])
def test_merge_unmerge_and_disable(nf4):
    theirs, ours = _pair(nf4, with_bias=True)
    x = torch.randn(4, ours.in_features, device=DEVICE)
    with torch.no_grad():
        y = ours(x)
        base = theirs.base_layer(x)
        with ours.disable_adapter():
            assert_rel_close(ours(x), base, torch.float32)
        ours.merge()
        assert ours.merged
        assert_rel_close(ours(x), y, torch.float32)
        with ours.disable_adapter():
            assert not ours.merged
            assert_rel_close(ours(x), base, torch.float32)
        assert ours.merged
        ours.unmerge()
        assert not ours.merged and ours.merged_weight is None
        assert_rel_close(ours(x), y, torch.float32)
    if nf4:
        assert isinstance(ours.base_weight(), NF4Weight)


def test_init_like_peft():
    layer = LoraLinear(nn.Linear(64, 32), r=4, lora_alpha=8)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    assert layer.scaling == 2.0 and isinstance(layer.lora_dropout, nn.Identity)
    assert LoraLinear(nn.Linear(64, 32), r=4, lora_alpha=8, use_rslora=True).scaling == 4.0
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_from_parameters_shares_objects_and_nf4weight_base():
    weight = NF4Weight.quantize(torch.randn(24, 64, device=DEVICE), 64, double_quant=True)
    lora_a = nn.Parameter(torch.randn(3, 64, device=DEVICE))
    lora_b = nn.Parameter(torch.randn(24, 3, device=DEVICE))
    dropout = nn.Dropout(0.2)
    bias = torch.randn(24, device=DEVICE)
    layer = LoraLinear.from_parameters(weight, lora_a, lora_b, 0.5, dropout, bias=bias).eval()
    assert layer.lora_A is lora_a and layer.lora_B is lora_b and layer.lora_dropout is dropout
    assert layer.base_weight() is weight and layer.r == 3
    x = torch.randn(5, 64, device=DEVICE)
    expected = x @ weight.dequantize().T + bias + 0.5 * (x @ lora_a.T) @ lora_b.T
    assert_rel_close(layer(x), expected, torch.float32)


def test_rejects_bad_arguments():
    with pytest.raises(TypeError, match="base_layer must be"):
        LoraLinear(nn.Conv1d(3, 3, 1))
    int8_linear = nn.Linear(8, 8)
    int8_linear.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="torch.int8 weight; only float and NF4"):
        LoraLinear(int8_linear)
    with pytest.raises(ValueError, match="r must be a positive int"):
        LoraLinear(nn.Linear(8, 8), r=0)
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoraLinear(nn.Linear(8, 8), init_lora_weights="pissa")
    with pytest.raises(ValueError, match=r"must be \(r, 8\) and \(4, r\)"):
        LoraLinear.from_parameters(nn.Linear(8, 4), nn.Parameter(torch.randn(2, 8)), nn.Parameter(torch.randn(4, 3)),
                                   1.0, nn.Identity())


@pytest.mark.parametrize("nf4", [False, True])
def test_from_parameters_on_a_peft_layer_trains_peft_parameters(nf4):
    theirs, _ = _pair(nf4, with_bias=True, dropout=0.2)
    lora_a, lora_b = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
    ours = LoraLinear.from_parameters(theirs.base_layer, lora_a, lora_b, theirs.scaling["default"],
                                      theirs.lora_dropout["default"])
    x = torch.randn(6, ours.in_features, device=DEVICE)
    dy = torch.randn(6, 40, device=DEVICE)
    y_ref, *ref = layer_grads(theirs.eval(), x, dy, [lora_a, lora_b])
    y = ours.eval()(x)
    y.backward(dy)
    assert_rel_close(y, y_ref, torch.float32)
    assert_rel_close(lora_a.grad, ref[1], torch.float32)  # the gradient lands in PEFT's own parameters
    assert_rel_close(lora_b.grad, ref[2], torch.float32)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_swapped_into_a_4bit_peft_llama(tiny_llama_dir, monkeypatch, backend):
    # a real QLoRA setup: transformers loads NF4 (double-quantised) weights, PEFT wraps every linear layer;
    # swapping in LoraLinear layers that share PEFT's parameters leaves logits and gradients unchanged
    from conftest import load_tiny_llama_4bit
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    # train mode (no dropout anywhere here): in eval mode bitsandbytes' CPU path repacks the weights in place
    model = peft.get_peft_model(load_tiny_llama_4bit(tiny_llama_dir), config).train()
    input_ids = torch.randint(1, 128, (2, 5), device=DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]
    logits_ref = model(input_ids).logits
    grads_ref = torch.autograd.grad(logits_ref.square().sum(), params)

    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, PeftLinear4bit):
            parent, child = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            setattr(parent, child, LoraLinear.from_parameters(
                module.base_layer, module.lora_A["default"].weight, module.lora_B["default"].weight,
                module.scaling["default"], module.lora_dropout["default"]))
            swapped += 1
    assert swapped == 14  # 7 linear layers in each of the 2 decoder layers
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    logits = model(input_ids).logits
    grads = torch.autograd.grad(logits.square().sum(), params)
    assert_rel_close(logits, logits_ref, torch.float32)
    for g, g_ref in zip(grads, grads_ref):
        assert_rel_close(g, g_ref, tol=1e-4)


def test_refuses_a_linear4bit_repacked_by_bitsandbytes():
    base = bnb_linear4bit(128, 64, with_bias=False)
    layer = LoraLinear(base, r=2)
    base.weight.quant_state.packing_format_for_cpu = True  # what bitsandbytes' CPU eval forward leaves behind
    with pytest.raises(ValueError, match="repacked this Linear4bit"):
        layer(torch.randn(2, 128, device=DEVICE))


class _Doubled(nn.Module):
    def forward(self, t):
        return 2 * t


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_forward_computes_with_parametrised_and_swapped_tensors(kind):
    """The forwards read their tensors from nn.Module's registries directly; a parametrised one (parametrize moves
    it out of _parameters) and torch.func.functional_call's stand-ins are still what they compute with."""
    from torch.nn.utils import parametrize

    from fastpeft import reference
    from fastpeft.nn import DoraLinear, IA3Linear

    base = nn.Linear(24, 16)
    layer = {"lora": LoraLinear, "dora": DoraLinear}[kind](base, r=4, init_lora_weights=False) if kind != "ia3" \
        else IA3Linear(base, init_ia3_weights=False)
    name = "ia3_l" if kind == "ia3" else "lora_A"
    x = torch.randn(3, 24)

    def expected(**tensors):
        t = {n: getattr(layer, n) for n in ("ia3_l", "lora_A", "lora_B", "lora_magnitude_vector") if hasattr(layer, n)}
        t.update(tensors)
        weight = tensors.get("base_layer.weight", base.weight)
        if kind == "ia3":
            return reference.ia3_linear(x, weight, base.bias, t["ia3_l"].view(-1), False)
        if kind == "dora":
            return reference.dora_linear(x, weight, base.bias, t["lora_A"], t["lora_B"], layer.scaling,
                                         t["lora_magnitude_vector"])
        return reference.lora_linear(x, weight, base.bias, t["lora_A"], t["lora_B"], layer.scaling)

    with torch.no_grad():
        stand_ins = {name: torch.randn_like(getattr(layer, name)), "base_layer.weight": torch.randn(16, 24)}
        got = torch.func.functional_call(layer, stand_ins, (x,))
        assert_rel_close(got, expected(**stand_ins), torch.float32)
        original = getattr(layer, name).detach().clone()
        layer(x)
        parametrize.register_parametrization(layer, name, _Doubled())
        assert_rel_close(layer(x), expected(**{name: 2 * original}), torch.float32)
