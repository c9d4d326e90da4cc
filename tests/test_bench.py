"""The benchmark harness: an end-to-end CPU run on the smallest sizes, and the pieces it is built from."""

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastpeft.bench import __main__ as bench_main
from fastpeft.bench.cases import BenchConfig, Job, Prepared, Unavailable, all_jobs
from fastpeft.bench.report import METADATA_KEYS, RESULT_KEYS, table, write_plots
from fastpeft.bench.roofline import measure_roofline, roofline_fraction
from fastpeft.bench.timing import measure, measure_interleaved, peak_memory, percentile, ratio
from fastpeft.cli import main as cli_main

QUICK = ["--suite", "quick", "--m", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``fastpeft bench`` on the quick suite (one M), through the real command line, with its console output;
    torch's thread count set to 2 before, which the run must restore."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    capture = pytest.MonkeyPatch()
    stdout, stderr = io.StringIO(), io.StringIO()
    capture.setattr(sys, "stdout", stdout)
    capture.setattr(sys, "stderr", stderr)
    try:
        status = cli_main(["bench", *QUICK, "--out", str(out)])
        threads_after = torch.get_num_threads()
    finally:
        capture.undo()
        torch.set_num_threads(threads)
    run = json.loads((out / "results.json").read_text())
    return status, out, {**run, "console": stdout.getvalue(), "progress": stderr.getvalue(),
                         "threads_after": threads_after}


def test_quick_run_completes_without_errors(quick_run):
    status, _, run = quick_run
    assert [r for r in run["results"] if "error" in r] == []
    assert status == 0


def test_json_has_every_field(quick_run):
    _, _, run = quick_run
    assert set(METADATA_KEYS) <= set(run)
    assert run["device_kind"] == "cpu" and run["roofline"] is None
    assert run["command"] == ["fastpeft", "bench", *QUICK, "--out", run["command"][-1]]
    assert run["git_commit"] == "unknown" or len(run["git_commit"].split("+")[0]) == 40
    for result in run["results"]:
        if "skipped" in result:
            assert set(result) >= {"case", "impl", "params", "shape"} and result["skipped"]
            continue
        assert set(RESULT_KEYS) <= set(result), result
        assert result["p20_ms"] <= result["median_ms"] <= result["p80_ms"]
        assert result["repeats"] == len(result["samples_ms"]) == 3 and result["clock"] == run["clock"]
        assert result["calls_per_round"] == 1  # the quick suite: one call per round (min_round_ms 0)
        assert "peak_mem_bytes" in result and "peak_mem_source" in result


def test_every_micro_case_measures_fastpeft_and_its_references(quick_run):
    _, _, run = quick_run
    measured = {(r["case"], r["impl"]) for r in run["results"] if "median_ms" in r}
    for case in ("lora.fwd", "lora.fwd_bwd", "qlora.fwd", "qlora.fwd_bwd", "dora.fwd", "dora.fwd_bwd",
                 "ia3.fwd", "ia3.fwd_bwd", "multi_lora.fwd"):
        assert {(case, "fastpeft"), (case, "reference"), (case, "peft")} <= measured, case
    assert {("nf4_dequant", "fastpeft"), ("nf4_dequant", "bnb"), ("train_step", "peft"), ("train_step", "fastpeft"),
            ("decode", "hf"), ("decode", "peft"), ("decode", "fastpeft"), ("decode", "fastpeft-serving"),
            ("multi_lora_serving", "peft"), ("multi_lora_serving", "fastpeft")} <= measured
    assert all(r["tokens_per_s"] > 0 for r in run["results"] if r["case"] == "train_step" and "median_ms" in r)


def test_table_and_plots_written(quick_run):
    _, out, run = quick_run
    text = (out / "table.txt").read_text()
    assert "CPU RUN" in text and "NOT kernel performance" in text
    assert "lora.fwd" in text and "median ms" in text
    markdown = (out / "table.md").read_text()
    assert "not kernel performance" in markdown and f"[{out.as_posix()}/results.json]" in markdown
    assert markdown.count("| lora.fwd | reference |") == 1
    pytest.importorskip("matplotlib")
    assert (out / "lora.fwd.png").stat().st_size > 1000
    assert (out / "train_step.png").exists()


def test_one_thread_on_cpu_said_before_the_run_and_restored_after(quick_run, monkeypatch):
    _, _, run = quick_run
    expected = int(os.environ.get("OMP_NUM_THREADS") or 1)
    assert run["threads"] == expected and run["threads_after"] == 2
    assert run["clock"] == ("cpu-process" if expected == 1 else "cpu-wall")
    assert f"torch threads: {expected} (" in run["progress"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = torch.device("cpu")
    args = bench_main.build_parser().parse_args(QUICK)
    assert bench_main.cpu_threads(args, cpu) == 1 and bench_main.make_config(args).clock == "process"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert bench_main.cpu_threads(args, cpu) == 3 and bench_main.make_config(args).clock == "wall"
    args = bench_main.build_parser().parse_args([*QUICK, "--threads", "2", "--clock", "process"])
    assert bench_main.cpu_threads(args, cpu) == 2 and bench_main.make_config(args).clock == "process"


def test_progress_is_the_runs_own_bar_and_transformers_bars_come_back_after(quick_run):
    """The end-to-end cases save and load their model: transformers' progress bars stay out of the run's output,
    and are on again after the run."""
    from transformers.utils import logging as transformers_logging

    progress = quick_run[2]["progress"]
    assert "job" in progress
    assert "Loading weights" not in progress and "Writing model shards" not in progress
    assert transformers_logging.is_progress_bar_enabled()


def test_console_shows_headline_ratios_within_120_columns_and_names_every_file(quick_run):
    _, out, run = quick_run
    console = run["console"]
    assert max(map(len, console.splitlines())) <= 120
    assert console.index("End to end") < console.index("Micro cases") < console.index("fastpeft / PEFT over")
    train = next(r for r in run["results"] if r["case"] == "train_step" and r["impl"] == "fastpeft")
    assert f"{train['vs']['peft']:.2f}" in next(line for line in console.splitlines()
                                               if line.startswith("train_step "))
    assert "fastpeft backend" not in console and "roofline" not in (out / "table.txt").read_text()
    written = sorted(p.name for p in out.iterdir())
    listed = console[console.index("Files in"):]
    for name in written:
        assert name in listed, name


def test_no_plots_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert bench_main.main([*QUICK, "--cases", "ia3.fwd_bwd", "--out", str(tmp_path)]) == 0
    assert "no plots: matplotlib is not installed" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png")) and (tmp_path / "results.json").exists()


def _config(**overrides) -> BenchConfig:
    # wall time: the test functions here sleep, which takes no CPU time
    args = bench_main.build_parser().parse_args(["--suite", "quick", "--device", "cpu", "--clock", "wall"])
    cfg = bench_main.make_config(args)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_unavailable_implementation_is_skipped_with_its_reason_and_errors_are_kept():
    def missing(cfg):
        raise Unavailable("fastpeft.nn.Thing not available yet")

    def broken(cfg):
        return Prepared(run=lambda i: 1 / 0)

    def fine(cfg):
        return Prepared(run=lambda i: None)

    skipped, failed, timed = bench_main.run_group([Job("x", "fastpeft", {"M": 1}, missing),
                                                   Job("x", "peft", {"M": 1}, broken),
                                                   Job("x", "reference", {"M": 1}, fine)], _config(), None)
    assert skipped["skipped"] == "fastpeft.nn.Thing not available yet" and "median_ms" not in skipped
    assert failed["error"].startswith("ZeroDivisionError") and "median_ms" not in failed
    assert "error" not in timed and len(timed["samples_ms"]) == 3  # the others of the group go on
    assert bench_main.exit_status({"results": [skipped]}) == 0
    assert bench_main.exit_status({"results": [skipped, failed]}) == 1
    text = table({"device": "cpu", "device_kind": "cpu", "git_commit": "unknown", "timestamp": "t",
                  "roofline": None, "results": [{**skipped, "shape": "M=1"}, {**failed, "shape": "M=1"}]})
    assert "skipped: fastpeft.nn.Thing" in text and "ERROR: ZeroDivisionError" in text


def test_case_filter_and_every_case_has_all_implementations_named():
    jobs = all_jobs(_config())
    impls = {}
    for job in jobs:
        impls.setdefault(job.case, set()).add(job.impl)
    assert impls["lora.fwd"] == {"fastpeft", "reference", "peft"}
    assert impls["nf4_dequant"] == {"fastpeft", "reference", "bnb"}
    assert impls["decode"] == {"hf", "peft", "fastpeft", "fastpeft-serving"}
    assert impls["decode_4bit"] == {"hf", "peft", "fastpeft"}
    assert impls["train_step_4bit"] == impls["train_step"] == {"peft", "fastpeft"}
    assert impls["multi_lora_decode"] == {"peft", "fastpeft-serving"}
    assert {j.case for j in all_jobs(_config(cases=["decode", "ia3.fwd"]))} == {
        "decode", "decode_4bit", "multi_lora_decode", "ia3.fwd", "ia3.fwd_bwd"}


def test_half_precision_suites_bench_the_fp32_adapter_plans():
    """On a bf16 / fp16 model PEFT keeps adapters in fp32: each LoRA-family micro case has that variant too
    (IA3's vector is fp32 in every case already)."""
    assert not any(j.case.endswith(".fp32_adapters") for j in all_jobs(_config()))
    cases = {j.case for j in all_jobs(_config(dtype=torch.bfloat16))}
    assert {f"{op}.fp32_adapters" for op in ("lora.fwd", "qlora.fwd_bwd", "dora.fwd", "multi_lora.fwd")} <= cases


def test_fp32_suite_benches_4bit_models_computing_in_bf16():
    """``bnb_4bit_compute_dtype=bfloat16`` on an fp32 model: the 4-bit train step and decode, PEFT and
    accelerated, beside the fp32-compute ones; a half-precision suite computes in its own dtype only."""
    def bf16_compute(cfg):
        return {(j.case, j.impl) for j in all_jobs(cfg) if j.params.get("compute") == "bfloat16"}
    assert bf16_compute(_config()) == {(case, impl) for case in ("train_step_4bit", "decode_4bit")
                                       for impl in ("peft", "fastpeft")}
    assert not bf16_compute(_config(dtype=torch.bfloat16))


def test_percentiles_match_numpy():
    samples = [float(v) for v in np.random.default_rng(0).random(13)]
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert percentile(samples, q) == pytest.approx(np.percentile(samples, 100 * q))
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 0.5)


def test_measure_rotates_inputs_after_warmup():
    seen = []
    timing = measure(seen.append, torch.device("cpu"), warmup=2, repeats=5)
    assert seen == list(range(7))  # warm-up calls 0, 1, then timed calls 2..6: each picks input set i % n
    assert timing.repeats == 5 and timing.clock == "cpu-wall" and timing.p20_ms <= timing.median_ms <= timing.p80_ms
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        measure(seen.append, torch.device("cpu"), warmup=0, repeats=0)


def test_cpu_peak_memory_sees_a_large_allocation():
    peak, source = peak_memory(lambda: torch.ones(64 * 2**20, dtype=torch.uint8).sum(), torch.device("cpu"))
    if peak is None:
        pytest.skip(source)
    assert source.startswith("cpu-peak-rss") and peak >= 64 * 2**20


ROOF = {"bf16_flop_per_s": 1000e12, "hbm_bytes_per_s": 3e12}  # ridge point: 333 FLOP/byte


def test_roofline_fraction_memory_bound():
    # a GEMV-like call: 1 GFLOP over 1 GB is memory bound; at 2/3 of HBM bandwidth its fraction is 2/3
    r = roofline_fraction(1e9, 1e9, 1e9 / 2e12, ROOF)
    assert r["bound"] == "memory"
    assert r["achieved_bytes_per_s"] == pytest.approx(2e12)
    assert r["fraction"] == pytest.approx(2 / 3)


def test_roofline_fraction_compute_bound():
    flops, bytes_moved = 2 * 4096**3, 3 * 2 * 4096**2  # a 4096^3 bf16 GEMM: ~1365 FLOP/byte
    seconds = flops / 500e12
    r = roofline_fraction(flops, bytes_moved, seconds, ROOF)
    assert r["bound"] == "compute" and r["fraction"] == pytest.approx(0.5)
    assert r["achieved_flop_per_s"] == pytest.approx(500e12)


def test_roofline_fraction_pure_data_movement_and_missing_cost_model():
    r = roofline_fraction(0, 1e9, 1e9 / 1.5e12, ROOF)  # dequantisation: bytes only
    assert r["bound"] == "memory" and r["fraction"] == pytest.approx(0.5)
    assert roofline_fraction(None, None, 1e-3, ROOF) is None


def test_roofline_needs_cuda():
    with pytest.raises(ValueError, match="CUDA device, not cpu"):
        measure_roofline(torch.device("cpu"))


def test_bad_options_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench_main.build_parser().parse_args(["--features", "4096by4096"])
    assert "out x in" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="need repeats >= 1"):
        bench_main.make_config(bench_main.build_parser().parse_args(["--suite", "quick", "--repeats", "0"]))
    with pytest.raises(SystemExit, match="adapter counts >= 1"):
        bench_main.make_config(bench_main.build_parser().parse_args(["--suite", "quick", "--adapters", "4,0"]))


