"""The classes accelerated layers run under (fastpeft.integration.layer_classes): PEFT's repr and class name,
pickled as PEFT's and bitsandbytes' own classes, kept by deepcopy."""

import copy

import pytest
import torch

import fastpeft
import fastpeft.integration.layer_classes

from conftest import load_tiny_llama_4bit, lora_config, peft_model

peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def test_repr_is_peft():
    theirs = peft_model(lora_config(target_modules=["q_proj"], use_dora=True))
    ours = copy.deepcopy(theirs)
    fastpeft.accelerate(ours)
    assert repr(ours) == repr(theirs)
    assert type(ours.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


@pytest.mark.parametrize("unload", ["merge_and_unload", "unload", "none"])
def test_an_accelerated_or_unloaded_4bit_model_pickles_as_peft_and_bitsandbytes_classes(tiny_llama_dir, unload):
    """torch.save of an accelerated 4-bit PEFT model, and of what merge_and_unload() / unload() return, writes PEFT's
    and bitsandbytes' own classes (a file that loads without fastpeft's runtime classes), with the same outputs;
    deepcopy keeps the accelerated classes."""
    import io

    bnb = pytest.importorskip("bitsandbytes")
    model = peft_model(lora_config(target_modules=["q_proj", "down_proj"]),
                       load_tiny_llama_4bit(tiny_llama_dir)).train()
    fastpeft.accelerate(model)
    if unload != "none":
        model = getattr(model, unload)()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not any(type(m).__module__ == fastpeft.integration.layer_classes.__name__ for m in loaded.modules())
    assert sum(type(m) is bnb.nn.Linear4bit for m in loaded.modules()) == 14
    assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)
    copied = copy.deepcopy(model)
    assert [type(m) for m in copied.modules()] == [type(m) for m in model.modules()]
