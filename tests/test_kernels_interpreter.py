"""The bf16 correction of Triton's interpreter (``fastpeft.kernels.interpreter``), installed by conftest.

bf16 results are compared with torch on the same values; fp16 / fp32 calls must give, bit for bit, what
the interpreter's own methods give.
"""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE
from fastpeft.kernels import interpreter

pytestmark = pytest.mark.skipif(DEVICE.type == "cuda", reason="the correction is for Triton's CPU interpreter")


@triton.jit
def _dot_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    offs_m, offs_k, offs_n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + offs_m[:, None] * K + offs_k[None, :])
    b = tl.load(b_ptr + offs_k[:, None] * N + offs_n[None, :])
    acc = tl.dot(a, b, acc=tl.zeros((M, N), dtype=tl.float32), input_precision="ieee")
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc)


@triton.jit
def _cast_kernel(src_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(src_ptr + offs, mask=mask).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fma_kernel(a_ptr, b_ptr, c_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a, b, c = tl.load(a_ptr + offs), tl.load(b_ptr + offs), tl.load(c_ptr + offs)
    tl.store(out_ptr + offs, a * b + c)


def test_installed_by_conftest():
    assert interpreter.install_bf16_interpreter_fix() is True
    assert set(interpreter.ORIGINALS) >= {"create_dot", "cast_impl", "binary_op"}


def test_bf16_dot_uses_values_and_fp32_accumulation():
    a = torch.randn(16, 32, dtype=torch.bfloat16) * 3
    b = torch.randn(32, 16, dtype=torch.bfloat16) * 3
    out = torch.full((16, 16), float("nan"))
    _dot_kernel[(1,)](a, b, out, M=16, K=32, N=16)
    expected = a.double() @ b.double()  # exact products of the bf16 values; fp32 sums stay within 1e-6
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)


def test_fp32_to_bf16_cast_rounds_to_nearest_even():
    one = 1.0
    ulp = 2.0 ** -7  # bf16 spacing at 1
    values = torch.tensor(
        [one + ulp / 2, one + 3 * ulp / 2,  # ties: to even (down, then up)
         one + ulp / 2 + 2 ** -20, one + ulp / 4,  # above / below half
         -(one + ulp / 2), 3.0e38, 1e-40, -0.0, float("inf"), -float("inf"), float("nan")]
        + torch.randn(200).mul(100).tolist(),
        dtype=torch.float32,
    )
    out = torch.empty(values.shape, dtype=torch.bfloat16)
    _cast_kernel[(1,)](values, out, values.numel(), BLOCK=256)
    expected = values.to(torch.bfloat16)
    assert torch.equal(out.view(torch.int16)[~values.isnan()], expected.view(torch.int16)[~values.isnan()])
    assert out[values.isnan()].isnan().all()
    back = torch.empty(values.shape, dtype=torch.float32)
    _cast_kernel[(1,)](expected, back, values.numel(), BLOCK=256)  # bf16 -> fp32 is exact
    assert torch.equal(back.nan_to_num(), expected.float().nan_to_num())


def test_bf16_arithmetic_uses_values():
    a, b, c = (torch.randn(64, dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty(64, dtype=torch.bfloat16)
    _fma_kernel[(1,)](a, b, c, out, BLOCK=64)
    # each op rounds to bf16 (or one fused rounding where the op is contracted to an fma): within 1 bf16 ulp
    torch.testing.assert_close(out, a * b + c, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp16_fp32_unchanged(dtype):
    """Every patched method hands non-bf16 calls to the interpreter's own, with identical results."""
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle, interpreter_builder

    tl_dtype = {torch.float16: tl.float16, torch.float32: tl.float32}[dtype]
    rng = np.random.default_rng(0)
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    a = TensorHandle(rng.standard_normal((16, 16)).astype(np_dtype), tl_dtype)
    b = TensorHandle(rng.standard_normal((16, 16)).astype(np_dtype), tl_dtype)
    acc = TensorHandle(np.zeros((16, 16), np.float32), tl.float32)
    originals = interpreter.ORIGINALS
    assert InterpreterBuilder.create_dot is not originals["create_dot"]
    pairs = [
        ("create_dot", (a, b, acc, "ieee", 0)),
        ("cast_impl", (a, tl.float64)),
        ("binary_op", (a, b, np.multiply)),
        ("unary_op", (a, np.exp)),
        ("create_fma", (a, b, a)),
    ]
    for name, args in pairs:
        ours = getattr(InterpreterBuilder, name)(interpreter_builder, *args)
        theirs = originals[name](interpreter_builder, *args)
        assert ours.dtype == theirs.dtype and ours.data.dtype == theirs.data.dtype, name
        np.testing.assert_array_equal(ours.data, theirs.data, err_msg=name)


def test_rounding_helpers_match_torch():
    values = torch.randn(10_000).mul(torch.logspace(-30, 30, 10_000))
    bits = interpreter.fp32_to_bf16_bits(values.numpy())
    assert np.array_equal(bits.view(np.int16), values.to(torch.bfloat16).view(torch.int16).numpy())
    assert np.array_equal(interpreter.bf16_bits_to_fp32(bits), values.to(torch.bfloat16).float().numpy())


def test_installing_on_an_interpreter_numpy_breaks_raises_the_constraint(monkeypatch):
    monkeypatch.setattr(interpreter, "_installed", False)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(np, "__version__", "2.4.0")
    with pytest.raises(RuntimeError, match=r"Triton 3\.6\.0's interpreter .* needs numpy < 2\.4"):
        interpreter.install_bf16_interpreter_fix()
