"""The fused paths of accelerated PEFT LoRA layers beyond one plain adapter (fastpeft.integration.peft_paths): mixed-adapter
batches (``adapter_names``), several active adapters, ``lora_bias``; each against PEFT's own forward on the same
model (outputs, every gradient) and counted, so a test fails if PEFT's forward ran instead."""

import copy

import pytest
import torch

import fastpeft
import fastpeft.integration.frozen_4bit
import fastpeft.integration.peft_paths

from conftest import (Holder, assert_rel_close, bnb_linear4bit, counting_fused_ops, load_tiny_llama_4bit, lora_config,
                      make_tiny_llama)

peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 128, (4, 7), generator=torch.Generator().manual_seed(2))
LAYERS = 14  # adapted linear layers of the tiny Llama with target_modules="all-linear"


def _randomise(model, prefix=""):
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and prefix in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def _three_adapters(**extra):
    """PEFT model with adapters "alpha" (r 4), "beta" (r 2, rsLoRA, other alpha) and "gamma" (q_proj / v_proj only)."""
    model = peft.get_peft_model(make_tiny_llama(), lora_config(**extra), adapter_name="alpha")
    model.add_adapter("beta", lora_config(r=2, lora_alpha=3, use_rslora=True, **extra))
    model.add_adapter("gamma", lora_config(r=3, target_modules=["q_proj", "v_proj"], **extra))
    _randomise(model)
    return model.eval()


def _counting():
    """Counts fused calls: fastpeft's ops as the accelerated layers call them, the multi-LoRA terms of mixed batches
    and the frozen 4-bit bases."""
    return counting_fused_ops((fastpeft.integration.peft_paths, "add_lora_terms", "add_lora_terms"),
                              (fastpeft.integration.frozen_4bit, "lora_linear", "frozen_4bit"))


def _accelerated_pair(model):
    theirs = copy.deepcopy(model)
    fastpeft.accelerate(model)
    return model, theirs


# ---------------------------------------------------------------------------------------------- mixed batches
NAMES = ["beta", "__base__", "alpha", "gamma"]


@pytest.mark.parametrize("lora_bias", [False, True], ids=["plain", "lora_bias"])
def test_mixed_batch_forward_and_generate_match_peft(lora_bias):
    ours, theirs = _accelerated_pair(_three_adapters(lora_bias=lora_bias))
    with torch.no_grad():
        expected = theirs(TOKENS, adapter_names=NAMES).logits
        with _counting() as calls:
            out = ours(TOKENS, adapter_names=NAMES).logits
        assert calls.count("add_lora_terms") == LAYERS and calls.count("lora_linear") == LAYERS  # base + fused LoRA
        assert_rel_close(out, expected)
        # rows: each equals PEFT with that adapter alone (the base model for "__base__")
        for row, name in enumerate(NAMES):
            if name == "__base__":
                with theirs.disable_adapter():
                    alone = theirs(TOKENS[row:row + 1]).logits
            else:
                theirs.set_adapter(name)
                alone = theirs(TOKENS[row:row + 1]).logits
            assert_rel_close(out[row:row + 1], alone)
    theirs.set_adapter("alpha")
    kwargs = dict(max_new_tokens=2, do_sample=False, pad_token_id=0)
    with _counting() as calls:
        generated = ours.generate(input_ids=TOKENS, adapter_names=NAMES, **kwargs)
    assert calls.count("add_lora_terms") == 2 * LAYERS
    assert torch.equal(generated, theirs.generate(input_ids=TOKENS, adapter_names=NAMES, **kwargs))


