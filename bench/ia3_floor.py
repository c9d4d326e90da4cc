"""What being a layer costs at M = 1 on CPU: the IA3 micro case's layers against the bare reference function, measured
as ``bench/check_cpu.py`` measures (rounds of turns call by call in rotating order, the median of per-round ratios).

``python -m bench.ia3_floor [--rounds 41] [--m 1] [--mode fwd|fwd_bwd]`` (from the repository root, best with
``OMP_NUM_THREADS=1``) prints, for each micro shape of the cpu suite, each one's ratio to the bare function:

- ``bare-function``: ``reference.ia3_linear(x, W, None, l, False)`` called directly (ratio 1);
- ``thinnest-module``: an ``nn.Module`` whose forward is ``F.linear(x, W) * l`` on its own parameters read from
  ``_parameters`` (no checks, no plan): what any layer pays to be called;
- ``reference``: the bench's reference layer (``fastpeft.bench.cases._ReferenceIA3``: the reference function in a
  layer reading its tensors as attributes, as a layer is usually written), what the check holds IA3Linear to;
- ``fastpeft``: ``IA3Linear``.

Every implementation reads the same weight tensor (``fastpeft.bench.cases`` shares it). CPU wall clock of PyTorch
code: ratios of this host, never kernel performance.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class _Thinnest(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.ia3_l = nn.Parameter(scale.detach().clone())

    def forward(self, x):
        params = self._parameters
        return F.linear(x, params["weight"]) * params["ia3_l"]


def _job(name: str, mode: str, m: int, out_f: int, in_f: int, shape: dict, bare: bool = False):
    """The thinnest module, or (``bare``) the reference function called directly, over the case's shared weights."""
    from fastpeft import reference
    from fastpeft.bench import cases

    def setup(cfg):
        w = cases._weights(cfg, out_f, in_f)
        layer = _Thinnest(w.weight, w.ia3_scale)
        forward = layer
        if bare:
            weight, scale = layer.weight, layer.ia3_l

            def forward(x):
                return reference.ia3_linear(x, weight, None, scale, False)
        return cases.Prepared(cases._timed_call(cfg, forward, m, in_f, out_f, mode, [layer.ia3_l]))
    return cases.Job(f"ia3.{mode}", name, shape, setup)


def main(argv: Optional[list] = None) -> int:
    from fastpeft.bench import cases
    from fastpeft.bench.__main__ import build_parser, make_config
    from fastpeft.bench.timing import ratio

    from .check_cpu import measure_group

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--mode", choices=("fwd", "fwd_bwd"), default="fwd")
    args = parser.parse_args(argv)
    cfg = make_config(build_parser().parse_args(["--suite", "cpu", "--device", "cpu", "--repeats", str(args.rounds)]))
    print(f"IA3 {args.mode}, M = {args.m}, {args.rounds} interleaved rounds, torch threads {torch.get_num_threads()}: "
          "median per-round time ratio to the bare reference function")
    for out_f, in_f in cfg.micro_features:
        shape = {"M": args.m, "out": out_f, "in": in_f, "r": cfg.rank}
        jobs = [_job("bare-function", args.mode, args.m, out_f, in_f, shape, bare=True),
                _job("thinnest-module", args.mode, args.m, out_f, in_f, shape)]
        jobs += [cases.Job(f"ia3.{args.mode}", impl, shape, cases._micro_ia3(args.mode, impl, args.m, out_f, in_f))
                 for impl in ("reference", "fastpeft")]
        samples, _ = measure_group(jobs, cfg)
        print(f"  {out_f}x{in_f}: " + ", ".join(f"{label} {ratio(s, samples['bare-function']):.3f}"
                                              for label, s in samples.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
