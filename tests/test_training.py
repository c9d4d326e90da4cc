"""examples/train_tiny_llama.py in CI: a few training steps on the tiny Llama (dense and 4-bit) with the plain
loop and with Hugging Face's Trainer; the loss falls and every step equals PEFT's unaccelerated run from the
same seed (fastpeft.accelerate on a PEFT model, and fastpeft's own layers loaded from PEFT's initial adapter)."""


import pytest
import torch

import fastpeft

from conftest import load_example, load_tiny_llama_4bit, make_tiny_llama

peft = pytest.importorskip("peft")

example = load_example("train_tiny_llama")

STEPS = 4


def _base(quantize_4bit, tiny_llama_dir):
    # train mode throughout: bitsandbytes' eval-mode CPU path repacks 4-bit weights
    return (load_tiny_llama_4bit(tiny_llama_dir) if quantize_4bit else make_tiny_llama()).train()


def _run(mode, quantize_4bit, tiny_llama_dir, dropout=0.1, optim="adamw", use_dora=False):
    model = example.add_adapter(_base(quantize_4bit, tiny_llama_dir), mode, r=4, dropout=dropout, use_dora=use_dora)
    torch.manual_seed(1)  # the dropout masks
    return example.train_loop(model, example.counting_batches(STEPS),
                              example.make_optimizer(model.parameters(), optim)), model


def _assert_same_run(losses, ref_losses, rtol=1e-4):
    assert len(losses) == len(ref_losses) == STEPS
    assert losses[-1] < losses[0] - 0.05, f"the loss did not fall: {losses}"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=rtol, atol=0)


@pytest.mark.parametrize("quantize_4bit", [False, True], ids=["dense", "4bit"])
def test_plain_loop_matches_peft(quantize_4bit, tiny_llama_dir):
    if quantize_4bit:
        pytest.importorskip("bitsandbytes")
    ref_losses, ref_model = _run("peft", quantize_4bit, tiny_llama_dir)
    losses, model = _run("accelerate", quantize_4bit, tiny_llama_dir)
    _assert_same_run(losses, ref_losses)
    ref_params = {n: p for n, p in ref_model.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, ref_params[name], rtol=1e-3, atol=1e-5)


def test_dora_loop_matches_peft(tiny_llama_dir):
    ref_losses, _ = _run("peft", False, tiny_llama_dir, use_dora=True)
    losses, _ = _run("accelerate", False, tiny_llama_dir, use_dora=True)
    _assert_same_run(losses, ref_losses)


def test_native_layers_train_like_peft(tmp_path, tiny_llama_dir):
    # fastpeft's own layers (no peft), loaded from the PEFT adapter the baseline starts from
    ref_model = example.add_adapter(make_tiny_llama().train(), "peft", r=4, dropout=0.1)
    ref_model.save_pretrained(tmp_path)
    ours = make_tiny_llama().train()
    fastpeft.load_model_adapter(ours, tmp_path)
    batches = example.counting_batches(STEPS)
    torch.manual_seed(1)
    ref_losses = example.train_loop(ref_model, batches, example.make_optimizer(ref_model.parameters()))
    torch.manual_seed(1)
    _assert_same_run(example.train_loop(ours, batches, example.make_optimizer(ours.parameters())), ref_losses)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_trainer_matches_peft(tmp_path, tiny_llama_dir, bf16):
    runs = []
    for mode in ("peft", "accelerate"):
        model = example.add_adapter(make_tiny_llama(), mode, r=4, dropout=0.1)
        runs.append(example.train_with_trainer(model, example.counting_batches(STEPS), str(tmp_path / mode),
                                               bf16=bf16))
    # bf16 autocast: the gradients agree at bf16's precision (fastpeft's products round differently from PEFT's
    # chain of bf16 ops); after 4 steps the losses agree to ~3e-4, as close to the fp32 run as PEFT's bf16 run is
    _assert_same_run(runs[1], runs[0], rtol=2e-3 if bf16 else 1e-4)
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=0)  # the same forward


def test_bitsandbytes_8bit_optimizers(tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    # bitsandbytes keeps tensors under 4096 values in 32-bit state, and pages only on CUDA: on this tiny
    # model the point is that its optimizers take fastpeft's (PEFT's own) parameters and train the same
    for optim in ("adamw8bit", "paged_adamw8bit"):
        ref_losses, _ = _run("peft", False, tiny_llama_dir, optim=optim)
        losses, _ = _run("accelerate", False, tiny_llama_dir, optim=optim)
        _assert_same_run(losses, ref_losses)


def test_the_example_4bit_model_keeps_its_dense_layers_in_float32(tmp_path):
    """The example's 4-bit tiny Llama computes in fp32 (its docstring): embeddings, norms and lm_head stay float32
    under every supported transformers (4.x would load them in float16 under a BitsAndBytesConfig unless told)."""
    pytest.importorskip("bitsandbytes")
    model = example.tiny_llama(quantize_4bit=True, workdir=str(tmp_path))
    dense = {name: p.dtype for name, p in model.named_parameters() if p.is_floating_point()}
    assert dense and set(dense.values()) == {torch.float32}, dense
