"""fastpeft.inject without peft on the tiny Llama: target matching ("all-linear" leaves lm_head out), trainable
parameters, dense and 4-bit bases, and every bad input a clear error."""

import pytest
import torch

import fastpeft
from fastpeft.nn import DoraLinear, LoraLinear

from conftest import assert_rel_close, load_tiny_llama_4bit, make_tiny_llama

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def test_inject_all_linear():
    model = make_tiny_llama()
    summary = fastpeft.inject(model, r=4, alpha=8)
    assert len(summary.replaced) == 14 and not summary.skipped
    assert not any("lm_head" in name for name in summary.replaced)
    assert isinstance(model.model.layers[1].mlp.down_proj, LoraLinear) and type(model.lm_head) is torch.nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    # B = 0 at init: the model computes what it did
    assert_rel_close(model(TOKENS).logits, make_tiny_llama()(TOKENS).logits)


def test_inject_targets_and_trainable_count(capsys):
    model = make_tiny_llama()
    summary = fastpeft.inject(model, r=2, target_modules=["q_proj", "v_proj"], use_dora=True)
    assert sorted(summary.replaced) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert all(isinstance(model.get_submodule(n), DoraLinear) for n in summary.replaced)
    fastpeft.print_trainable_parameters(model)
    # per layer: A (2x64) + B (out x 2) + magnitude (out); q_proj out 64, v_proj out 32
    expected = 2 * ((2 * 64 + 64 * 2 + 64) + (2 * 64 + 32 * 2 + 32))
    trainable, total = fastpeft.trainable_parameters(model)
    assert trainable == expected
    assert f"trainable params: {expected:,d} || all params: {total:,d}" in capsys.readouterr().out
    regex = fastpeft.inject(make_tiny_llama(), target_modules=r".*\.0\.mlp\.(up|down)_proj")
    assert sorted(regex.replaced) == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"]


def test_inject_4bit(tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    model = load_tiny_llama_4bit(tiny_llama_dir).train()
    summary = fastpeft.inject(model, r=4, init_lora_weights=False)
    assert set(summary.replaced.values()) == {"lora+nf4"}
    model(TOKENS, labels=TOKENS).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.lora_A.grad.abs().sum() > 0


def test_inject_bad_inputs():
    with pytest.raises(ValueError, match=r"matched no linear layer.*'q_proj'"):
        fastpeft.inject(make_tiny_llama(), target_modules=["qproj"])
    with pytest.raises(ValueError, match="target_modules is empty"):
        fastpeft.inject(make_tiny_llama(), target_modules=[])
    model = make_tiny_llama()
    summary = fastpeft.inject(model, target_modules=["embed_tokens", "q_proj"])
    assert summary.skipped == {
        "model.embed_tokens": "Embedding is not a float torch.nn.Linear or bitsandbytes Linear4bit"}
    with pytest.raises(ValueError, match="already has fastpeft adapter layers"):
        fastpeft.inject(model)
    with pytest.raises(ValueError, match="r must be a positive int"):
        fastpeft.inject(make_tiny_llama(), r=0)


def test_inject_refuses_a_peft_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="use fastpeft.accelerate"):
        fastpeft.inject(model)


def test_forward_dtype_and_device_mismatch():
    model = make_tiny_llama()
    fastpeft.inject(model, r=4, target_modules=["q_proj"])
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="x is on meta, the weight on cpu"):
        layer(torch.empty(3, 64, device="meta"))
    with pytest.raises(TypeError, match="x dtype must be floating point, got torch.int64"):
        layer(torch.ones(3, 64, dtype=torch.long))
    # a half-precision input is computed in its own dtype, as documented for the ops
    assert layer(torch.randn(3, 64).half()).dtype == torch.float16