def test_mixed_batch_4bit_base(tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    model = peft.get_peft_model(load_tiny_llama_4bit(tiny_llama_dir),
                                lora_config(target_modules=["q_proj", "down_proj"]), adapter_name="alpha")
    model.add_adapter("beta", lora_config(r=2, target_modules=["q_proj"]))
    _randomise(model)
    fastpeft.accelerate(model.eval())
    # ours first: bitsandbytes' eval forward on CPU repacks the 4-bit weights for its own kernel
    with torch.no_grad():
        with _counting() as calls:
            out = model(TOKENS, adapter_names=NAMES[:3] + ["alpha"]).logits
        assert calls.count("add_lora_terms") == 4
        fastpeft.restore(model)
        assert_rel_close(out, model(TOKENS, adapter_names=NAMES[:3] + ["alpha"]).logits)


def test_mixed_batch_bank_follows_parameter_changes():
    ours, theirs = (model.base_model.model.model.layers[0].self_attn.q_proj for model in
                    _accelerated_pair(_three_adapters()))
    x = torch.randn(4, 3, 64)
    with torch.no_grad():
        first = ours(x, adapter_names=NAMES)
        for layer in (ours, theirs):
            layer.lora_B["beta"].weight.mul_(3.0)  # in place, as an optimizer step
        out = ours(x, adapter_names=NAMES)
        assert_rel_close(out, theirs(x, adapter_names=NAMES))
        assert not torch.allclose(out, first)


@pytest.mark.parametrize("how", ["layer", "forward", "generate"])
def test_mixed_batch_sees_data_edits_between_calls(how):
    """``.data.copy_`` / ``.data.mul_`` between two calls (which bump no version counter): the second call uses the
    new values, as PEFT does, whether the layer, the model or generate is called."""
    ours, theirs = _accelerated_pair(_three_adapters())
    kwargs = dict(max_new_tokens=2, do_sample=False, pad_token_id=0)
    x = torch.randn(4, 3, 64)

    def call(model):
        if how == "layer":
            return model.base_model.model.model.layers[0].self_attn.q_proj(x, adapter_names=NAMES)
        if how == "forward":
            return model(TOKENS, adapter_names=NAMES).logits
        return model.generate(input_ids=TOKENS, adapter_names=NAMES, output_logits=True, return_dict_in_generate=True,
                              **kwargs).logits[-1]

    with torch.no_grad():
        first = call(ours)
        for model in (ours, theirs):
            for name, param in model.named_parameters():
                if "layers.0.self_attn.q_proj.lora_B.beta" in name or "layers.1.mlp.down_proj.lora_A.alpha" in name:
                    param.data.copy_(param.data * 4.0 + 0.5)
        out = call(ours)
        assert_rel_close(out, call(theirs))
        assert not torch.allclose(out, first)


def test_mixed_batch_with_autograd_runs_peft_and_matches():
    ours, theirs = _accelerated_pair(_three_adapters())
    results = []
    for model in (theirs, ours):
        model.zero_grad()
        with _counting() as calls:
            logits = model(TOKENS, adapter_names=NAMES).logits
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert "add_lora_terms" not in calls  # inference-only op: PEFT's forward carries the gradients
    assert_rel_close(results[1][0], results[0][0])
    assert results[1][1].keys() == results[0][1].keys() and results[0][1]
    for name, grad in results[0][1].items():
        assert_rel_close(results[1][1][name], grad, tol=1e-4)


def test_mixed_batch_errors_are_peft_errors():
    model = peft.get_peft_model(make_tiny_llama(), lora_config(target_modules=["q_proj"]), adapter_name="alpha")
    model.add_adapter("delta", lora_config(target_modules=["q_proj"], use_dora=True))
    fastpeft.accelerate(model.eval())
    with torch.no_grad():
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
            model(TOKENS, adapter_names=["alpha", "delta", "alpha", "alpha"])
        with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
            model(TOKENS, adapter_names=["alpha"])



def test_mixed_batch_at_ranks_beyond_the_serving_limit():
    """PEFT's adapters have any rank: a mixed batch packs them (``LoraBank.pack`` without serving's rank limit) and
    runs fused, with PEFT's numbers."""
    from fastpeft.bank import MAX_RANK

    model = peft.get_peft_model(Holder(torch.nn.Linear(16, 8)), lora_config(r=MAX_RANK + 1, target_modules=["proj"]),
                                adapter_name="wide")
    model.add_adapter("narrow", lora_config(r=2, target_modules=["proj"]))
    _randomise(model)
    ours, theirs = _accelerated_pair(model.eval())
    x = torch.randn(3, 5, 16)
    names = ["wide", "__base__", "narrow"]
    with torch.no_grad():
        with _counting() as calls:
            out = ours.base_model.model.proj(x, adapter_names=names)
        assert calls == ["lora_linear", "add_lora_terms"]
        assert_rel_close(out, theirs.base_model.model.proj(x, adapter_names=names))


def test_restore_drops_the_bank_of_a_model_call():
    """The bank a model call packed stays on the layer for that call only, and ``restore`` takes it off."""
    ours, _ = _accelerated_pair(_three_adapters())
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        ours(TOKENS, adapter_names=NAMES)
    assert "_fastpeft_bank" in layer.__dict__
    fastpeft.restore(ours)
    assert "_fastpeft_bank" not in layer.__dict__

# ---------------------------------------------------------------------------------------------- several active
def _loss_and_grads(model, tokens=TOKENS):
    model.zero_grad(set_to_none=True)
    logits = model(tokens).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ours, theirs, fused: int):
    expected, ref_grads = _loss_and_grads(theirs)
    with _counting() as calls:
        out, grads = _loss_and_grads(ours)
    assert calls.count("lora_linear") == fused
    assert_rel_close(out, expected)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert_rel_close(grads[name], ref_grads[name], tol=1e-4)


