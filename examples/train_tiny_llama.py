"""Train a LoRA adapter on a tiny, randomly initialised Llama with fastpeft — on CPU, in seconds.

Three ways to get the model, one training loop:

- ``--mode peft``: PEFT alone (the baseline);
- ``--mode accelerate``: the same PEFT model with ``fastpeft.accelerate(model)`` (one line);
- ``--mode inject``: no peft at all, ``fastpeft.inject(model, r=..., target_modules="all-linear")``.

``--4bit`` loads the base through bitsandbytes NF4 (QLoRA), ``--trainer`` trains with Hugging Face's
``Trainer`` instead of the plain loop, ``--trl`` with TRL's ``SFTTrainer`` given a ``peft_config`` (the trainer
makes the PEFT model; ``accelerate`` then switches it to fastpeft before training), ``--bf16`` runs either trainer
in bf16 autocast, ``--optim`` picks ``adamw`` or bitsandbytes' ``adamw8bit`` / ``paged_adamw8bit`` (bitsandbytes
falls back to unpaged on CPU). The data is a learnable toy task (each sequence counts up from a random start; one
batch repeated), so the loss visibly falls in a few steps::

    python examples/train_tiny_llama.py --mode accelerate --4bit --steps 5
    python examples/train_tiny_llama.py --mode accelerate --trl --bf16     # pip install trl

The functions are what ``tests/test_training.py`` and ``tests/test_trl.py`` run in CI against PEFT's
unaccelerated run.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import fastpeft


def tiny_llama(quantize_4bit: bool = False, seed: int = 0, workdir: str | None = None):
    """A freshly initialised 2-layer Llama (hidden 64, vocab 128); with ``quantize_4bit`` saved to
    ``workdir`` and reloaded through bitsandbytes NF4 with double quantisation and fp32 compute."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0)
    model = LlamaForCausalLM(config)
    if not quantize_4bit:
        return model
    workdir = workdir or tempfile.mkdtemp(prefix="tiny_llama_")
    model.save_pretrained(workdir)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    # dtype: the layers left dense stay float32 (transformers 4 would load them in float16 under a 4-bit config)
    return AutoModelForCausalLM.from_pretrained(workdir, quantization_config=quantization, dtype=torch.float32,
                                                device_map={"": "cpu"})


def add_adapter(model, mode: str, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, use_dora: bool = False,
                seed: int = 0):
    """The model with a LoRA adapter on every linear layer but ``lm_head``, the ``mode`` way; the
    adapter's initialisation is drawn from ``seed``."""
    torch.manual_seed(seed)
    if mode == "inject":
        print(fastpeft.inject(model, r=r, alpha=alpha, target_modules="all-linear", dropout=dropout,
                              use_dora=use_dora))
        return model
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=use_dora,
                                             target_modules="all-linear"))
    if mode == "accelerate":
        print(fastpeft.accelerate(model))
    return model


