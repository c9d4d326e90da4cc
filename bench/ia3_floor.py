"""What being a layer costs at M = 1 on CPU: the IA3 micro case's bare reference function against the thinnest
layers around the same product, measured as ``bench/check_cpu.py`` measures (interleaved rounds, rotating order, the
median of per-round ratios to the bare function).

``python -m bench.ia3_floor [--rounds 21] [--m 1] [--mode fwd|fwd_bwd]`` (from the repository root, best with
``OMP_NUM_THREADS=1``) prints, for each micro shape of the cpu suite:

- ``reference``: ``reference.ia3_linear(x, W, None, l, False)``, the check's bare function (ratio 1);
- ``thinnest-module``: an ``nn.Module`` whose forward is ``F.linear(x, W) * l`` on its own parameters read from
  ``_parameters`` (no checks, no plan): what any layer pays to be called;
- ``attribute-module``: the reference function inside a module reading its tensors as attributes
  (``self.weight``), as a layer is usually written;
- ``fastpeft``: ``IA3Linear``.

Every implementation reads the same weight tensor (``fastpeft.bench.cases`` shares it). CPU wall clock of PyTorch
code: ratios of this host, never kernel performance.
"""

from __future__ import annotations

import argparse
import statistics
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


class _WithAttributes(_Thinnest):
    def forward(self, x):
        from fastpeft import reference

        return reference.ia3_linear(x, self.weight, None, self.ia3_l, False)


def _module_job(name: str, cls, mode: str, m: int, out_f: int, in_f: int, shape: dict):
    from fastpeft.bench import cases

    def setup(cfg):
        w = cases._weights(cfg, out_f, in_f)
        layer = cls(w.weight, w.ia3_scale)
        return cases.Prepared(cases._timed_call(cfg, layer, m, in_f, out_f, mode, [p for p in layer.parameters()
                                                                                  if p.requires_grad]))
    return cases.Job(f"ia3.{mode}", name, shape, setup)


def main(argv: Optional[list] = None) -> int:
    from fastpeft.bench import cases
    from fastpeft.bench.__main__ import build_parser, make_config

    from .check_cpu import measure_group

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--mode", choices=("fwd", "fwd_bwd"), default="fwd")
    args = parser.parse_args(argv)
    cfg = make_config(build_parser().parse_args(["--suite", "cpu", "--device", "cpu"]))
    print(f"IA3 {args.mode}, M = {args.m}, {args.rounds} interleaved rounds, torch threads {torch.get_num_threads()}: "
          "median per-round time ratio to the bare reference function")
    for out_f, in_f in cfg.micro_features:
        shape = {"M": args.m, "out": out_f, "in": in_f, "r": cfg.rank}
        jobs = [cases.Job(f"ia3.{args.mode}", impl, shape, cases._micro_ia3(args.mode, impl, args.m, out_f, in_f))
                for impl in ("reference", "fastpeft")]
        jobs += [_module_job("thinnest-module", _Thinnest, args.mode, args.m, out_f, in_f, shape),
                 _module_job("attribute-module", _WithAttributes, args.mode, args.m, out_f, in_f, shape)]
        samples, _ = measure_group(jobs, cfg, args.rounds)
        ratios = {label: statistics.median(a / b for a, b in zip(s, samples["reference"]))
                  for label, s in samples.items()}
        print(f"  {out_f}x{in_f}: " + ", ".join(f"{label} {r:.3f}" for label, r in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
