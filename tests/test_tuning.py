"""``fastpeft tune``'s logic on CPU: the crossover search, the file it writes, how the NF4 dispatch prefers
it, and the fallback on a bad file (the timer is injected: no GPU, no kernel timing)."""

import json

import pytest
import torch

from fastpeft.kernels import nf4_dispatch, tune_file, tuning

from conftest import DEVICE


def _synthetic(variant, m, n, k):
    """GEMV linear in M, split-K a fixed cost plus a slope, cuBLAS a larger fixed cost; wider N favours
    cuBLAS earlier: crossovers GEMV -> split-K after M = 3, split-K -> cuBLAS after M = 70 (N = 128) / 17."""
    wide = n > 128
    return {"gemv": float(m), "splitk": 3.0 + 0.1 * m, "cublas": (5.0 if wide else 10.0) + 0.01 * m}[variant]


def test_crossovers_take_the_first_crossing():
    times = {m: {v: _synthetic(v, m, 128, 64) for v in tuning.VARIANTS} for m in (1, 2, 4, 8, 64, 128)}
    assert tuning.crossovers(times) == (2, 64)
    # cuBLAS never loses: every M stays on Triton; the GEMV never wins: gemv_max_m = 0
    times = {m: {"gemv": 9.0, "splitk": 1.0, "cublas": 5.0} for m in (1, 16)}
    assert tuning.crossovers(times) == (0, 16)
    # a GEMV not timed (None, above GEMV_TUNE_MAX_M) loses
    times = {m: {v: _synthetic(v, m, 128, 64) for v in tuning.VARIANTS} for m in (1, 2, 16)}
    times[2]["gemv"] = None
    assert tuning.crossovers(times) == (1, 16)


def test_tune_writes_tiers_the_dispatch_prefers(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPEFT_TUNE_DIR", str(tmp_path))
    monkeypatch.setattr(tune_file, "_loaded", {})
    calls = []

    def timer(fn, variant, m, n, k):
        calls.append((variant, m, n, k))
        return _synthetic(variant, m, n, k)

    content = tuning.tune(timer, shapes=((128, 64), (1024, 64)), m_grid=(1, 2, 4, 16, 64, 128), device=DEVICE,
                          arch=(9, 0), gpu="test GPU", sms=4)
    # the GEMV is timed up to GEMV_TUNE_MAX_M = 8 rows only (M = 1, 2, 4 of the grid)
    assert len(calls) == 2 * (6 * 2 + 3) and nf4_dispatch._overrides == {}
    assert {m for variant, m, _, _ in calls if variant == "gemv"} == {1, 2, 4}
    saved = json.loads((tmp_path / "sm_90.json").read_text())
    assert [row["gemv"] is None for row in saved["measurements"][:6]] == [False] * 3 + [True] * 3
    assert saved == content and saved["gpu"] == "test GPU" and len(saved["measurements"]) == 12
    # N = 1024: 16 tiles / 4 SMs = 4 waves, cuBLAS from M > 16; N = 128 (and narrower): M <= 64 on Triton
    assert saved["tiers"] == [[4.0, 2, 16], [0.0, 2, 64]]
    assert nf4_dispatch.nf4_path(2, 1024, False, (9, 0), sm_count=4) == "gemv"
    assert nf4_dispatch.nf4_path(16, 1024, False, (9, 0), sm_count=4) == "splitk"
    assert nf4_dispatch.nf4_path(17, 1024, False, (9, 0), sm_count=4) == "cublas"
    assert nf4_dispatch.nf4_path(64, 64, False, (9, 0), sm_count=4) == "splitk"
    assert any("measured on this GPU" in line for line in nf4_dispatch.describe((9, 0)))
    # the shipped table still serves other architectures, fp32, and every override wins over the file
    assert nf4_dispatch.nf4_path(16, 1024, False, (8, 0), sm_count=4) == "splitk"
    assert nf4_dispatch.nf4_path(3, 1024, False, (9, 0), sm_count=4) == "splitk"
    monkeypatch.setenv("FASTPEFT_NF4_TRITON_MAX_M", "1000")
    assert nf4_dispatch.nf4_path(500, 1024, False, (9, 0), sm_count=4) == "splitk"


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": 99, "tiers": []}),
                                  json.dumps({"format": 1, "tiers": [[1.0, 8, 4]]})])
def test_a_bad_tune_file_warns_and_falls_back_to_the_table(tmp_path, monkeypatch, text):
    monkeypatch.setenv("FASTPEFT_TUNE_DIR", str(tmp_path))
    monkeypatch.setattr(tune_file, "_loaded", {})
    (tmp_path / "sm_90.json").write_text(text)
    with pytest.warns(UserWarning, match="ignoring the fastpeft tune file"):
        assert nf4_dispatch.nf4_path(16, 4096, False, (9, 0)) == "cublas"  # the shipped sm90 table
    assert nf4_dispatch.nf4_path(16, 4096, False, (9, 0)) == "cublas"  # warned once, remembered


def test_tune_needs_a_gpu(capsys):
    from fastpeft.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tune would run")
    assert main(["tune"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_cli_timer_is_the_harness_median():
    from fastpeft.bench.timing import call_timer

    calls = []
    timer = call_timer(torch.device("cpu"), warmup=2, repeats=5)
    ms = timer(lambda: calls.append(1), variant="gemv", m=1, n=64, k=64)
    assert isinstance(ms, float) and ms >= 0.0 and len(calls) == 2 + 5
