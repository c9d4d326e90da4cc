"""DiffPruning on a tiny, randomly initialised Llama with fastpeft — on CPU, in seconds.

The paper's workflow end to end: inject the gated diffs, train them with the expected-L0 penalty, project to the
target sparsity (the fraction of diff entries kept), fine-tune the kept values with the mask fixed, save the sparse
diff, load it into a fresh base model and check that it gives the same logits::

    python examples/diffprune_tiny_llama.py
    python examples/diffprune_tiny_llama.py --4bit --sparsity 0.02 --structured

The model and data are ``examples/train_tiny_llama.py``'s (one batch of counting sequences, seen again and again).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

import fastpeft
from fastpeft import diffprune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tiny_llama import counting_batches, tiny_llama  # noqa: E402


def train(model, batches, lr: float, penalty: bool) -> list:
    """AdamW over the model's trainable parameters, one step per batch; the task loss of each step (the L0 penalty
    added to what is minimised when ``penalty``)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for input_ids in batches:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        (loss + diffprune.l0_penalty(model) if penalty else loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def logits(model, input_ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--4bit", dest="quantize_4bit", action="store_true", help="NF4 base through bitsandbytes")
    parser.add_argument("--sparsity", type=float, default=0.01, help="fraction of the diff's entries kept")
    parser.add_argument("--structured", action="store_true", help="a group gate per weight matrix too")
    parser.add_argument("--l0-lambda", type=float, default=1e-4, help="weight of the expected-L0 penalty")
    parser.add_argument("--steps", type=int, default=20, help="training steps before the projection")
    parser.add_argument("--fine-tune-steps", type=int, default=10, help="steps after it, the mask fixed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as workdir:
        model = tiny_llama(args.quantize_4bit, args.seed, os.path.join(workdir, "base"))
        print(fastpeft.inject(model, method="diffprune", sparsity=args.sparsity, structured=args.structured,
                              l0_lambda=args.l0_lambda))
        fastpeft.print_trainable_parameters(model)
        losses = train(model, counting_batches(args.steps, seed=args.seed), lr=1e-2, penalty=True)
        print(f"training: loss {losses[0]:.4f} -> {losses[-1]:.4f}, expected nonzero diff entries "
              f"{diffprune.l0_penalty(model, l0_lambda=1.0).item():.0f}")

        kept = diffprune.project(model)
        total = sum(layer.in_features * layer.out_features for layer in diffprune.diffprune_layers(model).values())
        print(f"projection: {sum(kept.values())} of {total} diff entries kept "
              f"({100 * sum(kept.values()) / total:.3f} %)")
        losses = train(model, counting_batches(args.fine_tune_steps, seed=args.seed), lr=1e-2, penalty=False)
        print(f"fine-tune, mask fixed: loss {losses[0]:.4f} -> {losses[-1]:.4f}")

        path = os.path.join(workdir, "diff")
        diffprune.save(model, path)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        fresh = tiny_llama(args.quantize_4bit, args.seed, os.path.join(workdir, "base2"))
        diffprune.load(fresh, path, trainable=False)
        input_ids = counting_batches(1, seed=args.seed)[0]
        same = torch.equal(logits(fresh, input_ids), logits(model, input_ids))
        print(f"saved {size} bytes; reloaded into a fresh base: {'identical' if same else 'DIFFERENT'} logits")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
