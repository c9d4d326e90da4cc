"""CPU regression check: fastpeft is never slower than what it replaces, measured side by side.

``python -m bench.check_cpu [--rounds 7] [--min-round-ms 20] [--clock wall] [--cases decode,ia3] [--json out.json]``
(from the repository root) builds every implementation of each case of ``fastpeft bench --suite cpu`` (the same
jobs, weights and inputs as the harness), then runs them interleaved: round after round, each implementation in
turn (the order rotating by one each round), so a noisy neighbour on a shared CPU slows all of them alike. In a
round each implementation makes the same number of calls, enough that the fastest spends at least
``--min-round-ms`` (a sub-millisecond micro case timed one call at a time would measure the timer and the
scheduler). ``--clock process`` times this process's CPU time
instead of wall time (steadier on a loaded host). Each bound is on the median over rounds of the per-round time
ratio, never on a wall time:

- every case with a ``peft`` row: fastpeft / PEFT <= 1 + NOISE (the accelerated model, MultiLoraModel for the
  multi-adapter cases, fastpeft's modules for the micro cases);
- the micro IA3 / DoRA / multi-LoRA cases: fastpeft / reference <= 1 + NOISE (a module against a bare function:
  ``bench/ia3_floor.py`` measures what being an ``nn.Module`` alone costs against IA3's two-op reference at M = 1);
- ``decode``: MultiLoraModel with one adapter / PEFT's single-adapter decode <= 1.2;
- ``multi_lora_decode``: PEFT's ``adapter_names`` generate / MultiLoraModel >= 3 with 16 adapters over 16 rows,
  and MultiLoraModel's time with 64 adapters in the bank / with 1 <= 1.3 (reported for every count).

Exit status 1 when a bound fails. Wall-clock CPU times of PyTorch code (fastpeft's CPU backend is its
reference path): they say nothing about GPU kernels. Not part of the test suite (a timed test is flaky
on shared CI machines); run it by hand or in a bench job, best with ``OMP_NUM_THREADS=1`` on a loaded host.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

# Allowance for timer noise on the "never slower" bounds: the median of per-round ratios of interleaved runs
# still moves by a few percent between runs on a shared 2-core host.
NOISE = 0.05
SERVING_ONE_ADAPTER_BOUND = 1.2  # MultiLoraModel decode, one adapter, vs PEFT's decode of the same model
SERVING_SPEEDUP_16 = 3.0  # PEFT adapter_names generate / MultiLoraModel, 16 adapters over 16 rows
SERVING_GROWTH_BOUND = 1.3  # MultiLoraModel decode, 64 adapters in the bank / 1
# Per round, the fastest implementation of a group runs at least this long (the others make as many calls).
MIN_ROUND_MS = 20.0


def _groups(cfg) -> dict:
    """``{(case, shape): [job, ...]}``; the multi-adapter decode cases form one group over every adapter count
    (the growth bound compares them)."""
    from fastpeft.bench.cases import all_jobs
    from fastpeft.bench.report import shape_label

    groups: dict = {}
    for job in all_jobs(cfg):
        key = (job.case, "all adapter counts" if job.case == "multi_lora_decode" else shape_label(job.params))
        groups.setdefault(key, []).append(job)
    return groups


def _label(job) -> str:
    return f"{job.impl}@{job.params['adapters']}" if job.case == "multi_lora_decode" else job.impl


# --clock: wall time, or this process's CPU time (all its threads), which a neighbour's load does not stretch
# (with OMP_NUM_THREADS=1 the two agree on a quiet host)
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def _ms_per_call(p, calls: int, first: int, clock=time.perf_counter) -> float:
    """Mean time in ms (``clock``) of ``calls`` consecutive calls ``p.run(first)``, ``p.run(first + 1)``, …"""
    start = clock()
    for i in range(first, first + calls):
        p.run(i)
    return (clock() - start) * 1e3 / calls


def measure_group(jobs: list, cfg, rounds: int, min_round_ms: float = MIN_ROUND_MS, clock=time.perf_counter) -> tuple:
    """``({label: [ms per call, one per round]}, calls per round)``: every implementation built and warmed up,
    then timed (``clock``) round after round, interleaved in an order that rotates by one each round, each making the
    same number of calls per round (enough that the fastest runs at least ``min_round_ms``)."""
    from fastpeft.bench.cases import Unavailable

    prepared = {}
    for job in jobs:
        try:
            prepared[_label(job)] = job.setup(cfg)
        except Unavailable as exc:
            print(f"  {job.case} {_label(job)}: skipped ({exc})", file=sys.stderr)
    fastest = math.inf
    for p in prepared.values():
        for i in range(cfg.warmup):
            p.run(i)
        fastest = min(fastest, _ms_per_call(p, 1, cfg.warmup, clock))
    calls = max(1, math.ceil(min_round_ms / fastest)) if prepared else 1
    samples: dict = {label: [] for label in prepared}
    labels = list(prepared)
    for r in range(rounds):
        # each round starts with the next implementation: none always runs first, on caches the previous
        # implementation's calls left cold, or always last
        shift = r % len(labels)
        for label in labels[shift:] + labels[:shift]:
            samples[label].append(_ms_per_call(prepared[label], calls, r * calls, clock))
    return samples, calls


def _ratio(samples: dict, num: str, den: str) -> Optional[float]:
    """The median over rounds of ``num`` time / ``den`` time, or None when one is missing."""
    if num not in samples or den not in samples:
        return None
    return statistics.median(a / b for a, b in zip(samples[num], samples[den]))


def bounds(case: str, samples: dict) -> list:
    """``[(what, ratio, bound, ok)]`` for one group's samples."""
    checks = []

    def upper(what, num, den, bound):
        ratio = _ratio(samples, num, den)
        if ratio is not None:
            checks.append((what, ratio, bound, ratio <= bound))

    if case == "multi_lora_decode":
        counts = sorted(int(label.split("@")[1]) for label in samples if label.startswith("fastpeft-serving@"))
        for n in counts:
            upper(f"MultiLoraModel / PEFT, {n} adapters", f"fastpeft-serving@{n}", f"peft@{n}", 1 + NOISE)
        if 16 in counts:
            ratio = _ratio(samples, "peft@16", "fastpeft-serving@16")
            if ratio is not None:
                checks.append(("PEFT / MultiLoraModel, 16 adapters (speed-up, lower bound)", ratio,
                               SERVING_SPEEDUP_16, ratio >= SERVING_SPEEDUP_16))
        if counts:
            for n in counts[1:]:
                upper(f"MultiLoraModel {n} / {counts[0]} adapters", f"fastpeft-serving@{n}",
                      f"fastpeft-serving@{counts[0]}", SERVING_GROWTH_BOUND if n == 64 else float("inf"))
        return checks
    if case == "decode":
        upper("MultiLoraModel one adapter / PEFT", "fastpeft-serving", "peft", SERVING_ONE_ADAPTER_BOUND)
    if case == "multi_lora_serving":
        upper("MultiLoraModel / PEFT", "fastpeft", "peft", 1 + NOISE)
        return checks
    upper("fastpeft / PEFT", "fastpeft", "peft", 1 + NOISE)
    if case.split(".")[0] in ("ia3", "dora", "multi_lora"):
        upper("fastpeft / reference", "fastpeft", "reference", 1 + NOISE)
    return checks


