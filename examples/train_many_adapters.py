"""A rank sweep in one run: 8 LoRA adapters (ranks 1 to 32) trained at once over one frozen tiny Llama, in mixed
batches, each saved in PEFT's format — on CPU, in seconds.

``fastpeft.train_adapters`` makes the adapters trainable and gives one optimizer parameter group per adapter (its own
learning rate here: ``lr / sqrt(r)``); every batch holds rows of every adapter, ``adapter_names`` saying which row
trains which. Each adapter gets exactly the gradient of its own rows' loss, as if PEFT trained it alone on them::

    python examples/train_many_adapters.py --steps 20 --out sweep/
    python examples/train_many_adapters.py --4bit             # the base in bitsandbytes NF4 (QLoRA)

Each ``sweep/r<rank>/`` then loads with ``peft.PeftModel.from_pretrained(base_model, "sweep/r<rank>")``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

import fastpeft

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tiny_llama import counting_batches, tiny_llama  # noqa: E402

RANKS = (1, 2, 4, 8, 12, 16, 24, 32)


def sweep_model(base, ranks=RANKS, dropout: float = 0.05, seed: int = 0):
    """``base`` with one LoRA adapter ``r<rank>`` per rank on every linear layer but ``lm_head`` (alpha = 2r)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    configs = {f"r{r}": LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules="all-linear",
                                   task_type="CAUSAL_LM") for r in ranks}
    names = list(configs)
    model = get_peft_model(base, configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    return model, names


def train(model, names, steps: int, rows_per_adapter: int = 2, lr: float = 2e-2, seed: int = 0) -> list:
    """``steps`` optimizer steps over batches of ``rows_per_adapter`` rows per adapter; each step's per-adapter
    losses (``{name: float}``)."""
    groups = fastpeft.train_adapters(model, names, lr={n: lr / math.sqrt(int(n[1:])) for n in names},
                                     weight_decay=0.0, dropout_seeds={n: seed + k for k, n in enumerate(names)})
    optimizer = torch.optim.AdamW(groups)
    row_names = [name for name in names for _ in range(rows_per_adapter)]
    model.train()
    history = []
    for input_ids in counting_batches(steps, batch_size=len(row_names), seed=seed):
        out = model(input_ids=input_ids, labels=input_ids, adapter_names=row_names)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({name: loss.item() for name, loss in out.adapter_losses.items()})
    return history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--rows", type=int, default=2, help="rows per adapter in each batch")
    parser.add_argument("--4bit", dest="quantize_4bit", action="store_true", help="NF4 base through bitsandbytes")
    parser.add_argument("--out", default="sweep", help="folder for the adapters (one subfolder each)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the adapters and the data")
    args = parser.parse_args(argv)

    model, names = sweep_model(tiny_llama(args.quantize_4bit, args.seed).train(), seed=args.seed)
    history = train(model, names, args.steps, args.rows, seed=args.seed)
    print("adapter  loss at step 1 -> step", args.steps)
    for name in names:
        print(f"{name:>7}  {history[0][name]:.4f} -> {history[-1][name]:.4f}")
    model.save_pretrained(args.out)  # PEFT's format: <out>/<adapter>/adapter_config.json + adapter_model.safetensors
    print(f"saved {len(names)} adapters under {args.out}/")


if __name__ == "__main__":
    main()
