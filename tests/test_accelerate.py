"""fastpeft.accelerate / restore on PEFT models (tiny Llama, fp32 CPU): same outputs and gradients as PEFT,
same Parameter objects and state-dict keys, PEFT's save_pretrained / set_adapter / merge_and_unload /
disable_adapter still working, unsupported layers reported, bad inputs refused clearly."""

import copy
import logging

import pytest
import torch

import fastpeft
from fastpeft import PatchSummary
from fastpeft.integration.layer_classes import is_accelerated

from conftest import (assert_rel_close, counting_fused_ops, load_tiny_llama_4bit, lora_config, loss_and_grads,
                      make_tiny_llama, peft_model)

peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _nonzero_dora_magnitudes(model):
    # PEFT initialises the magnitude to ‖W‖, which would hide a magnitude that is ignored
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name or "ia3_l" in name:
                param.mul_(1.0 + 0.1 * torch.randn(param.shape))


def _assert_matches_peft(config, model=None):
    # one model, PEFT's forward first, then accelerated (a deep copy of bitsandbytes' 4-bit weights is not
    # faithful); train mode (no dropout here) so bitsandbytes never repacks 4-bit weights for its CPU kernel
    model = peft_model(config, model).train()
    _nonzero_dora_magnitudes(model)
    ref_out, ref_grads = loss_and_grads(model, TOKENS)
    summary = fastpeft.accelerate(model)
    with counting_fused_ops() as calls:
        out, grads = loss_and_grads(model, TOKENS)
    assert len(calls) == len(summary.replaced)
    assert_rel_close(out, ref_out)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert_rel_close(grads[name], ref_grads[name], tol=1e-4)
    return summary, model


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_accelerate_matches_peft_dense(kind):
    if kind == "ia3":
        config = peft.IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                init_ia3_weights=False)
    else:
        config = lora_config(use_dora=kind == "dora", lora_dropout=0.0)
    summary, ours = _assert_matches_peft(config)
    assert set(summary.replaced.values()) == {kind} and not summary.skipped
    assert len(summary.replaced) == (14 if kind != "ia3" else 6)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert is_accelerated(layer) and isinstance(layer, peft.tuners.tuners_utils.BaseTunerLayer)


@pytest.mark.parametrize("use_dora", [False, True])
def test_accelerate_matches_peft_4bit(tiny_llama_dir, use_dora):
    pytest.importorskip("bitsandbytes")
    summary, _ = _assert_matches_peft(lora_config(use_dora=use_dora), load_tiny_llama_4bit(tiny_llama_dir))
    assert set(summary.replaced.values()) == {("dora" if use_dora else "lora") + "+nf4"}


def test_accelerate_keeps_parameters_keys_and_saved_adapter(tmp_path):
    model = peft_model(lora_config())
    params = list(model.parameters())
    state = model.state_dict()
    model.save_pretrained(tmp_path / "before")
    fastpeft.accelerate(model)
    assert all(a is b for a, b in zip(params, model.parameters())) and len(params) == len(list(model.parameters()))
    after = model.state_dict()
    assert list(after) == list(state) and all(after[k] is state[k] or torch.equal(after[k], state[k]) for k in state)
    model.save_pretrained(tmp_path / "after")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes()
    # an optimizer built before accelerate trains the accelerated model
    model.train()
    optimizer = torch.optim.SGD([p for p in params if p.requires_grad], lr=0.1)
    lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    before = lora_b.detach().clone()
    model(TOKENS, labels=TOKENS).loss.backward()
    optimizer.step()
    assert not torch.equal(before, lora_b.detach())


def test_set_adapter_load_adapter_and_disable(tmp_path):
    theirs = peft_model(lora_config())
    theirs.add_adapter("second", lora_config(r=2))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "second" in name:
                param.normal_()
    ours = copy.deepcopy(theirs)
    fastpeft.accelerate(ours)
    for adapter in ("second", "default"):
        theirs.set_adapter(adapter)
        ours.set_adapter(adapter)
        assert_rel_close(ours(TOKENS).logits, theirs(TOKENS).logits)
    with ours.disable_adapter(), theirs.disable_adapter():
        assert_rel_close(ours(TOKENS).logits, theirs(TOKENS).logits)
    # an adapter loaded after accelerate runs on fastpeft too (the forward reads PEFT's state per call)
    theirs.save_pretrained(tmp_path)  # writes "default" at the root, "second" under second/
    ours.load_adapter(tmp_path / "second", adapter_name="third")
    ours.set_adapter("third")
    theirs.set_adapter("second")
    with counting_fused_ops() as calls:
        assert_rel_close(ours(TOKENS).logits, theirs(TOKENS).logits)
    assert len(calls) == 14


def test_merge_and_unload_and_restore():
    theirs = peft_model(lora_config())
    ours = copy.deepcopy(theirs)
    fastpeft.accelerate(ours)
    assert fastpeft.accelerate(ours).replaced  # idempotent
    expected = theirs(TOKENS).logits
    layer = ours.base_model.model.model.layers[1].mlp.up_proj
    assert fastpeft.restore(ours) == 14
    assert type(layer) is peft.tuners.lora.Linear
    with pytest.raises(ValueError, match="no layer of this model was accelerated"):
        fastpeft.restore(ours)
    fastpeft.accelerate(ours)
    merged = ours.merge_and_unload()
    assert type(merged.model.layers[1].mlp.up_proj) is torch.nn.Linear
    assert_rel_close(merged(TOKENS).logits, expected)


def test_unsupported_layers_are_reported(caplog):
    model = peft_model(peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False))
    with caplog.at_level(logging.WARNING, logger="fastpeft"):
        summary = fastpeft.accelerate(model)
    assert isinstance(summary, PatchSummary)
    assert list(summary.skipped) == ["base_model.model.model.embed_tokens"]
    assert "Embedding" in summary.skipped["base_model.model.model.embed_tokens"]
    assert len(summary.replaced) == 2 and "skipped base_model.model.model.embed_tokens" in caplog.text
    assert type(model.base_model.model.model.embed_tokens) is peft.tuners.lora.Embedding


def test_model_without_adapters_is_refused():
    with pytest.raises(ValueError, match="no PEFT adapter layers.*fastpeft.inject"):
        fastpeft.accelerate(make_tiny_llama())


def test_device_mismatch_is_a_clear_error():
    model = peft_model(lora_config(target_modules=["q_proj"]))
    fastpeft.accelerate(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="x is on meta, the weight on cpu"):
        layer(torch.empty(2, 64, device="meta"))


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_accelerated_layer_on_triton_kernels(triton_backend, tiny_llama_dir, nf4):
    # the Triton kernels (interpreter on CPU) behind an accelerated layer, against PEFT's forward on it
    if nf4:
        pytest.importorskip("bitsandbytes")
    base = load_tiny_llama_4bit(tiny_llama_dir) if nf4 else make_tiny_llama()
    model = peft_model(lora_config(target_modules=["v_proj"], use_dora=not nf4), base).train()
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    x = torch.randn(7, 64, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *params])
    fastpeft.accelerate(model)
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    assert_rel_close(out, ref)
    for g, g_ref in zip(grads, ref_grads):
        assert_rel_close(g, g_ref, tol=1e-4)
