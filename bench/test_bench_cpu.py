"""pytest-benchmark micro benchmarks of the CPU paths: ``pytest bench/ --benchmark-only``.

Each micro case of the harness (``fastpeft.bench.cases``) at one small CPU shape, every implementation
(fastpeft, reference, PEFT, bitsandbytes) built exactly as ``fastpeft bench`` builds it, inputs rotating.
These are wall-clock times of PyTorch code on this CPU (fastpeft's CPU backend is the reference): useful
to catch Python-side overhead regressions, never a statement about kernel performance. Not part of the
normal test run (``testpaths = ["tests"]``).
"""

import itertools

import pytest

from fastpeft.bench.__main__ import build_parser, make_config
from fastpeft.bench.cases import Unavailable, micro_jobs

CONFIG = make_config(build_parser().parse_args(
    ["--suite", "quick", "--device", "cpu", "--m", "16", "--features", "256x512", "--rank", "8"]))
JOBS = micro_jobs(CONFIG)


@pytest.mark.parametrize("job", JOBS, ids=[f"{j.case}-{j.impl}" for j in JOBS])
def test_micro(benchmark, job):
    try:
        prepared = job.setup(CONFIG)
    except Unavailable as exc:
        pytest.skip(str(exc))
    calls = itertools.count()
    benchmark.extra_info.update(case=job.case, impl=job.impl, params=job.params, clock="cpu-wall")
    benchmark(lambda: prepared.run(next(calls)))
