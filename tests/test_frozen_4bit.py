"""bitsandbytes 4-bit layers on fastpeft's NF4 op under an accelerated PEFT model (fastpeft.integration.frozen_4bit):
the calls bitsandbytes multiplies with its own CPU kernel run that kernel, bit for bit, with the input gradient it
lacks; the others run fastpeft's op."""

import pytest
import torch

import fastpeft
import fastpeft.integration.frozen_4bit

from conftest import (assert_rel_close, counting_fused_ops, load_tiny_llama_4bit, lora_config, peft_model,
                      set_bnb_cpu_kernel_check)

peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _peft_4bit_lora(path):
    """A PEFT LoRA model (q_proj, down_proj; the other linear layers frozen 4-bit) over the tiny Llama in 4 bits,
    in eval mode; the same adapter weights at every call."""
    torch.manual_seed(5)
    return peft_model(lora_config(target_modules=["q_proj", "down_proj"]), load_tiny_llama_4bit(path)).eval()


def _4bit_layers(model) -> list:
    import bitsandbytes

    return [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]


def _repacked(layer) -> bool:
    return getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.parametrize("kernel_check", [False, True], ids=["check_off", "check_on"])
def test_4bit_eval_calls_follow_bitsandbytes_cpu_kernel_check(tiny_llama_dir, monkeypatch, kernel_check):
    """bitsandbytes' feature check (AVX512-BF16) forced each way, so both paths run on every host. On: its
    eval-mode no-grad forward repacks each 4-bit layer and multiplies with its own CPU kernel (bf16), so those are
    PEFT's numbers, and the accelerated model runs bitsandbytes' forward for such calls, bit for bit, whether the
    repack happened before ``accelerate`` or after (``late``: a forward ran first). Off: the exact NF4 product
    on both sides, fused, and nothing is repacked."""
    set_bnb_cpu_kernel_check(monkeypatch, kernel_check)
    theirs, ours, late = (_peft_4bit_lora(tiny_llama_dir) for _ in range(3))
    assert all(layer.support_avx512bf16_for_cpu == kernel_check for layer in _4bit_layers(ours))
    summary = fastpeft.accelerate(ours)
    frozen_calls = []
    frozen_4bit_linear = fastpeft.integration.frozen_4bit.frozen_4bit_linear
    monkeypatch.setattr(fastpeft.integration.frozen_4bit, "frozen_4bit_linear",
                        lambda layer, x: frozen_calls.append(layer) or frozen_4bit_linear(layer, x))
    with torch.no_grad():
        expected = theirs(TOKENS).logits
        late(TOKENS)
        late_summary = fastpeft.accelerate(late)
        assert late_summary.replaced == summary.replaced and not late_summary.skipped
        with counting_fused_ops() as calls:
            out, late_out = ours(TOKENS).logits, late(TOKENS).logits
    layers = _4bit_layers(ours) + _4bit_layers(late)
    if kernel_check:
        assert torch.equal(out, expected) and torch.equal(late_out, expected)
        assert not calls and not frozen_calls and all(_repacked(layer) for layer in layers)
    else:
        assert_rel_close(out, expected)
        assert torch.equal(late_out, out)
        assert len(calls) == 2 * 4 and len(frozen_calls) == 2 * 10 and not any(_repacked(layer) for layer in layers)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_training_over_a_layer_bitsandbytes_repacked_gets_the_input_gradient(bnb_cpu_kernel_on, with_bias):
    """After an eval pass has repacked a 4-bit layer (bitsandbytes' check on), bitsandbytes multiplies every CPU
    call with its kernel, which has no backward: PEFT's training forward then gives the input no gradient through
    the base (or raises, with a bias). The accelerated layer gives that kernel's output, bit for bit, and the
    exact gradient of the weight the layer holds (its repacked layout read bit for bit)."""
    from conftest import Holder, bnb_linear4bit

    model = peft.get_peft_model(Holder(bnb_linear4bit(128, 64, with_bias)),
                                lora_config(target_modules=["proj"], lora_dropout=0.0))
    fastpeft.accelerate(model)
    layer = model.base_model.model.proj
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        layer.eval()(x)
    base = layer.get_base_layer()
    assert _repacked(base)
    with torch.no_grad():
        expected = layer(x)
    x_leaf = x.clone().requires_grad_()
    y = layer.train()(x_leaf)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.equal(y.detach(), expected)
    weight = fastpeft.NF4Weight.from_bnb(base).dequantize(torch.float64)
    lora_a, lora_b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    scaling = layer.scaling["default"]
    dy64 = dy.double()
    assert_rel_close(x_leaf.grad, dy64 @ weight + scaling * (dy64 @ lora_b) @ lora_a)
    h = x.double() @ lora_a.t()
    assert_rel_close(layer.lora_B["default"].weight.grad,
                     scaling * dy64.reshape(-1, 64).t() @ h.reshape(-1, lora_a.shape[0]))
