"""TRL's SFTTrainer given a peft_config on the tiny Llama (examples/train_tiny_llama.py --trl): after
fastpeft.accelerate on the model the trainer made, every step's loss is PEFT's own run's, in fp32 and in bf16
autocast (TRL's default gradient checkpointing on)."""

import pytest
import torch

from conftest import load_example, make_tiny_llama

pytest.importorskip("trl", reason="TRL is not installed: pip install -e '.[trl]'")
pytest.importorskip("peft")

example = load_example("train_tiny_llama")

STEPS = 4


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_sft_trainer_with_peft_config_matches_peft(tmp_path, capsys, bf16):
    runs = {}
    for accelerate in (False, True):
        runs[accelerate] = example.train_with_sft_trainer(make_tiny_llama().train(), example.counting_batches(STEPS),
                                                          str(tmp_path / str(accelerate)), accelerate=accelerate, r=4,
                                                          dropout=0.1, bf16=bf16)
    assert "fastpeft: 14 layers on fastpeft ops (14 lora)" in capsys.readouterr().out
    losses, ref_losses = runs[True], runs[False]
    assert len(losses) == len(ref_losses) == STEPS
    assert losses[-1] < losses[0] - 0.05, f"the loss did not fall: {losses}"
    torch.testing.assert_close(losses[0], ref_losses[0], rtol=1e-5, atol=0)  # the same forward
    # bf16: fastpeft's products round differently from PEFT's chain of bf16 ops, so the gradients differ at bf16's
    # precision; the losses after 4 steps agree to 2-4e-4, as close to the fp32 run as PEFT's own bf16 run is
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-3 if bf16 else 1e-5, atol=0)