@pytest.mark.parametrize("lora_bias", [False, True], ids=["plain", "lora_bias"])
def test_several_active_adapters_are_one_fused_term(lora_bias):
    ours, theirs = _accelerated_pair(_three_adapters(lora_bias=lora_bias))
    for model in (ours, theirs):
        model.base_model.set_adapter(["alpha", "beta", "gamma"])  # "gamma" only where it exists (q_proj, v_proj)
        model.train()
    _assert_same(ours, theirs, fused=LAYERS)
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert any(".beta.weight" in n for n in grads) and any(".gamma.weight" in n for n in grads)
    if lora_bias:
        assert any("lora_B.alpha.bias" in n for n in grads)


def test_several_active_adapters_with_dropout_run_peft_in_training_only():
    ours, theirs = _accelerated_pair(_three_adapters(lora_dropout=0.25))
    for model in (ours, theirs):
        model.base_model.set_adapter(["alpha", "beta"])
        model.train()
    torch.manual_seed(5)
    expected, ref_grads = _loss_and_grads(theirs)
    torch.manual_seed(5)
    with _counting() as calls:
        out, grads = _loss_and_grads(ours)
    assert calls == []  # one dropout mask per adapter in PEFT: not one fused term
    assert torch.equal(out, expected) and all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
    ours.eval()
    theirs.eval()
    _assert_same(ours, theirs, fused=LAYERS)


def test_weighted_adapter_alone_and_with_another():
    ours, theirs = _accelerated_pair(_three_adapters())
    for model in (ours, theirs):
        model.add_weighted_adapter(["alpha", "beta"], [0.7, -0.4], "w", combination_type="cat")
        model.base_model.set_adapter(["w", "alpha"])
        model.train()
    _assert_same(ours, theirs, fused=LAYERS)
    for model in (ours, theirs):
        model.set_adapter("w")
    _assert_same(ours, theirs, fused=LAYERS)


def test_lora_bias_single_adapter():
    ours, theirs = _accelerated_pair(peft.get_peft_model(make_tiny_llama(), lora_config(lora_bias=True)))
    _randomise(ours)
    _randomise(theirs)
    summary = fastpeft.accelerate(ours)
    assert len(summary.replaced) == LAYERS and not summary.skipped
    ours.train()
    theirs.train()
    _assert_same(ours, theirs, fused=LAYERS)