def test_serving_options_reach_the_jobs():
    from fastpeft.bench.cases import e2e_jobs

    cfg = bench_main.make_config(bench_main.build_parser().parse_args(["--suite", "quick", "--adapters", "1,64",
                                                                       "--seqs", "5"]))
    serving = [job.params for job in e2e_jobs(cfg) if job.case == "multi_lora_serving"]
    assert sorted({(p["adapters"], p["seqs"]) for p in serving}) == [(1, 5), (64, 5)]
    assert {job.impl for job in e2e_jobs(cfg) if job.case == "multi_lora_serving"} == {"peft", "fastpeft"}


def test_plots_cover_each_measured_case(tmp_path):
    pytest.importorskip("matplotlib")
    result = {"impl": "reference", "median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.2, "tokens_per_s": 10.0}
    run = {"device": "cpu", "device_kind": "cpu", "results": [
        {**result, "case": "lora.fwd", "shape": "M=1", "params": {"M": 1}},
        {**result, "case": "lora.fwd", "shape": "M=8", "params": {"M": 8}},
        {**result, "case": "decode", "shape": "new_tokens=8", "params": {"new_tokens": 8}},
        *({**result, "case": "multi_lora_decode", "shape": f"adapters={n}", "params": {"adapters": n}} for n in (1, 4)),
        {"case": "dora.fwd", "impl": "fastpeft", "shape": "M=1", "params": {"M": 1}, "skipped": "absent"},
    ]}
    assert sorted(p.name for p in write_plots(run, tmp_path)) == ["decode.png", "lora.fwd.png",
                                                                  "multi_lora_decode.png"]


def test_plots_read_as_a_report_needs(tmp_path, monkeypatch):
    """A narrow range on a linear axis from 0, tick labels level (never rotated off the figure), the multi-adapter
    cases over the adapter count, one series per implementation."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    seen, savefig = {}, Figure.savefig

    def capture(figure, path, *args, **kwargs):
        ax = figure.axes[0]
        seen[Path(path).stem] = dict(yscale=ax.get_yscale(), ylim=ax.get_ylim(),
                                     ticks=[t.get_text() for t in ax.get_xticklabels()],
                                     rotation={t.get_rotation() for t in ax.get_xticklabels()},
                                     legend=[t.get_text() for t in ax.get_legend().get_texts()])
        return savefig(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)

    def row(case, impl, params, tokens_per_s):
        ms = 1e3 * 128 / tokens_per_s
        return {"case": case, "impl": impl, "params": params, "shape": " ".join(f"{k}={v}" for k, v in params.items()),
                "median_ms": ms, "p20_ms": 0.98 * ms, "p80_ms": 1.02 * ms, "tokens_per_s": tokens_per_s}

    run = {"device": "cpu", "device_kind": "cpu", "results": [
        row("train_step", "peft", {"batch": 2, "seq": 64}, 67.0), row("train_step", "fastpeft", {"batch": 2, "seq": 64}, 74.0),
        *(row("multi_lora_decode", impl, {"adapters": n, "seqs": 16}, rate / n ** 0.5)
          for n in (1, 4, 16) for impl, rate in (("peft", 800.0), ("fastpeft-serving", 1100.0)))]}
    write_plots(run, tmp_path)
    train, serving = seen["train_step"], seen["multi_lora_decode"]
    assert train["yscale"] == "linear" and train["ylim"][0] == 0 and train["rotation"] == {0.0}
    assert train["legend"] == ["peft", "fastpeft"]
    assert serving["ticks"] == ["1", "4", "16"] and serving["legend"] == ["peft", "fastpeft-serving"]


def test_end_to_end_cases_on_a_checkpoint_path(tiny_llama_dir, tmp_path):
    """``--model PATH`` loads a Hugging Face checkpoint for the end-to-end cases instead of the built-in Llama."""
    argv = [*QUICK, "--model", str(tiny_llama_dir), "--cases", "train_step,decode", "--no-plots", "--out", str(tmp_path)]
    assert bench_main.main(argv) == 0
    run = json.loads((tmp_path / "results.json").read_text())
    measured = [r for r in run["results"] if "median_ms" in r]
    assert {(r["case"], r["impl"]) for r in measured} >= {("train_step", "peft"), ("decode", "hf"), ("decode", "peft")}
    assert all(r["params"]["model"] == str(tiny_llama_dir) for r in run["results"])


def test_no_deprecated_torch_dtype_keyword_in_the_package():
    """transformers 5 deprecates ``from_pretrained(torch_dtype=...)`` (``dtype=`` since 4.56, our minimum)."""
    package = Path(bench_main.__file__).resolve().parents[1]
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py") if "torch_dtype=" in p.read_text()]
    assert not offenders, offenders


def test_interleaved_timing_gives_every_function_the_same_calls_per_round_in_rotating_turns():
    """Each round, every function makes as many calls as the fastest needs to run at least ``min_round_ms`` (one
    call of a sub-millisecond case would time the timer), taking turns call by call, the turn's first function
    rotating; a sample is the mean time per call, and inputs rotate through every index."""
    import time

    calls = {"fast": [], "slow": []}
    order = []

    def fn(name, seconds):
        def run(i):
            calls[name].append(i)
            order.append(name)
            time.sleep(seconds)
        return run

    samples, per_round, clock = measure_interleaved({"fast": fn("fast", 0.001), "slow": fn("slow", 0.002)},
                                                    torch.device("cpu"), warmup=1, rounds=3, min_round_ms=8.0)
    assert 2 <= per_round <= 8 and clock == "cpu-wall"
    for name in calls:  # warm-up, the calibration call, then the rounds
        assert calls[name] == [0, 1, *range(2, 2 + 3 * per_round)]
        assert len(samples[name]) == 3
    assert min(samples["slow"]) >= 2.0 and min(samples["fast"]) >= 1.0  # ms per call, not per round
    timed = order[4:]  # after the warm-up and calibration calls (2 each, in order)
    turns = [timed[2 * t: 2 * t + 2] for t in range(3 * per_round)]
    assert len(timed) == 2 * 3 * per_round and all(sorted(turn) == ["fast", "slow"] for turn in turns)
    assert [turn[0] for turn in turns] == ["fast", "slow"] * (3 * per_round // 2) + ["fast"] * (3 * per_round % 2)
    assert ratio(samples["slow"], samples["fast"]) == pytest.approx(2.0, rel=0.3)


def test_a_group_is_timed_side_by_side_with_ratios_and_built_again_alone_for_its_memory():
    """run_group: the implementations' calls alternate (never one's rounds all before another's), each non-baseline
    row gets its median per-round ratio to each baseline of its shape, and each is built a second time, with the
    others gone, for its peak memory."""
    import time

    builds, order = [], []

    def job(impl, seconds, m=1):
        def setup(cfg):
            builds.append(impl)

            def run(i):
                order.append(impl)
                time.sleep(seconds)
            return Prepared(run)
        return Job("x", impl, {"M": m}, setup)

    jobs = [job("fastpeft", 0.001), job("peft", 0.002), job("reference", 0.004), job("reference", 0.001, m=2)]
    fast, peft, ref, other_shape = bench_main.run_group(jobs, _config(repeats=5), None)
    assert set(fast["vs"]) == {"peft", "reference"}  # not the M=2 reference: another shape
    assert fast["vs"]["peft"] == pytest.approx(0.5, rel=0.3) and fast["vs"]["reference"] == pytest.approx(0.25, rel=0.3)
    assert "vs" not in peft and "vs" not in ref and "vs" not in other_shape
    assert all(r["median_ms"] > 0 and "peak_mem_source" in r for r in (fast, peft, ref, other_shape))
    assert builds == ["fastpeft", "peft", "reference", "reference"] * 2
    timed = order[4:4 + 4 * 5]  # after the warm-up: 5 rounds of one call each
    assert [timed[4 * r] for r in range(5)] == ["fastpeft", "peft", "reference", "reference", "fastpeft"]
    assert bench_main.group_key(jobs[0]) != bench_main.group_key(jobs[3])


def test_micro_implementations_read_one_copy_of_the_weights():
    """Every implementation of a micro case gets the same weight tensors, and the dense layers wrap that memory
    without a copy (copies in different memory timed differently on identical calls)."""
    from fastpeft.bench import cases

    cfg = bench_main.make_config(bench_main.build_parser().parse_args(QUICK))
    w = cases._weights(cfg, 24, 40)
    assert cases._weights(cfg, 24, 40) is w
    layer = cases._dense_linear(w)
    assert layer.weight.data_ptr() == w.weight.data_ptr() and not layer.weight.requires_grad
    assert torch.equal(layer(torch.eye(40)), w.weight.t())
    other = cases._weights(cfg, 24, 48)  # another shape: its own seeded weights, the last shape's dropped
    assert other.weight.shape == (24, 48) and cases._weights(cfg, 24, 40) is not w
    assert torch.equal(cases._weights(cfg, 24, 40).weight, w.weight)  # the same seeded values again


def test_ia3_floor_times_the_layers_beside_the_bare_function(capsys):
    """bench/ia3_floor.py, one round: every micro shape, each layer's ratio to the bare reference function."""
    from bench import ia3_floor

    assert ia3_floor.main(["--rounds", "1", "--mode", "fwd_bwd"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(lines) == 2  # the cpu suite's two micro shapes
    for line in lines:
        assert all(label in line for label in ("bare-function 1.000,", "thinnest-module ", "reference ", "fastpeft "))


def test_micro_implementations_compute_the_same_thing():
    """The implementations of every micro layer case (fastpeft's module, the reference layer, PEFT's layer) give the
    same output on the same input: a bench ratio compares code doing one computation, and the reference row is a
    layer (an nn.Module) as the others are."""
    from fastpeft.bench import cases

    cfg = bench_main.make_config(bench_main.build_parser().parse_args(QUICK))
    for case in ("lora.fwd", "qlora.fwd", "dora.fwd", "ia3.fwd", "multi_lora.fwd"):
        jobs = [j for j in cases.micro_jobs(cfg) if j.case == case and j.params["M"] == 3]
        outputs = {j.impl: j.setup(cfg).run(0) for j in jobs}
        assert set(outputs) == {"fastpeft", "reference", "peft"}, case
        for impl, y in outputs.items():
            torch.testing.assert_close(y, outputs["reference"], rtol=1e-5, atol=1e-5, msg=f"{case} {impl}")
        assert torch.isfinite(outputs["reference"]).all() and outputs["reference"].abs().max() > 0


def test_check_cpu_bounds_and_its_a_a_control():
    """bench/check_cpu.py: the micro bounds on median per-round ratios (5 % allowance), the reference timed twice in
    each micro group (an A/A ratio, reported unbounded), none added to end-to-end groups."""
    from bench import check_cpu

    rounds = 5
    samples = {"fastpeft": [1.04] * rounds, "reference": [1.0] * rounds, "peft": [0.98] * rounds,
               check_cpu.AA_CONTROL: [1.1] * rounds}
    checks = {what: (round(value, 3), bound, ok) for what, value, bound, ok in check_cpu.bounds("ia3.fwd", samples)}
    assert checks["fastpeft / reference"] == (1.04, 1.05, True)
    assert checks["fastpeft / PEFT"] == (round(1.04 / 0.98, 3), 1.05, False)
    assert checks[check_cpu.AA_WHAT] == (1.1, float("inf"), True)
    assert "fastpeft / reference" not in dict((c[0], c) for c in check_cpu.bounds("lora.fwd", samples))

    def nothing(cfg):
        return Prepared(run=lambda i: None)

    micro = [Job("ia3.fwd", impl, {"M": 1}, nothing) for impl in ("fastpeft", "reference", "peft")]
    controlled = check_cpu.with_control(micro)
    assert [j.impl for j in controlled] == ["fastpeft", "reference", "peft", check_cpu.AA_CONTROL]
    assert controlled[-1].setup is micro[1].setup  # the same implementation, built again
    e2e = [Job("decode", impl, {}, nothing) for impl in ("hf", "peft", "fastpeft")]
    assert check_cpu.with_control(e2e) == e2e


def test_check_cpu_bounds_the_median_over_independent_runs():
    from bench import check_cpu

    per_run = [[("fastpeft / reference", r, 1.05, r <= 1.05), ("PEFT / x (speed-up, lower bound)", s, 3.0, s >= 3.0)]
               for r, s in ((1.2, 2.0), (1.0, 4.0), (1.01, 3.5))]
    combined = {what: rest for what, *rest in check_cpu.combine(per_run)}
    assert combined["fastpeft / reference"] == [1.01, 1.05, True, [1.2, 1.0, 1.01]]  # one bad run is outvoted
    assert combined["PEFT / x (speed-up, lower bound)"] == [3.5, 3.0, True, [2.0, 4.0, 3.5]]
    assert check_cpu.combine([per_run[0]])[0][3] is False


def test_fastpeft_and_reference_nf4_cases_need_no_bitsandbytes(monkeypatch):
    """Their NF4 weights come from NF4Weight.quantize (bitsandbytes' bits): without bitsandbytes only the rows that
    compare with it are unavailable."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    cfg = bench_main.make_config(bench_main.build_parser().parse_args([*QUICK, "--cases", "qlora.fwd,nf4_dequant"]))
    jobs = all_jobs(cfg)
    assert {j.case for j in jobs} == {"qlora.fwd", "qlora.fwd_bwd", "nf4_dequant"}
    for job in jobs:
        if job.impl in ("fastpeft", "reference"):
            job.setup(cfg).run(0)
        else:
            with pytest.raises(Unavailable, match="bitsandbytes"):
                job.setup(cfg)


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_random_adapters_put_dora_magnitudes_and_ia3_vectors_around_one(method):
    import peft

    from conftest import make_tiny_llama
    from fastpeft.bench.cases import _randomise_adapters

    config = (peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
              if method == "ia3" else peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    model = peft.get_peft_model(make_tiny_llama(), config)
    _randomise_adapters(model)
    vectors = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters()
                         if "ia3_l" in n or "magnitude" in n])
    others = [p.detach() for n, p in model.named_parameters()
              if p.requires_grad and "ia3_l" not in n and "magnitude" not in n]
    assert abs(float(vectors.mean()) - 1) < 0.01 and float(vectors.std()) > 0.01  # not the identity PEFT starts at
    assert all(float(p.abs().max()) > 0 and abs(float(p.mean())) < 0.01 for p in others)
