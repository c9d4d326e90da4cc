"""Multi-LoRA serving benchmark hook: fastpeft's mixed batch vs PEFT's ``adapter_names`` loop.

``run(adapters=(1, 4, 16, 64))`` returns one dict per (adapter count, implementation) with the median
time of a mixed-batch prefill over the harness's model (``fastpeft.bench``: the ``multi_lora_serving``
case, its side-by-side timing and its result fields; this file only picks the adapter counts). On CPU the clock is
``cpu-wall`` and fastpeft runs its PyTorch reference backend: these medians say nothing about kernel
performance. Run ``python bench/bench_multi_lora.py [--suite quick|cpu|gpu]`` to print them.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence


def run(adapters: Sequence[int] = (1, 4, 16, 64), suite: Optional[str] = "quick", device: Optional[str] = None,
        repeats: Optional[int] = None) -> list[dict]:
    """Median ``multi_lora_serving`` timings for each adapter count, ``peft`` and ``fastpeft``."""
    from fastpeft.bench.__main__ import build_parser, group_jobs, make_config, run_group
    from fastpeft.bench.cases import e2e_jobs

    argv = ["--cases", "multi_lora_serving"]
    argv += ["--suite", suite] if suite else []
    argv += ["--device", device] if device else []
    argv += ["--repeats", str(repeats)] if repeats else []
    cfg = make_config(build_parser().parse_args(argv))
    cfg.serving_adapters = list(adapters)
    jobs = [job for job in e2e_jobs(cfg) if job.case == "multi_lora_serving"]
    return [result for group in group_jobs(jobs).values() for result in run_group(group, cfg, None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", default="quick", choices=["quick", "cpu", "gpu"])
    parser.add_argument("--adapters", default="1,4,16,64")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    for result in run([int(n) for n in args.adapters.split(",")], args.suite, repeats=args.repeats):
        timing = f"{result['median_ms']:.2f} ms ({result['clock']})" if "median_ms" in result else \
            result.get("error") or result.get("skipped")
        print(f"{result['params']['adapters']:>3} adapters  {result['impl']:<9} {timing}")


if __name__ == "__main__":
    main()
