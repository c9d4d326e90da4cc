"""bench/gpu_accept.py, the GPU acceptance run, as a CPU dry run (tiny shapes; the checks' kernels in Triton's
interpreter): what it writes (at most 8 files, each check and timed subgroup on disk as it finishes), its budget
(later groups skipped, the summary still written), SIGTERM, and bitsandbytes absent (skips, never failures)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

from bench import gpu_accept

ROOT = Path(__file__).resolve().parents[1]


def _command(out: Path, *options: str) -> list:
    return [sys.executable, "-m", "bench.gpu_accept", "--out", str(out), "--dry-run", "--no-bnb", *options]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def _lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the whole correctness pass and two timing groups (a micro and an end-to-end one)."""
    out = tmp_path_factory.mktemp("accept")
    done = subprocess.run(_command(out, "--groups", "qlora,decode", "--budget-s", "900"), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=1200)
    return out, done


def test_the_dry_run_passes_and_writes_at_most_eight_files(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(gpu_accept.FILES) and len(names) <= 8
    assert all(p.is_file() for p in out.iterdir())
    data = json.loads((out / "results.json").read_text())
    statuses = Counter(r["status"] for r in data["correctness"])
    assert statuses["pass"] > 0 and statuses["fail"] == statuses["error"] == statuses["not-run"] == 0, statuses
    families = {r["family"] for r in data["correctness"] if r["status"] == "pass"}
    assert families == {"nf4_dequantize", "qlora", "dora", "ia3", "multi_lora", "parity", "coverage"}
    # every plan the dispatch picks ran (the coverage checks read the launches of the passing checks)
    coverage = [r for r in data["correctness"] if r["family"] == "coverage"]
    assert len(coverage) == 6 and all(r["status"] == "pass" for r in coverage)
    summary = (out / "summary.md").read_text()
    assert "CPU DRY RUN" in summary and "## Headline ratios" in summary and "fastpeft / peft" in summary
    import tarfile

    with tarfile.open(out / "plots.tar.gz") as archive:
        assert {"qlora.fwd.png", "qlora.fwd_bwd.png", "decode.png"} <= set(archive.getnames())


def test_each_group_is_on_disk_before_the_next_starts(dry_run):
    out, _ = dry_run
    lines = _lines(out / "timings.jsonl")
    starts = [(i, r) for i, r in enumerate(lines) if r["kind"] == "group-start"]
    assert [r["group"] for _, r in starts] == ["roofline", "qlora", "decode"]
    for (first, group), (nxt, following) in zip(starts, starts[1:] + [(len(lines), None)]):
        rows = [r for r in lines if r.get("group") == group["group"] and r["kind"] in ("result", "roofline")]
        assert rows, group["group"]
        # appended in order, and stamped before the next group began
        assert all(first < lines.index(r) < nxt for r in rows)
        if following is not None:
            assert max(r["written"] for r in rows) <= following["written"]
    qlora = [r for r in lines if r.get("group") == "qlora" and r["kind"] == "result"]
    assert {r["subgroup"] for r in qlora} == {f"qlora.{mode} M={m} 64x128" for mode in ("fwd", "fwd_bwd")
                                              for m in (1, 7)}
    checks = _lines(out / "correctness.jsonl")
    assert all(a["written"] <= b["written"] for a, b in zip(checks, checks[1:]))


def test_without_bitsandbytes_its_comparisons_are_skips_not_failures(dry_run):
    out, _ = dry_run
    data = json.loads((out / "results.json").read_text())
    assert "--no-bnb" in data["bitsandbytes"]
    rows = data["results"]
    assert not [r for r in rows if "error" in r]
    bnb_rows = [r for r in rows if r["impl"] == "peft+bnb" or r["case"] == "decode_4bit"]
    assert bnb_rows and all("bitsandbytes not importable" in r["skipped"] for r in bnb_rows)
    # fastpeft's own QLoRA rows need no bitsandbytes: measured
    assert all("median_ms" in r for r in rows if r["case"].startswith("qlora") and r["impl"] == "fastpeft")
    nf4_parity = [r for r in data["correctness"] if r["check"].startswith("parity") and " nf4 " in r["check"]]
    assert len(nf4_parity) == 6 and all(r["status"] == "skip" for r in nf4_parity)
    summary = (out / "summary.md").read_text()
    assert "## Skipped implementations" in summary and "### Skipped" in summary


def test_a_small_budget_skips_the_later_groups_and_still_writes_the_summary(tmp_path):
    done = subprocess.run(_command(tmp_path, "--budget-s", "12", "--checks-budget-s", "2", "--grace-s", "5"),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1  # a pass cut short accepts nothing
    assert {p.name for p in tmp_path.iterdir()} <= set(gpu_accept.FILES)
    data = json.loads((tmp_path / "results.json").read_text())
    # the shard either logged its checks as not run, or was killed before it had imported them
    assert data["checks_note"] or any(r["status"] == "not-run" for r in data["correctness"])
    assert data["groups"]["decode"] == "skipped: the run's budget was spent"
    summary = (tmp_path / "summary.md").read_text()
    assert "| decode | skipped: the run's budget was spent |" in summary and "not run (budget)" in summary


def test_sigterm_stops_the_run_and_still_writes_the_summary(tmp_path):
    run = subprocess.Popen(_command(tmp_path, "--budget-s", "900"), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    log = tmp_path / "correctness.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.5)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 1
    # stopped in the correctness pass: no timings file yet, everything else written
    assert {p.name for p in tmp_path.iterdir()} == set(gpu_accept.FILES) - {"timings.jsonl"}
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["stopped"].startswith("SIGTERM") and len(data["correctness"]) >= 2
    assert "**Stopped by SIGTERM" in (tmp_path / "summary.md").read_text()


def _args(**options):
    return types.SimpleNamespace(**{"no_bnb": False, "bnb_wheel": None, **options})


def test_a_carried_wheel_is_installed_for_the_children_only_when_bitsandbytes_is_missing(tmp_path, monkeypatch):
    real_find_spec = gpu_accept.importlib.util.find_spec
    monkeypatch.setattr(gpu_accept.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    commands = []

    def pip(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")
    monkeypatch.setattr(gpu_accept.subprocess, "run", pip)
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    env, status = gpu_accept.bitsandbytes_for_children(_args(bnb_wheel=str(wheel)), str(tmp_path), "/repo")
    target = str(tmp_path / "bitsandbytes")
    assert commands == [[sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", "--target",
                         target, str(wheel)]]
    assert env == {"PYTHONPATH": f"{target}{os.pathsep}/repo"} and "installed from" in status
    monkeypatch.setattr(gpu_accept.subprocess, "run",
                        lambda command, **kw: subprocess.CompletedProcess(command, 1, "", "no matching platform"))
    env, status = gpu_accept.bitsandbytes_for_children(_args(bnb_wheel=str(wheel)), str(tmp_path), "/repo")
    assert env == {} and "no matching platform" in status and "skipped" in status
    monkeypatch.setattr(gpu_accept, "WHEEL_GLOB", "bench/no-such-folder/*.whl")
    env, status = gpu_accept.bitsandbytes_for_children(_args(), str(tmp_path), "/repo")
    assert env == {} and "no wheel" in status
    env, status = gpu_accept.bitsandbytes_for_children(_args(no_bnb=True), str(tmp_path), "/repo")
    assert env == {gpu_accept.WITHOUT_BNB_ENV: "1"} and "--no-bnb" in status


def test_a_child_told_to_run_without_bitsandbytes_cannot_import_it():
    code = ("from bench.gpu_accept import hide_bitsandbytes_if_asked; hide_bitsandbytes_if_asked(); "
            "import importlib.util; assert importlib.util.find_spec('bitsandbytes') is None\n"
            "try:\n    import bitsandbytes\nexcept ImportError:\n    print('hidden')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**_env(), gpu_accept.WITHOUT_BNB_ENV: "1"})
    assert done.stdout.strip() == "hidden", done.stderr


def test_bad_options_are_refused():
    for options in (["--budget-s", "0"], ["--shards", "0"], ["--groups", "qlora,nope"]):
        with pytest.raises(SystemExit, match="gpu_accept"):
            gpu_accept.main(["--out", "/nonexistent-never-made", *options])


@pytest.mark.parametrize("arch", [(8, 0), (8, 9), (9, 0)])
def test_the_gpu_pass_shapes_reach_every_nf4_plan_in_every_dtype(arch):
    """The coverage checks can pass on the GPU: its QLoRA checks' shapes (forward N = out, dx N = in) plan the GEMV,
    the split-K GEMM and dequantise + cuBLAS in each dtype."""
    from bench.gpu_checks import DTYPES, GPU_SIZES
    from fastpeft.kernels.nf4_dispatch import nf4_path

    s = GPU_SIZES
    shapes = [(*s.odd, s.odd_m)] + [(out_f, in_f, s.production_m) for out_f, in_f in s.production]
    for dtype in DTYPES:
        planned = {nf4_path(m, n, dtype == torch.float32, arch) for out_f, in_f, ms in shapes for m in ms
                   for n in (out_f, in_f)}
        assert planned == {"gemv", "splitk", "cublas"}, (dtype, planned)


def test_the_gpu_timing_groups_build_their_subgroups():
    """Each group's subgroups at the GPU sizes (built, not run: no CUDA needed), with unique implementation names
    and ratios between implementations the subgroup has."""
    from bench import gpu_timings
    from fastpeft.bench.cases import BenchConfig

    s = gpu_timings.GPU_SIZES
    cfg = BenchConfig(micro_m=list(s.m), micro_features=list(s.features), micro_adapters=s.adapters, **s.bench)
    counts = {}
    for name, (_, build, _) in gpu_timings.GROUPS.items():
        subgroups = build(s, cfg)
        counts[name] = len(subgroups)
        for subgroup in subgroups:
            impls = [job.impl for job in subgroup.jobs]
            assert len(set(impls)) == len(impls)
            assert all(num in impls and den in impls for num, den in subgroup.ratios), subgroup.label
    assert counts == {"qlora": 16, "nf4_gemv": 3, "dora": 8, "ia3": 8, "multi_lora": 2, "train_step": 2, "decode": 2}


def test_coverage_fails_for_a_plan_no_passing_check_launched():
    from bench.gpu_checks import coverage

    def record(status, dtype, *launched):
        return {"check": "x", "family": "qlora", "status": status, "detail": {"dtype": dtype, "launched": launched}}
    records = [record("pass", "bfloat16", "nf4_lora_matmul/gemv", "nf4_dequantize/tiles"),
               record("fail", "bfloat16", "nf4_lora_matmul/splitk"),  # a failed check covers nothing
               record("pass", "float16", "nf4_lora_matmul/gemv", "nf4_lora_matmul/splitk", "nf4_dequantize/tiles")]
    results = {r["check"]: r for r in coverage(records)}
    assert results["coverage qlora bfloat16"]["status"] == "fail"
    assert "nf4_lora_matmul/splitk" in results["coverage qlora bfloat16"]["detail"]
    assert results["coverage qlora float16"]["status"] == "pass"
    assert results["coverage qlora float32"]["status"] == "fail"
    assert all(results[f"coverage multi_lora {d}"]["status"] == "fail" for d in ("bfloat16", "float16", "float32"))