# ---------------------------------------------------------------------------------------------- frozen 4-bit
FROZEN_CONFIGS = {
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "p_tuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
    "lora_some": lambda: lora_config(target_modules=["q_proj", "v_proj"]),
}


@pytest.mark.parametrize("method", list(FROZEN_CONFIGS))
def test_frozen_4bit_bases_run_on_fastpeft(tiny_llama_dir, method):
    pytest.importorskip("bitsandbytes")
    compute_dtype = torch.bfloat16 if method == "prompt" else torch.float32  # bitsandbytes' compute dtype rule
    # one model, bitsandbytes first (a deep copy of 4-bit weights is not faithful); train mode so bitsandbytes
    # never repacks its weights for the CPU kernel
    base = load_tiny_llama_4bit(tiny_llama_dir, compute_dtype)
    device_map = getattr(base, "hf_device_map", None)
    if device_map is not None and set(device_map.values()) <= {"cpu", "disk"}:
        # PEFT's prefix tuning moves its cache to the first accelerator of hf_device_map and fails where it names
        # none: transformers 4 keeps device_map={"": "cpu"} there, 5 sets no map for a model on one device
        del base.hf_device_map
    model = peft.get_peft_model(base, FROZEN_CONFIGS[method]()).train()
    expected, ref_grads = _loss_and_grads(model, TOKENS[:2])
    summary = fastpeft.accelerate(model)
    frozen = [name for name, kind in summary.replaced.items() if kind == "nf4"]
    assert len(frozen) == (10 if method == "lora_some" else LAYERS) and not summary.skipped
    with _counting() as calls:
        out, grads = _loss_and_grads(model, TOKENS[:2])
    assert calls.count("frozen_4bit") == len(frozen)
    assert out.dtype == expected.dtype == torch.float32
    assert_rel_close(out, expected, dtype=compute_dtype)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert_rel_close(grads[name], ref_grads[name], tol=1e-4 if compute_dtype == torch.float32 else 2e-2)
    if method == "lora_some":  # the opt-out puts bitsandbytes' forward back, and keeps the LoRA layers fused
        summary = fastpeft.accelerate(model, frozen_4bit=False)
        assert set(summary.replaced.values()) == {"lora+nf4"}
        layer = model.base_model.model.model.layers[0].mlp.up_proj
        assert type(layer) is type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer)


def test_frozen_4bit_bitfit_bias_gradient():
    layer = bnb_linear4bit(64, 47, with_bias=True)
    model = Holder(layer).train()
    x = torch.randn(5, 64, requires_grad=True)
    dy = torch.randn(5, 47)
    expected = model.proj(x)
    ref_grads = torch.autograd.grad(expected, [x, layer.bias], dy)
    summary = fastpeft.accelerate(model)
    assert summary.replaced == {"proj": "nf4"}
    with _counting() as calls:
        out = model.proj(x)
    grads = torch.autograd.grad(out, [x, layer.bias], dy)
    assert calls == ["frozen_4bit"]
    assert_rel_close(out, expected)
    for grad, ref in zip(grads, ref_grads):
        assert_rel_close(grad, ref, tol=1e-4)
    assert fastpeft.restore(model) == 1 and type(model.proj).__name__ == "Linear4bit"


def test_prompt_tuning_without_4bit_layers_says_what_it_is(tiny_llama_dir):
    model = peft.get_peft_model(make_tiny_llama(), FROZEN_CONFIGS["prompt"]())
    with pytest.raises(ValueError, match="adapters \\(PROMPT_TUNING\\) add no adapted layers.*Nothing to accelerate"):
        fastpeft.accelerate(model)
    pytest.importorskip("bitsandbytes")
    model = peft.get_peft_model(load_tiny_llama_4bit(tiny_llama_dir), FROZEN_CONFIGS["prefix"]())
    with pytest.raises(ValueError, match="PREFIX_TUNING.*left on bitsandbytes by frozen_4bit=False"):
        fastpeft.accelerate(model, frozen_4bit=False)


