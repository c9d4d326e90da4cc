"""The per-call decision of an accelerated PEFT layer (fastpeft.integration.fused_forward): a fused op exactly where
it computes what PEFT's forward would (LoRA variants, lora_bias, a trainable base, stacked adapters, hooks, in-place
ops on the output, a 4-bit base bitsandbytes repacked or computing in another dtype), each against PEFT's forward
on the same model and counted, so a test fails if the wrong forward ran."""

import copy

import pytest
import torch

import fastpeft
import fastpeft.integration.frozen_4bit

from conftest import (assert_rel_close, counting_fused_ops, load_tiny_llama_4bit, lora_config, loss_and_grads,
                      peft_model)

peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


class _MLP(torch.nn.Module):
    """Two biased linear layers, small enough for many configurations."""

    def __init__(self):
        super().__init__()
        self.lin0 = torch.nn.Linear(13, 22)
        self.lin1 = torch.nn.Linear(22, 7)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def _mlp_pair(config, **kwargs):
    """``(PEFT's model, the same model accelerated)`` for ``config`` over a fresh :class:`_MLP`."""
    torch.manual_seed(3)
    theirs = peft.get_peft_model(_MLP(), config, **kwargs)
    ours = copy.deepcopy(theirs)
    fastpeft.accelerate(ours)
    return theirs, ours


def _assert_same_step(theirs, ours, x):
    """The same output and the same gradient of every trainable parameter."""
    outs = []
    for model in (theirs, ours):
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        outs.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (ref, ref_grads), (out, grads) = outs
    assert_rel_close(out, ref)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_rel_close(grads[name], ref_grads[name], tol=1e-5)


X = torch.randn(5, 13, generator=torch.Generator().manual_seed(2))


def test_adapter_with_a_lora_variant_added_after_accelerate_runs_peft():
    if "use_bdlora" not in peft.LoraConfig.__dataclass_fields__:
        pytest.skip(f"peft {peft.__version__} has no LoRA variant for nn.Linear besides DoRA (BD-LoRA: use_bdlora)")
    theirs, ours = _mlp_pair(lora_config(target_modules=["lin0", "lin1"]))
    bdlora = lora_config(target_modules=["lin0", "lin1"], use_bdlora={"target_modules_bd_a": ["lin1"],
                                                               "target_modules_bd_b": ["lin0"], "nblocks": 2})
    for model in (theirs, ours):
        torch.manual_seed(4)
        model.add_adapter("bd", bdlora)
        model.set_adapter("bd")
    _assert_same_step(theirs, ours, X)
    summary = fastpeft.accelerate(ours)
    assert set(summary.peft_forward) == set(summary.replaced) == {"base_model.model.lin0", "base_model.model.lin1"}
    assert all("BdLoraLinearVariant" in why for why in summary.peft_forward.values())


def test_lora_bias_adapter_added_after_accelerate_is_fused():
    theirs, ours = _mlp_pair(lora_config(target_modules=["lin0"]))
    for model in (theirs, ours):
        torch.manual_seed(4)
        model.add_adapter("biased", lora_config(target_modules=["lin0"], lora_bias=True))
        torch.nn.init.normal_(model.base_model.model.lin0.lora_B["biased"].bias)
        model.set_adapter("biased")
    with counting_fused_ops() as calls:
        _assert_same_step(theirs, ours, X)
    assert len(calls) == 1
    summary = fastpeft.accelerate(ours)
    assert summary.replaced == {"base_model.model.lin0": "lora"} and not summary.skipped and not summary.peft_forward


def test_trainable_base_weight_gets_peft_gradient():
    theirs, ours = _mlp_pair(lora_config(target_modules=["lin0", "lin1"]))
    for model in (theirs, ours):
        model.base_model.model.lin0.base_layer.weight.requires_grad_(True)
    with counting_fused_ops() as calls:
        _assert_same_step(theirs, ours, X)
        with torch.no_grad():  # a frozen-for-this-call weight takes the fused path again
            ours(X)
    assert len(calls) == 3  # lin1 twice, lin0 without grad


def test_stacked_lora_over_loha_is_left_to_peft():
    loha = peft.LoHaConfig(r=2, target_modules=["lin0"], init_weights=False)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(_MLP(), loha, adapter_name="loha", mixed=True)
    theirs.add_adapter("lora", lora_config(target_modules=["lin0", "lin1"]))
    theirs.set_adapter(["loha", "lora"])
    ours = copy.deepcopy(theirs)
    summary = fastpeft.accelerate(ours)
    assert summary.replaced == {"base_model.model.lin1": "lora"}
    assert "stacked" in summary.skipped["base_model.model.lin0"]
    with counting_fused_ops() as calls:
        _assert_same_step(theirs, ours, X)
    assert len(calls) == 1