def counting_batches(steps: int, batch_size: int = 4, length: int = 16, vocab: int = 128, seed: int = 0):
    """``steps`` copies of one batch of token sequences that count up (mod ``vocab``) from random starts (one
    batch seen again and again, so that the loss falls at every step of a short run)."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(1, vocab, (batch_size, 1), generator=generator)
    return [(starts + torch.arange(length)) % vocab] * steps


def make_optimizer(params, name: str = "adamw", lr: float = 1e-2):
    params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    import bitsandbytes as bnb

    optimizers = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}
    if name not in optimizers:
        raise ValueError(f"unknown optimizer {name!r}: adamw, adamw8bit or paged_adamw8bit")
    return optimizers[name](params, lr=lr)


def train_loop(model, batches, optimizer) -> list[float]:
    """Plain PyTorch training: one optimizer step per batch; the loss of each step."""
    model.train()
    losses = []
    for input_ids in batches:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _training_arguments(batches, output_dir: str, lr: float, optim: str, seed: int, bf16: bool) -> dict:
    """What the two trainers' arguments share: a constant learning rate, one batch per step, a loss logged at each
    step, nothing saved or reported, CPU, ``bf16``: bf16 autocast."""
    return dict(output_dir=output_dir, max_steps=len(batches), per_device_train_batch_size=len(batches[0]),
                learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim=optim,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=seed, data_seed=seed,
                dataloader_num_workers=0, disable_tqdm=True, bf16=bf16)


def train_with_trainer(model, batches, output_dir: str, lr: float = 1e-2, optim: str = "adamw_torch",
                       seed: int = 0, bf16: bool = False) -> list[float]:
    """The same training through Hugging Face's ``Trainer`` (the batches in order; ``bf16``: in bf16 autocast);
    the logged loss of each step."""
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": ids, "labels": ids} for batch in batches for ids in batch]
    args = TrainingArguments(**_training_arguments(batches, output_dir, lr, optim, seed, bf16))
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=lambda items: {k: torch.stack([i[k] for i in items]) for k in items[0]})
    # the batches in the order given (the baseline and the accelerated run see the same data)
    trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(rows)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def tiny_tokenizer(vocab: int = 128):
    """A word-level tokenizer of the tiny Llama's vocabulary, built in memory: token ``i`` is the word ``t<i>``,
    ``t0`` the padding and end-of-sequence token (TRL's ``SFTTrainer`` tokenizes text and pads with it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", eos_token="t0", unk_token="t0")


def train_with_sft_trainer(model, batches, output_dir: str, accelerate: bool, r: int = 8, alpha: float = 16.0,
                           dropout: float = 0.0, lr: float = 1e-2, seed: int = 0, bf16: bool = False) -> list[float]:
    """TRL's ``SFTTrainer`` on the base ``model`` with a LoRA ``peft_config`` on every linear layer but
    ``lm_head``: the trainer makes the PEFT model, and with ``accelerate`` ``fastpeft.accelerate`` switches it to
    fastpeft's ops before training. The batches become a text dataset (``t<id>`` words) that the trainer tokenizes
    with :func:`tiny_tokenizer`; TRL's own defaults stand otherwise (gradient checkpointing on). ``bf16``: bf16
    autocast. The logged loss of each step."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    texts = [" ".join(f"t{int(i)}" for i in ids) for batch in batches for ids in batch]
    args = SFTConfig(**_training_arguments(batches, output_dir, lr, "adamw_torch", seed, bf16),
                     dataset_text_field="text", packing=False)
    peft_config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # the adapter's initialisation, drawn when the trainer makes the PEFT model
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tiny_tokenizer(), peft_config=peft_config)
    if accelerate:
        print(fastpeft.accelerate(trainer.model))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--mode", choices=["peft", "accelerate", "inject"], default="accelerate",
                        help="PEFT alone, PEFT + fastpeft.accelerate, or fastpeft.inject without peft")
    parser.add_argument("--4bit", dest="quantize_4bit", action="store_true", help="NF4 base through bitsandbytes")
    parser.add_argument("--dora", action="store_true", help="DoRA instead of LoRA")
    parser.add_argument("--trainer", action="store_true", help="train with transformers.Trainer")
    parser.add_argument("--trl", action="store_true", help="train with TRL's SFTTrainer given a peft_config")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (with --trainer or --trl)")
    parser.add_argument("--optim", choices=["adamw", "adamw8bit", "paged_adamw8bit"], default="adamw",
                        help="optimizer")
    parser.add_argument("--steps", type=int, default=5, help="training steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the adapter and the data")
    args = parser.parse_args(argv)
    if args.trl and (args.mode == "inject" or args.dora or args.trainer or args.optim != "adamw"):
        parser.error("--trl trains a PEFT LoRA adapter with AdamW: --mode peft or accelerate, no --dora, --trainer "
                     "or --optim")
    if args.bf16 and not (args.trainer or args.trl):
        parser.error("--bf16 needs --trainer or --trl")

    batches = counting_batches(args.steps, seed=args.seed)
    if args.trl:
        with tempfile.TemporaryDirectory() as output_dir:
            losses = train_with_sft_trainer(tiny_llama(args.quantize_4bit, args.seed), batches, output_dir,
                                            accelerate=args.mode == "accelerate", seed=args.seed, bf16=args.bf16)
    else:
        model = add_adapter(tiny_llama(args.quantize_4bit, args.seed), args.mode, use_dora=args.dora, seed=args.seed)
        fastpeft.print_trainable_parameters(model)
        if args.trainer:
            optim = {"adamw": "adamw_torch", "adamw8bit": "adamw_bnb_8bit", "paged_adamw8bit": "paged_adamw_8bit"}
            with tempfile.TemporaryDirectory() as output_dir:
                losses = train_with_trainer(model, batches, output_dir, optim=optim[args.optim], seed=args.seed,
                                            bf16=args.bf16)
        else:
            losses = train_loop(model, batches, make_optimizer(model.parameters(), args.optim))
    for step, loss in enumerate(losses, 1):
        print(f"step {step}: loss {loss:.4f}")


if __name__ == "__main__":
    main()