# ---------------------------------------------------------------------------------------------- fan_in_fan_out
def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("kind", ["lora", "dora", "lora_bias", "ia3"])
def test_gpt2_conv1d_bases(kind):
    targets = ["c_attn", "c_proj", "c_fc"]  # every Conv1D of GPT-2 (weights stored (in, out))
    if kind == "ia3":
        config = peft.IA3Config(target_modules=targets, feedforward_modules=["c_fc"], fan_in_fan_out=True,
                                init_ia3_weights=False)
    else:
        config = lora_config(target_modules=targets, fan_in_fan_out=True, use_dora=kind == "dora",
                       lora_bias=kind == "lora_bias")
    theirs = peft.get_peft_model(_tiny_gpt2(), config)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.mul_(1.0 + 0.2 * torch.randn(param.shape)).add_(0.05 * torch.randn(param.shape))
    ours = copy.deepcopy(theirs)
    summary = fastpeft.accelerate(ours)
    assert len(summary.replaced) == 8 and not summary.skipped
    counted = {"dora": "dora_linear", "ia3": "ia3_linear"}.get(kind, "lora_linear")
    expected, ref_grads = _loss_and_grads(theirs.train())
    with _counting() as calls:
        out, grads = _loss_and_grads(ours.train())
    assert calls.count(counted) == 8
    assert_rel_close(out, expected)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert_rel_close(grads[name], ref_grads[name], tol=1e-4)


# ---------------------------------------------------------------------------------------------- AdaLoRA
def _adalora(tokens_steps: int):
    config = peft.AdaLoraConfig(init_r=6, target_r=3, tinit=1, tfinal=1, deltaT=1, total_step=tokens_steps,
                                lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
    model = peft.get_peft_model(make_tiny_llama(), config)
    with torch.no_grad():  # PEFT starts E at zero, which would hide a wrong A or B
        for name, param in model.named_parameters():
            if "lora_E" in name:
                param.normal_()
    return model


def test_adalora_trains_like_peft_step_by_step():
    steps = 4
    theirs = _adalora(steps)
    ours = copy.deepcopy(theirs)
    summary = fastpeft.accelerate(ours)
    assert set(summary.replaced.values()) == {"adalora"} and len(summary.replaced) == 6
    runs = []
    for model in (theirs, ours):
        model.train()
        # SGD: Adam's division by √v would blow fp32 rounding in near-zero gradients up to 1e-4 relative
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        torch.manual_seed(7)  # the same dropout masks in both runs
        losses, calls_per_step = [], []
        for step in range(steps):
            with _counting() as calls:
                loss = model(TOKENS[:2], labels=TOKENS[:2]).loss  # + AdaLoRA's orthogonality penalty
            loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step)  # masks the lowest-importance singular values in E
            optimizer.zero_grad()
            losses.append(loss.detach())
            calls_per_step.append(calls.count("lora_linear"))
        runs.append((losses, calls_per_step, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (ref_losses, _, ref_params), (losses, calls_per_step, params) = runs
    assert calls_per_step == [6] * steps
    for loss, ref_loss in zip(losses, ref_losses):
        assert_rel_close(loss, ref_loss)
    masked = [n for n, p in ref_params.items() if "lora_E" in n and (p == 0).any()]
    assert masked  # the rank allocator did prune
    for name, ref in ref_params.items():
        assert_rel_close(params[name], ref, tol=1e-4)


def test_adalora_4bit_matches_peft(tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    config = peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(load_tiny_llama_4bit(tiny_llama_dir), config).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_E" in name:
                param.normal_()
    expected, ref_grads = _loss_and_grads(model, TOKENS[:2])
    summary = fastpeft.accelerate(model)
    assert set(summary.replaced.values()) == {"adalora+nf4", "nf4"}
    with _counting() as calls:
        out, grads = _loss_and_grads(model, TOKENS[:2])
    assert calls.count("lora_linear") == 4
    assert_rel_close(out, expected)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert_rel_close(grads[name], ref_grads[name], tol=1e-4)
