"""What fastpeft.accelerate reports (fastpeft.integration.summary.PatchSummary): the layers it counts on fastpeft's
ops are those whose calls run them."""

import pytest
import torch

import fastpeft

from conftest import counting_fused_ops, load_tiny_llama_4bit, lora_config, loss_and_grads, peft_model

peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
def test_the_summary_counts_what_runs_on_fastpeft_ops(tiny_llama_dir, compute_dtype):
    """bnb_4bit_compute_dtype=bfloat16 on an fp32 model: the adapted 4-bit layers run PEFT's forward at every call,
    so the summary does not count them on fastpeft ops and says why (the frozen 4-bit layers do run fastpeft's NF4
    op); with fp32 compute every switched layer counts."""
    model = peft_model(lora_config(target_modules=["q_proj", "down_proj"]),
                        load_tiny_llama_4bit(tiny_llama_dir, compute_dtype)).train()
    summary = fastpeft.accelerate(model)
    adapted = {name for name, kind in summary.replaced.items() if kind == "lora+nf4"}
    assert len(adapted) == 4 and len(summary.replaced) == 14
    if compute_dtype == torch.float32:
        assert not summary.unfused and str(summary).startswith("fastpeft: 14 layers on fastpeft ops (4 lora+nf4, 10 nf4)")
        return
    assert set(summary.unfused) == adapted
    text = str(summary)
    assert text.startswith("fastpeft: 10 layers on fastpeft ops (10 nf4); 4 switched but running PEFT's forward")
    assert "computes the 4-bit base in torch.bfloat16" in text and "activations are torch.float32" in text
    with counting_fused_ops() as calls:
        loss_and_grads(model, TOKENS)
    assert not calls  # what the summary says: no fused call on those layers