@pytest.mark.parametrize("where", ["base_layer", "lora_A", "lora_B", "lora_dropout", "global"])
@pytest.mark.parametrize("hook", ["forward", "forward_pre", "full_backward"])
def test_hooks_on_peft_submodules_fire(where, hook):
    theirs, ours = _mlp_pair(lora_config(target_modules=["lin0"], lora_dropout=0.1))
    fired = {id(theirs): 0, id(ours): 0}
    handles = []
    for model in (theirs, ours):
        def count(*args, _key=id(model)):
            fired[_key] += 1
        layer = model.base_model.model.lin0
        if where == "global":
            register = getattr(torch.nn.modules.module, f"register_module_{hook}_hook")
            handles.append(register(count))
            continue
        module = layer.base_layer if where == "base_layer" else getattr(layer, where)["default"]
        handles.append(getattr(module, f"register_{hook}_hook")(count))
        model.train()
    try:
        with counting_fused_ops() as calls:
            for model in (theirs, ours):
                torch.manual_seed(5)
                model(X.requires_grad_()).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        X.requires_grad_(False)
    assert fired[id(ours)] == fired[id(theirs)] > 0 and not calls


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_in_place_ops_on_accelerated_outputs(kind):
    # nn.ReLU(inplace=True) after the layer (and PEFT's own `result += ...` over a wrapped layer)
    if kind == "ia3":
        config = peft.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], init_ia3_weights=False)
    else:
        config = lora_config(target_modules=["lin0", "lin1"], use_dora=kind == "dora")
    theirs, ours = _mlp_pair(config)
    for model in (theirs, ours):
        model.base_model.model.forward = lambda x, _m=model.base_model.model: _m.lin1(torch.relu_(_m.lin0(x)) + 1.0)
    with counting_fused_ops() as calls:
        _assert_same_step(theirs, ours, X.unsqueeze(0).expand(3, -1, -1))
    assert len(calls) == 2


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_at_initialisation_is_the_base_model_bit_for_bit(dropout):
    theirs, ours = _mlp_pair(lora_config(target_modules=["lin0", "lin1"], use_dora=True, init_lora_weights=True,
                                   lora_dropout=dropout))
    ours.train()
    with torch.no_grad(), theirs.disable_adapter():
        base = theirs(X)
    with counting_fused_ops() as calls:
        assert torch.equal(ours(X), base) and torch.equal(theirs.train()(X), base)
        assert torch.equal(ours.eval()(X), base)
    assert len(calls) == 4


def test_a_4bit_base_repacked_by_bitsandbytes_runs_peft_forward(tiny_llama_dir):
    """bitsandbytes repacks a Linear4bit for its bf16 CPU kernel on an eval no-grad forward (AVX512-BF16 CPUs);
    from then on PEFT computes with that kernel, so the accelerated layer hands the call to PEFT's forward."""
    model = peft_model(lora_config(target_modules=["q_proj"]), load_tiny_llama_4bit(tiny_llama_dir))
    fastpeft.accelerate(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features)
    layer.get_base_layer().weight.quant_state.packing_format_for_cpu = True  # what that forward leaves behind
    peft_class = layer._fastpeft_peft_class
    peft_forward = peft_class.forward
    with torch.no_grad(), counting_fused_ops() as calls:
        try:
            peft_class.forward = lambda self, x: "peft"
            assert layer(x) == "peft" and not calls
        finally:
            peft_class.forward = peft_forward


def test_a_4bit_layer_computing_in_another_dtype_runs_peft_forward(tiny_llama_dir, monkeypatch):
    """``bnb_4bit_compute_dtype=bfloat16`` on an fp32 model: bitsandbytes (and so PEFT) multiplies in bf16; the
    fused ops would compute in fp32 (3.7e-8 from the exact result where PEFT is 2.1e-3 away), so
    the accelerated layers run PEFT's forward and the outputs and gradients are PEFT's, bit for bit. The 4-bit
    base PEFT's forward calls runs on fastpeft's NF4 op (bitsandbytes' compute dtype rule; faster on CPU), as
    every frozen 4-bit layer does; ``frozen_4bit=False`` and ``restore`` put bitsandbytes back."""
    model = peft_model(lora_config(target_modules=["q_proj", "down_proj"]),
                        load_tiny_llama_4bit(tiny_llama_dir, torch.bfloat16)).train()
    ref_out, ref_grads = loss_and_grads(model, TOKENS)
    summary = fastpeft.accelerate(model)
    assert sorted(set(summary.replaced.values())) == ["lora+nf4", "nf4"] and len(summary.replaced) == 14
    bases = []
    frozen_4bit_linear = fastpeft.integration.frozen_4bit.frozen_4bit_linear
    monkeypatch.setattr(fastpeft.integration.frozen_4bit, "frozen_4bit_linear",
                        lambda layer, x: bases.append(layer) or frozen_4bit_linear(layer, x))
    with counting_fused_ops() as calls:
        out, grads = loss_and_grads(model, TOKENS)
    assert not calls
    all_4bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit" and not hasattr(m, "base_layer")]
    assert len(all_4bit) == 14 and {id(m) for m in bases} == {id(m) for m in all_4bit}
    assert torch.equal(out, ref_out) and grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[name], ref_grads[name]) for name in grads)
    for put_back in (lambda: fastpeft.accelerate(model, frozen_4bit=False), lambda: fastpeft.restore(model)):
        put_back()
        bases.clear()
        assert torch.equal(loss_and_grads(model, TOKENS)[0], ref_out) and not bases
        fastpeft.accelerate(model)
