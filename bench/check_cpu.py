"""CPU regression check: fastpeft is never slower than what it replaces, measured side by side.

``python -m bench.check_cpu [--runs 3] [--rounds N] [--min-round-ms MS] [--clock wall|process] [--cases decode,ia3]
[--json out.json]`` (from the repository root) times every implementation of each case of ``fastpeft bench --suite
cpu`` as the harness times them (the same jobs, weights and inputs; ``fastpeft.bench.__main__.run_group``): round
after round, each implementation making the same number of calls per round, enough that the fastest spends at least
``--min-round-ms`` (a sub-millisecond micro case timed one call at a time would measure the timer and the
scheduler), the implementations taking turns call by call (the order rotating by one at every turn), so a noisy
neighbour on a shared CPU slows all of them alike. Rounds and the per-round minimum default to the cpu suite's.
``--clock process`` times this process's CPU time instead of wall time (steadier on a loaded host). The whole check
runs ``--runs`` times, every implementation built afresh each time, and each bound is on the median over runs of the
median over rounds of the per-round time ratio, never on a wall time:

- every case with a ``peft`` row: fastpeft / PEFT <= 1 + NOISE (the accelerated model, MultiLoraModel for the
  multi-adapter cases, fastpeft's modules for the micro cases);
- the micro IA3 / DoRA / multi-LoRA cases: fastpeft / reference <= 1 + NOISE, a layer against a layer (the reference
  row is ``fastpeft.reference``'s function in a plain ``nn.Module``: ``fastpeft.bench.cases._ReferenceLayer``;
  ``bench/ia3_floor.py`` times the bare function and the thinnest conceivable module beside both);
- each micro case's reference is built and timed twice (``reference-again``): the ratio of the two, identical code,
  is reported beside the bounds as the run's noise floor (an A/A test; not bounded);
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
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from fastpeft.bench.timing import CLOCKS, ratio

# Allowance for timer noise on the "never slower" bounds: the median of per-round ratios of interleaved runs
# still moves by a few percent between runs on a shared 2-core host.
NOISE = 0.05
SERVING_ONE_ADAPTER_BOUND = 1.2  # MultiLoraModel decode, one adapter, vs PEFT's decode of the same model
SERVING_SPEEDUP_16 = 3.0  # PEFT adapter_names generate / MultiLoraModel, 16 adapters over 16 rows
SERVING_GROWTH_BOUND = 1.3  # MultiLoraModel decode, 64 adapters in the bank / 1


def _label(job) -> str:
    return f"{job.impl}@{job.params['adapters']}" if job.case == "multi_lora_decode" else job.impl


def measure_group(jobs: list, cfg) -> tuple:
    """``({label: [ms per call, one per round]}, calls per round)``: the harness's side-by-side timing of one group
    (``fastpeft.bench.__main__.run_group``: ``cfg.repeats`` rounds, each implementation the same number of calls per
    round, at least ``cfg.min_round_ms`` for the fastest), without the peak-memory pass."""
    from fastpeft.bench.__main__ import run_group

    samples, calls = {}, 1
    for job, result in zip(jobs, run_group(jobs, cfg, None, memory=False)):
        if "samples_ms" in result:
            samples[_label(job)], calls = result["samples_ms"], result["calls_per_round"]
        else:
            print(f"  {job.case} {_label(job)}: {result.get('skipped') or 'ERROR ' + result.get('error', '')}",
                  file=sys.stderr)
    return samples, calls


def _ratio(samples: dict, num: str, den: str) -> Optional[float]:
    """The median over rounds of ``num`` time / ``den`` time, or None when one is missing."""
    if num not in samples or den not in samples:
        return None
    return ratio(samples[num], samples[den])


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
    upper(AA_WHAT, AA_CONTROL, "reference", float("inf"))
    return checks


def combine(per_run: list) -> list:
    """``[(what, ratio, bound, ok, [ratio of each run])]``: each check of :func:`bounds` over independent runs, its
    ratio the median of the runs' (an implementation built afresh lies elsewhere in memory, and identical code built
    twice timed up to 16 % apart within one run on a 2-core host: rounds average time, runs average placement)."""
    combined = []
    for what, _, bound, _ in per_run[0]:
        values = [value for checks in per_run for w, value, _, _ in checks if w == what]
        value = statistics.median(values)
        combined.append((what, value, bound, value >= bound if "lower bound" in what else value <= bound, values))
    return combined


# Each micro case's reference built and timed twice: the ratio of identical code is this run's noise floor (reported,
# not bounded), what tells a 5 % gap from the host's noise at sub-millisecond calls
AA_CONTROL = "reference-again"
AA_WHAT = "A/A: the reference again / the reference (the same code twice: the noise floor)"


def with_control(jobs: list) -> list:
    """A micro group's jobs and, after them, its reference job again as :data:`AA_CONTROL`."""
    again = [replace(job, impl=AA_CONTROL) for job in jobs if job.impl == "reference" and "." in job.case]
    return jobs + again


