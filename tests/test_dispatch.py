"""Backend choice, `import fastpeft` side effects, and `fastpeft info`."""

import subprocess
import sys

import pytest
import torch

from fastpeft.ops.dispatch import backend_for


def test_auto_backend_by_device(monkeypatch):
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    assert backend_for(torch.device("cpu")) == "reference"
    assert backend_for(torch.device("cuda")) == "triton"


def test_env_overrides(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "reference")
    assert backend_for(torch.device("cuda")) == "reference"
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_for(torch.device("cpu")) == "triton"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend_for(torch.device("cpu"))


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="'cudnn' is not one of"):
        backend_for(torch.device("cpu"))


def test_import_has_no_side_effects():
    # a fresh interpreter: importing fastpeft must not import the heavy/optional packages or touch CUDA
    code = (
        "import sys, torch\n"
        "torch.cuda.is_available = lambda: (_ for _ in ()).throw(AssertionError('CUDA queried at import'))\n"
        "import fastpeft\n"
        "bad = [m for m in ('triton', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_info_reports_versions_backend_and_extension(capsys):
    from fastpeft.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("fastpeft 0.1.0", "torch ", "triton ", "bitsandbytes ", "device: ", "use: ", "CUDA extension",
                   "NF4 dispatch", "GEMV M <= 1", "dequantise + cuBLAS",
                   "plan, QLoRA forward M=1 4096x4096 r=16 (no GPU: the default table): nf4_lora_matmul/gemv"):
        assert needle in out


def test_interpreter_bf16_is_corrected_at_run_time():
    """Issue 16: with FASTPEFT_BACKEND=triton TRITON_INTERPRET=1 (no test conftest), a bf16 QLoRA layer with
    more than 16 tokens (the tl.dot GEMM) matches the float64 reference, forward and gradients."""
    code = (
        "import os\n"
        "os.environ.update(TRITON_INTERPRET='1', FASTPEFT_BACKEND='triton')\n"
        "import torch\n"
        "from fastpeft import reference\n"
        "from fastpeft.nf4 import NF4Weight\n"
        "from fastpeft.ops.lora import lora_linear\n"
        "torch.manual_seed(0)\n"
        "weight = NF4Weight.quantize(torch.randn(47, 65) / 8, 64, True)\n"
        "x = torch.randn(21, 65, dtype=torch.bfloat16, requires_grad=True)\n"
        "a = (torch.randn(8, 65, dtype=torch.bfloat16) / 8).requires_grad_()\n"
        "b = torch.randn(47, 8, dtype=torch.bfloat16, requires_grad=True)\n"
        "y = lora_linear(x, weight, None, a, b, 2.0)\n"
        "dy = torch.randn_like(y)\n"
        "grads = torch.autograd.grad(y, [x, a, b], dy)\n"
        "leaves = [t.detach().double().requires_grad_() for t in (x, a, b)]\n"
        "ref = reference.lora_linear(leaves[0], weight, None, leaves[1], leaves[2], 2.0)\n"
        "ref_grads = torch.autograd.grad(ref, leaves, dy.double())\n"
        "rel = lambda u, v: float((u.double() - v).norm() / v.norm())\n"
        "errors = [rel(y, ref)] + [rel(g, r) for g, r in zip(grads, ref_grads)]\n"
        "assert max(errors) < 2e-2, errors\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("backend, interpret, problem", [
    ("triton", "0", "needs TRITON_INTERPRET=1"),
    ("trtion", "1", "FASTPEFT_BACKEND='trtion' is not one of"),
])
def test_info_reports_a_bad_backend_setting_without_a_traceback(monkeypatch, capsys, backend, interpret, problem):
    """`fastpeft info` is what people run to debug: a backend that cannot work is a line, not a crash."""
    from fastpeft.cli import main

    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("with a CUDA device the Triton kernels need no interpreter")
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert main(["info"]) == 1
    out = capsys.readouterr().out
    assert "FASTPEFT_BACKEND problem: " in out and problem in out
    assert "CUDA extension" in out  # the lines after the problem are printed too


def test_the_backend_variable_is_read_at_every_call(monkeypatch):
    """The parsed value is kept only while the variable holds the same string: each change is seen at the next call,
    a bad value raises every time, and unsetting it is ``auto`` again."""
    from fastpeft.ops.dispatch import requested_backend

    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    assert requested_backend() == "auto"
    for value, expected in (("reference", "reference"), ("triton", "triton"), (" Reference ", "reference"),
                            ("", "auto"), ("triton", "triton")):
        monkeypatch.setenv("FASTPEFT_BACKEND", value)
        assert requested_backend() == expected == requested_backend()
    monkeypatch.setenv("FASTPEFT_BACKEND", "bogus")
    for _ in range(2):
        with pytest.raises(ValueError, match="'bogus' is not one of"):
            requested_backend()
    monkeypatch.delenv("FASTPEFT_BACKEND")
    assert requested_backend() == "auto"