def main(argv: Optional[list] = None) -> int:
    from fastpeft.bench.__main__ import build_parser, make_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-round-ms", type=float, default=MIN_ROUND_MS,
                        help="per round, calls enough that the fastest implementation of a case runs this long")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time (default) or this process's CPU time, steadier on a loaded host")
    parser.add_argument("--cases", default="", help="only cases whose name contains one of these (comma-separated)")
    parser.add_argument("--json", type=Path, help="write the samples, ratios and bounds here")
    args = parser.parse_args(argv)
    bench_argv = ["--suite", "cpu", "--device", "cpu"] + (["--cases", args.cases] if args.cases else [])
    cfg = make_config(build_parser().parse_args(bench_argv))
    report, failed = [], 0
    print(f"CPU regression check: {args.rounds} interleaved rounds, {args.clock} clock, torch threads "
          f"{torch.get_num_threads()}; "
          "ratios are medians over rounds of per-round time ratios")
    for (case, shape), jobs in _groups(cfg).items():
        samples, calls = measure_group(jobs, cfg, args.rounds, args.min_round_ms, CLOCKS[args.clock])
        medians = {label: statistics.median(s) for label, s in samples.items()}
        checks = bounds(case, samples)
        print(f"{case} {shape} ({calls} call{'s' if calls > 1 else ''} per round): "
              + ", ".join(f"{label} {ms:.3f} ms" for label, ms in medians.items()))
        for what, ratio, bound, ok in checks:
            failed += not ok
            relation = ">=" if "lower bound" in what else "<="
            print(f"    {'ok  ' if ok else 'FAIL'} {what}: {ratio:.3f} (bound {relation} {bound:g})")
        report.append({"case": case, "shape": shape, "calls_per_round": calls, "median_ms": medians,
                       "samples_ms": samples,  # ms per call, one sample per round
                       "checks": [{"what": w, "ratio": r, "bound": b, "ok": ok} for w, r, b, ok in checks]})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rounds": args.rounds, "min_round_ms": args.min_round_ms,
                                         "clock": args.clock, "torch_threads": torch.get_num_threads(),
                                         "noise_allowance": NOISE, "groups": report}, indent=1) + "\n")
    print(f"{failed} bound(s) failed" if failed else "every bound holds")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
