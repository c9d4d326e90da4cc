"""The timing groups of the GPU acceptance run (``bench/gpu_accept.py``), in priority order.

Each group is a list of subgroups; a subgroup is the implementations of one case at one shape, built from the same
seeded weights (``fastpeft.bench.cases``) and timed side by side (``fastpeft.bench.__main__.run_group``: CUDA
events around each call, the L2 cache flushed before it by zeroing a 256 MiB buffer, so no call finds the weights
in L2; warm-up calls first; inputs rotating), then built again alone for the peak memory. A subgroup's rows and
its headline ratios (the median over rounds of per-round time ratios of two implementations) are appended to the
JSON-lines file as soon as it is timed; subgroups not started within the group's budget are written as skipped.

1. ``qlora``: fastpeft's QLoRA layer (its NF4 base from ``NF4Weight.quantize``) forward and forward + backward
   against PEFT over bitsandbytes' ``Linear4bit`` and against fastpeft's dense bf16 LoRA layer, at M = 1, 16, 512,
   4096 on 4096x4096 and 14336x4096 (fp32 adapters, as PEFT keeps them on a bf16 model).
2. ``nf4_gemv``: the NF4 product at M = 1 (no LoRA) and a device copy of its packed bytes: achieved bandwidth
   against the measured 1 GiB device-to-device copy (``roofline`` in each row).
3. ``dora``: DoRA against LoRA, fastpeft's and PEFT's, forward + backward and forward.
4. ``ia3``: fastpeft's and PEFT's IA3 against the bare base matmul.
5. ``multi_lora``: one layer serving a mixed batch with 64 adapters against 1 (and PEFT's with 64).
6. ``train_step`` and 7. ``decode``: a ~1B-parameter random Llama (TinyLlama's shape), fastpeft-accelerated PEFT
   against PEFT (and, for decode, the model without adapters and ``MultiLoraModel``), then their 4-bit versions.

``python3 -m bench.gpu_timings --group NAME --out FILE --budget-s S [--dry-run]`` runs one group.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

from bench.gpu_accept import append_line, hide_bitsandbytes_if_asked

os.environ.setdefault("FASTPEFT_STRICT", "1")  # a kernel that fails raises: never a PyTorch time under its name
hide_bitsandbytes_if_asked()

import torch  # noqa: E402

# TinyLlama-1.1B's shape (random weights, no download)
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4)


@dataclass(frozen=True)
class Sizes:
    features: tuple  # (out, in) of the layer groups
    gemv_features: tuple
    m: tuple
    multi_lora_m: tuple
    adapters: int
    bench: dict  # BenchConfig fields


GPU_SIZES = Sizes(features=((4096, 4096), (14336, 4096)), gemv_features=((4096, 4096), (14336, 4096), (4096, 14336)),
                  m=(1, 16, 512, 4096), multi_lora_m=(64, 4096), adapters=64,
                  bench=dict(device=torch.device("cuda"), dtype=torch.bfloat16, rank=16, warmup=5, repeats=20,
                             rotations=4, llama=LLAMA_1B, train_batch=4, seq_len=512, decode_prompt=128,
                             decode_tokens=16))
DRY_SIZES = Sizes(features=((64, 128),), gemv_features=((64, 128),), m=(1, 7), multi_lora_m=(7,), adapters=3,
                  bench=dict(device=torch.device("cpu"), dtype=torch.float32, rank=4, warmup=1, repeats=2, rotations=2,
                             llama=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2),
                             train_batch=1, seq_len=8, decode_prompt=4, decode_tokens=2))


@dataclass(frozen=True)
class Subgroup:
    label: str
    jobs: list  # fastpeft.bench.cases.Job, implementations named uniquely
    ratios: tuple  # ((numerator impl, denominator impl), ...): the headline ratios
    memory: bool = True  # built again alone for its peak memory


def _shape(m, out_f, in_f, rank, **extra) -> dict:
    return {"M": m, "out": out_f, "in": in_f, "r": rank, **extra}


def qlora(s: Sizes, cfg) -> list:
    from fastpeft.bench.cases import Job, _micro_lora

    subgroups = []
    for out_f, in_f in s.features:
        for m in s.m:
            for mode in ("fwd", "fwd_bwd"):
                shape = _shape(m, out_f, in_f, cfg.rank)
                jobs = [Job(f"qlora.{mode}", label, shape, _micro_lora(op, mode, impl, m, out_f, in_f, True))
                        for label, op, impl in (("fastpeft", "qlora", "fastpeft"), ("peft+bnb", "qlora", "peft"),
                                                ("dense-lora", "lora", "fastpeft"))]
                subgroups.append(Subgroup(f"qlora.{mode} M={m} {out_f}x{in_f}", jobs,
                                          (("fastpeft", "peft+bnb"), ("fastpeft", "dense-lora"))))
    return subgroups


def _nf4_gemv_setup(impl: str, out_f: int, in_f: int):
    """The NF4 product at M = 1 without LoRA (``fastpeft``) or a device copy of its packed bytes (``copy``)."""
    def setup(cfg):
        from fastpeft.bench.cases import Prepared, _inputs, _weights
        from fastpeft.nf4 import NF4Weight
        from fastpeft.ops import fused_linear

        nf4 = NF4Weight.quantize(_weights(cfg, out_f, in_f).weight, 64, double_quant=True)
        if impl == "copy":
            target = torch.empty_like(nf4.packed)
            return Prepared(lambda i: target.copy_(nf4.packed), flops=0, bytes_moved=2 * nf4.packed.nbytes,
                            note="device-to-device copy of the packed NF4 bytes")
        xs = _inputs(cfg, 1, in_f, seed=1)
        elsize = xs[0].element_size()
        return Prepared(lambda i: fused_linear(xs[i % len(xs)], nf4)[0], tokens=1, flops=2 * out_f * in_f,
                        bytes_moved=nf4.nbytes + elsize * (in_f + out_f), note="fastpeft.ops.fused_linear")
    return setup


def nf4_gemv(s: Sizes, cfg) -> list:
    from fastpeft.bench.cases import Job

    subgroups = []
    for out_f, in_f in s.gemv_features:
        shape = _shape(1, out_f, in_f, 0)
        jobs = [Job("nf4_gemv", impl, shape, _nf4_gemv_setup(impl, out_f, in_f)) for impl in ("fastpeft", "copy")]
        subgroups.append(Subgroup(f"nf4_gemv M=1 {out_f}x{in_f}", jobs, (("fastpeft", "copy"),), memory=False))
    return subgroups


def _per_mode_and_m(s: Sizes, name: str, modes: tuple, rank: int, jobs, ratios: tuple) -> list:
    """A subgroup per mode and M on the first layer shape, its implementations ``jobs(mode, m, out, in, shape)``."""
    out_f, in_f = s.features[0]
    return [Subgroup(f"{name}.{mode} M={m} {out_f}x{in_f}", jobs(mode, m, out_f, in_f, _shape(m, out_f, in_f, rank)),
                     ratios) for mode in modes for m in s.m]


def dora(s: Sizes, cfg) -> list:
    from fastpeft.bench.cases import Job, _micro_lora

    def jobs(mode, m, out_f, in_f, shape):
        return [Job(f"{op}.{mode}", f"{impl}-{op}", shape, _micro_lora(op, mode, impl, m, out_f, in_f, True))
                for impl in ("fastpeft", "peft") for op in ("dora", "lora")]
    return _per_mode_and_m(s, "dora", ("fwd_bwd", "fwd"), cfg.rank, jobs,
                           (("fastpeft-dora", "fastpeft-lora"), ("peft-dora", "peft-lora"),
                            ("fastpeft-dora", "peft-dora")))


def _base_matmul_setup(mode: str, m: int, out_f: int, in_f: int):
    """The frozen base layer alone (``nn.Linear`` over the case's weight): what IA3 adds its scale to."""
    def setup(cfg):
        from fastpeft.bench.cases import Prepared, _dense_linear, _timed_call, _weights

        layer = _dense_linear(_weights(cfg, out_f, in_f))
        return Prepared(_timed_call(cfg, layer, m, in_f, out_f, mode, []), tokens=m, note="nn.Linear, frozen")
    return setup


def ia3(s: Sizes, cfg) -> list:
    from fastpeft.bench.cases import Job, _micro_ia3

    def jobs(mode, m, out_f, in_f, shape):
        return [*(Job(f"ia3.{mode}", impl, shape, _micro_ia3(mode, impl, m, out_f, in_f))
                  for impl in ("fastpeft", "peft")),
                Job(f"ia3.{mode}", "base-matmul", shape, _base_matmul_setup(mode, m, out_f, in_f))]
    return _per_mode_and_m(s, "ia3", ("fwd", "fwd_bwd"), 0, jobs,
                           (("fastpeft", "base-matmul"), ("peft", "base-matmul"), ("fastpeft", "peft")))


def multi_lora(s: Sizes, cfg) -> list:
    from fastpeft.bench.cases import Job, _micro_multi_lora

    out_f, in_f = s.features[0]
    many = s.adapters
    subgroups = []
    for m in s.multi_lora_m:
        jobs = [Job("multi_lora.fwd", f"{impl}-{n}", _shape(m, out_f, in_f, cfg.rank, adapters=n),
                    _micro_multi_lora(impl, m, out_f, in_f, n, fp32_adapters=True))
                for impl, n in (("fastpeft", many), ("fastpeft", 1), ("peft", many))]
        subgroups.append(Subgroup(f"multi_lora.fwd M={m} {out_f}x{in_f}", jobs,
                                  ((f"fastpeft-{many}", "fastpeft-1"), (f"fastpeft-{many}", f"peft-{many}"))))
    return subgroups


def train_step(s: Sizes, cfg) -> list:
    from fastpeft.bench.cases import Job, _train_step

    params = {"model": "random Llama", "batch": cfg.train_batch, "seq": cfg.seq_len, "r": cfg.rank}
    subgroups = []
    for four_bit in (False, True):
        case = "train_step_4bit" if four_bit else "train_step"
        jobs = [Job(case, impl, params, _train_step(impl, four_bit)) for impl in ("fastpeft", "peft")]
        # a 4-bit model is saved and loaded again through bitsandbytes for each build: no second build for memory
        subgroups.append(Subgroup(case, jobs, (("fastpeft", "peft"),), memory=not four_bit))
    return subgroups


def decode(s: Sizes, cfg) -> list:
    from fastpeft.bench.cases import Job, _decode

    params = {"model": "random Llama", "prompt": cfg.decode_prompt, "new_tokens": cfg.decode_tokens, "r": cfg.rank}
    jobs = [Job("decode", impl, params, _decode(impl)) for impl in ("fastpeft", "peft", "hf", "fastpeft-serving")]
    four_bit = [Job("decode_4bit", impl, params, _decode(impl, True)) for impl in ("fastpeft", "peft", "hf")]
    return [Subgroup("decode", jobs, (("fastpeft", "peft"), ("fastpeft-serving", "peft"), ("fastpeft", "hf")),
                     memory=False),
            Subgroup("decode_4bit", four_bit, (("fastpeft", "peft"), ("fastpeft", "hf")), memory=False)]


# name -> (seconds of a 420 s run, subgroups, BenchConfig fields changed for the group); the order is the priority.
# A decode call generates decode_tokens tokens (tens of layer launches each): fewer rounds keep the group in its share.
FEWER_ROUNDS = {"warmup": 2, "repeats": 8}
GROUPS = {"qlora": (75, qlora, {}), "nf4_gemv": (15, nf4_gemv, {}), "dora": (30, dora, {}), "ia3": (20, ia3, {}),
          "multi_lora": (25, multi_lora, {}), "train_step": (35, train_step, FEWER_ROUNDS),
          "decode": (30, decode, FEWER_ROUNDS)}


def headline(subgroup: Subgroup, rows: list) -> list:
    """``[{"what", "ratio"}]``: each of the subgroup's ratios whose two implementations were both timed."""
    from fastpeft.bench.timing import ratio

    samples = {r["impl"]: r["samples_ms"] for r in rows if "samples_ms" in r}
    return [{"what": f"{num} / {den}", "ratio": ratio(samples[num], samples[den])}
            for num, den in subgroup.ratios if num in samples and den in samples]


def run_group(name: str, out: str, budget_s: float, dry_run: bool, roofline: Optional[dict]) -> int:
    """Time group ``name``'s subgroups until ``budget_s`` is spent, appending each one's rows and ratios to ``out``;
    1 when an implementation raised."""
    from fastpeft.bench import __main__ as bench
    from fastpeft.bench.cases import BenchConfig

    deadline = time.monotonic() + budget_s
    s = DRY_SIZES if dry_run else GPU_SIZES
    _, subgroups, overrides = GROUPS[name]
    fields = {**s.bench, **(overrides if not dry_run else {})}
    cfg = BenchConfig(micro_m=list(s.m), micro_features=list(s.features), micro_adapters=s.adapters, **fields)
    errors = 0
    for subgroup in subgroups(s, cfg):
        base = {"group": name, "subgroup": subgroup.label}
        if time.monotonic() > deadline:
            for job in subgroup.jobs:
                append_line(out, {"kind": "result", **base, **bench.result_head(job),
                                  "skipped": f"the group's budget of {budget_s:.0f} s was spent"})
            continue
        rows = bench.run_group(subgroup.jobs, cfg, roofline, memory=subgroup.memory)
        for row in rows:
            errors += "error" in row
            append_line(out, {"kind": "result", **base, **row})
        for line in headline(subgroup, rows):
            append_line(out, {"kind": "headline", **base, **line})
    return 1 if errors else 0


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", required=True, choices=["roofline", *GROUPS])
    parser.add_argument("--out", required=True, help="JSON-lines file to append to")
    parser.add_argument("--budget-s", type=float, required=True)
    parser.add_argument("--roofline", help="JSON of the measured roofline (the roofline group's line)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU")
    args = parser.parse_args(argv)
    if args.group == "roofline":
        from fastpeft.bench.roofline import measure_roofline

        measured = None if args.dry_run else measure_roofline(torch.device("cuda"))
        append_line(args.out, {"kind": "roofline", "group": "roofline", "roofline": measured})
        return 0
    roofline = json.loads(args.roofline) if args.roofline else None
    return run_group(args.group, args.out, args.budget_s, args.dry_run, roofline)


if __name__ == "__main__":
    sys.exit(main())