def main(argv: Optional[list] = None) -> int:
    from fastpeft.bench.__main__ import build_parser, group_jobs, make_config
    from fastpeft.bench.cases import all_jobs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3,
                        help="independent runs, every implementation built afresh each run; a bound is on the median "
                             "over runs (default 3)")
    parser.add_argument("--rounds", type=int, help="timed rounds per run (default: the cpu suite's)")
    parser.add_argument("--min-round-ms", type=float,
                        help="per round, calls enough that the fastest implementation of a case runs this long "
                             "(default: the cpu suite's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time (default) or this process's CPU time, steadier on a loaded host")
    parser.add_argument("--cases", default="", help="only cases whose name contains one of these (comma-separated)")
    parser.add_argument("--json", type=Path, help="write the samples, ratios and bounds here")
    args = parser.parse_args(argv)
    bench_argv = ["--suite", "cpu", "--device", "cpu", "--clock", args.clock]
    for option, value in (("--repeats", args.rounds), ("--min-round-ms", args.min_round_ms), ("--cases", args.cases)):
        bench_argv += [option, str(value)] if value else []
    cfg = make_config(build_parser().parse_args(bench_argv))
    groups = group_jobs(all_jobs(cfg))
    print(f"CPU regression check: {args.runs} run(s) of {cfg.repeats} interleaved rounds, {args.clock} clock, torch "
          f"threads {torch.get_num_threads()}; a ratio is the median over runs of the median over rounds of "
          "per-round time ratios")
    runs = {key: [] for key in groups}  # per group, one (samples, calls) per run
    for run in range(args.runs):  # every group once per run: a loaded minute of the host falls on one run of each
        for key, jobs in groups.items():
            runs[key].append(measure_group(with_control(jobs), cfg))
            print(f"  run {run + 1}: {key[0]} {key[1]}", file=sys.stderr)
    report, failed = [], 0
    for (case, shape), measured in runs.items():
        checks = combine([bounds(case, samples) for samples, _ in measured])
        medians = {label: statistics.median(statistics.median(s[label]) for s, _ in measured if label in s)
                   for label in measured[0][0]}
        print(f"{case} {shape} ({', '.join(str(c) for _, c in measured)} calls per round): "
              + ", ".join(f"{label} {ms:.3f} ms" for label, ms in medians.items()))
        for what, value, bound, ok, values in checks:
            failed += not ok
            relation = ">=" if "lower bound" in what else "<="
            print(f"    {'ok  ' if ok else 'FAIL'} {what}: {value:.3f} (bound {relation} {bound:g}; runs "
                  + " ".join(f"{v:.3f}" for v in values) + ")")
        report.append({"case": case, "shape": shape, "calls_per_round": [c for _, c in measured],
                       "median_ms": medians,  # the median over runs of each run's median
                       "samples_ms": [s for s, _ in measured],  # per run: ms per call, one sample per round
                       "checks": [{"what": w, "ratio": r, "runs": v, "bound": b, "ok": ok}
                                  for w, r, b, ok, v in checks]})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": args.runs, "rounds": cfg.repeats, "min_round_ms": cfg.min_round_ms,
                                         "clock": args.clock, "torch_threads": torch.get_num_threads(),
                                         "noise_allowance": NOISE, "groups": report}, indent=1) + "\n")
    print(f"{failed} bound(s) failed" if failed else "every bound holds")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
