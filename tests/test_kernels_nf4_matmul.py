"""The fused NF4 GEMM + LoRA epilogue kernel against the float64 reference (Triton's interpreter on CPU)."""

import dataclasses
import threading

import pytest
import torch

from fastpeft.kernels.plan import recording
from fastpeft.nf4 import NF4Weight

from conftest import DEVICE, assert_rel_close, kernel_dtypes, non_contiguous, poisoned

kernels = pytest.importorskip("fastpeft.kernels.nf4_matmul")


def _reference(a, weight, transpose_weight, bias, lora_h, lora_expand, scaling, col_scale):
    w = weight.dequantize(torch.float64)
    out = a.double() @ (w if transpose_weight else w.T)
    if lora_h is not None:
        out = out + scaling * (lora_h.double() @ lora_expand.double())
    if col_scale is not None:
        out = out * col_scale.double()
    return out if bias is None else out + bias.double()


# (M, in, out, r), none block multiples: odd in-features take the element-wise decode; 128 and 192 the
# vector decode with whole blocks per row (one nested absmax per block), 100 with blocks straddling rows;
# 512 and 1024 rows of whole groups of blocks (one nested absmax per row and group; 1024: two groups), 128, 512
# and 1024 rows inside one nested block each (the forward loads it once per program; 20 rows of 1024 span two);
# 33 tokens of 256: the 64-token tiles on whole blocks (1 step per pass forward, 2 in dx, a partial last pass).
CASES = [(1, 65, 47, 1), (3, 128, 40, 4), (7, 33, 17, 8), (19, 192, 95, 16), (40, 100, 33, 64), (1, 512, 24, 8),
         (5, 1024, 20, 2), (33, 256, 130, 4)]
# thresholds (FASTPEFT_NF4_GEMV_MAX_M, FASTPEFT_NF4_TRITON_MAX_M) that force each variant at every M
FORCE = {"gemv": ("64", "64"), "splitk": ("0", "64"), "cublas": ("0", "0")}



@pytest.mark.parametrize("transpose_weight", [False, True])
@pytest.mark.parametrize("variant, m, in_features, out_features, rank",
                         [(v, *case) for v in sorted(FORCE) for case in CASES if v != "gemv" or case[0] <= 8])
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_nf4_lora_matmul_matches_reference(monkeypatch, variant, m, in_features, out_features, rank,
                                           transpose_weight, dtype):
    gemv_max, triton_max = FORCE[variant]
    monkeypatch.setenv("FASTPEFT_NF4_GEMV_MAX_M", gemv_max)
    monkeypatch.setenv("FASTPEFT_NF4_TRITON_MAX_M", triton_max)
    double_quant = rank % 2 == 0  # alternate, so both absmax formats meet every variant
    with_bias = rank != 8
    weight = NF4Weight.quantize(torch.randn(out_features, in_features, device=DEVICE), 64, double_quant)
    k, n = (out_features, in_features) if transpose_weight else (in_features, out_features)
    a = non_contiguous(torch.randn(m, k, device=DEVICE, dtype=dtype))
    lora_h = torch.randn(m, rank, device=DEVICE, dtype=dtype)
    lora_expand = torch.randn(n, rank, device=DEVICE, dtype=dtype).t()  # a transposed view, like Bᵀ
    bias = torch.randn(n, device=DEVICE, dtype=dtype) if with_bias else None
    out = poisoned((m, n), dtype)
    plan = kernels.plan_nf4_lora_matmul(m, n, k, rank, transpose_weight=transpose_weight, in_features=in_features,
                                        fp32=dtype == torch.float32)
    assert plan.variant == variant
    kernels.nf4_lora_matmul(a, weight, transpose_weight=transpose_weight, bias=bias, lora_h=lora_h,
                            lora_expand=lora_expand, scaling=0.7, out=out)
    ref = _reference(a, weight, transpose_weight, bias, lora_h, lora_expand, 0.7, None)
    assert_rel_close(out, ref, dtype)


@pytest.mark.parametrize("m", [3, 21])
def test_nf4_lora_matmul_col_scale_and_no_lora(m):
    weight = NF4Weight.quantize(torch.randn(47, 65, device=DEVICE), 32, double_quant=True)
    a = torch.randn(m, 65, device=DEVICE)
    col_scale = torch.rand(47, device=DEVICE) + 0.5
    bias = torch.randn(47, device=DEVICE)
    out = kernels.nf4_lora_matmul(a, weight, bias=bias, col_scale=col_scale)
    assert_rel_close(out, _reference(a, weight, False, bias, None, None, 0.0, col_scale), torch.float32)
    lora_h, lora_expand = torch.randn(m, 4, device=DEVICE), torch.randn(4, 47, device=DEVICE)
    out = kernels.nf4_lora_matmul(a, weight, lora_h=lora_h, lora_expand=lora_expand, scaling=2.0, col_scale=col_scale)
    assert_rel_close(out, _reference(a, weight, False, None, lora_h, lora_expand, 2.0, col_scale), torch.float32)


@pytest.mark.parametrize("transpose_weight", [False, True])
def test_nf4_lora_matmul_reads_an_unaligned_packed_weight_by_bytes(transpose_weight):
    """Packed bytes that do not start on 4 bytes (a view into a larger buffer) are planned without 32-bit word
    loads, and the product is still the reference's."""
    weight = NF4Weight.quantize(torch.randn(40, 256, device=DEVICE), 64, double_quant=True)
    buffer = torch.empty(weight.packed.numel() + 1, dtype=torch.uint8, device=DEVICE)
    buffer[1:].copy_(weight.packed.view(-1))
    shifted = dataclasses.replace(weight, packed=buffer[1:].view(weight.packed.shape))
    assert shifted.packed.data_ptr() % 4 == 1
    k, n = (40, 256) if transpose_weight else (256, 40)
    for m in (1, 6):
        words = kernels.plan_nf4_lora_matmul(m, n, k, nested=True, transpose_weight=transpose_weight, in_features=256,
                                             fp32=True)
        unaligned = kernels.plan_nf4_lora_matmul(m, n, k, nested=True, transpose_weight=transpose_weight, in_features=256,
                                                 fp32=True, packed_words=False)
        assert not unaligned.constexprs["WORDS"] and unaligned.constexprs["GROUPED"]
        assert words.constexprs["WORDS"] == (words.variant == "splitk" and not transpose_weight)
        a = torch.randn(m, k, device=DEVICE)
        for packed, expected in ((weight, words), (shifted, unaligned)):  # the launcher plans by the pointer
            with recording() as launches:
                kernels.nf4_lora_matmul(a, packed, transpose_weight=transpose_weight)
            assert launches[0][0] == expected
        out = kernels.nf4_lora_matmul(a, shifted, transpose_weight=transpose_weight)
        assert_rel_close(out, _reference(a, weight, transpose_weight, None, None, None, 1.0, None), torch.float32)


def test_nf4_lora_matmul_rejects_bad_inputs():
    weight = NF4Weight.quantize(torch.randn(17, 64, device=DEVICE), 64)
    a = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="a has 17 columns"):
        kernels.nf4_lora_matmul(torch.randn(3, 17, device=DEVICE), weight)
    with pytest.raises(ValueError, match="a has 64 columns"):
        kernels.nf4_lora_matmul(a, weight, transpose_weight=True)
    with pytest.raises(TypeError, match="must be an NF4Weight"):
        kernels.nf4_lora_matmul(a, torch.randn(17, 64))
    with pytest.raises(TypeError, match="a dtype"):
        kernels.nf4_lora_matmul(a.long(), weight)
    with pytest.raises(ValueError, match="given together"):
        kernels.nf4_lora_matmul(a, weight, lora_h=torch.randn(3, 2, device=DEVICE))
    with pytest.raises(ValueError, match=r"must be \(M, r\) = \(3, r\)"):
        kernels.nf4_lora_matmul(a, weight, lora_h=torch.randn(3, 2, device=DEVICE),
                                lora_expand=torch.randn(2, 64, device=DEVICE))
    with pytest.raises(TypeError, match="lora_h dtype"):
        kernels.nf4_lora_matmul(a, weight, lora_h=torch.randn(3, 2, device=DEVICE).half(),
                                lora_expand=torch.randn(2, 17, device=DEVICE))
    with pytest.raises(ValueError, match="bias must be a 1-D tensor of 17"):
        kernels.nf4_lora_matmul(a, weight, bias=torch.randn(64, device=DEVICE))
    with pytest.raises(TypeError, match="bias dtype"):
        kernels.nf4_lora_matmul(a, weight, bias=torch.randn(17, device=DEVICE).half())
    with pytest.raises(ValueError, match="out must be"):
        kernels.nf4_lora_matmul(a, weight, out=torch.empty(3, 64, device=DEVICE))


@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_nf4_gemv_split_k_adds_the_epilogue_once(dtype):
    # few output tiles and K = 5 blocks of the GEMV's BLOCK_K: the plan splits K five ways (tests/test_plan.py)
    weight = NF4Weight.quantize(torch.randn(5, 300, device=DEVICE), 64, double_quant=True)
    a = torch.randn(3, 300, device=DEVICE, dtype=dtype)
    lora_h, lora_expand = torch.randn(3, 2, device=DEVICE, dtype=dtype), torch.randn(2, 5, device=DEVICE, dtype=dtype)
    bias, col_scale = torch.randn(5, device=DEVICE, dtype=dtype), torch.rand(5, device=DEVICE) + 0.5
    out = poisoned((3, 5), dtype)
    kernels.nf4_lora_matmul(a, weight, bias=bias, lora_h=lora_h, lora_expand=lora_expand, scaling=1.5,
                            col_scale=col_scale, out=out)
    assert_rel_close(out, _reference(a, weight, False, bias, lora_h, lora_expand, 1.5, col_scale), dtype)


@pytest.mark.parametrize("arch", [None, (8, 0), (8, 9), (9, 0)])
def test_plans_dispatch_by_m(arch):
    """A decode row takes the GEMV, a few rows up to mid M the split-K tl.dot GEMM, large M (prefill,
    training) cuBLAS."""
    plan = kernels.plan_nf4_lora_matmul
    assert plan(1, 4096, 4096, 16, arch=arch).variant == "gemv"
    for m in (2, 4):  # bitsandbytes' custom-kernel floor: below it never cuBLAS, whatever the waves
        assert plan(m, 4096, 4096, 16, arch=arch).variant == "splitk"
    mid = plan(16, 11008, 4096, 16, arch=arch)  # 172 column tiles of 64: more than one wave on every table
    assert mid.variant == "splitk" and mid.constexprs["USE_DOT"] and mid.constexprs["BLOCK_K"] == 64
    # 86 tiles of 128 rows: K split in 3 slices of whole groups to fill the target programs
    assert mid.constexprs["BLOCK_N"] == 128 and mid.constexprs["BLOCK_M"] == 16
    target = kernels.SPLITK_CONFIGS.get(arch, kernels.SPLITK_CONFIGS["default"])["TARGET_PROGRAMS"]
    assert mid.constexprs["SPLIT_K"] == target // 86 == 3 and mid.runtime["k_per_split"] % (4 * 64) == 0
    for m in (512, 4096):
        for transpose in (False, True):
            large = plan(m, 4096, 4096, 16, transpose_weight=transpose, arch=arch)
            assert (large.variant, large.path, large.kernel) == ("cublas", "torch", None)
    # fp32 has no tensor-core path: cuBLAS from 8 rows
    assert plan(8, 4096, 4096, 16, fp32=True, arch=arch).variant == "cublas"
    assert plan(7, 4096, 4096, 16, fp32=True, arch=arch).variant == "splitk"


def test_dispatch_thresholds_follow_waves_and_overrides(monkeypatch):
    from fastpeft.kernels import nf4_dispatch

    # sm_90, 132 SMs: an output of 3 waves of 64-column tiles keeps M <= 64 on Triton, 1 wave M <= 32
    assert nf4_dispatch.nf4_path(64, 3 * 132 * 64, False, (9, 0)) == "splitk"
    assert nf4_dispatch.nf4_path(65, 3 * 132 * 64, False, (9, 0)) == "cublas"
    assert nf4_dispatch.nf4_path(33, 132 * 64, False, (9, 0)) == "cublas"
    assert nf4_dispatch.nf4_path(128, 3 * 108 * 64, False, (8, 0)) == "splitk"
    monkeypatch.setenv("FASTPEFT_NF4_TRITON_MAX_M", "1000")
    assert nf4_dispatch.nf4_path(999, 64, False, (9, 0)) == "splitk"
    # 8 output tiles: K is split 16 ways (GemLite's SPLIT_K 8-16), one group of 4 steps each, to fill the GPU
    split = kernels.plan_nf4_lora_matmul(16, 1024, 4096, arch=(9, 0))
    assert split.constexprs["SPLIT_K"] == 16 and split.grid == (1, 8, 16) and split.runtime["k_per_split"] == 256
    nf4_dispatch.set_thresholds(gemv_max_m=8)
    try:
        assert nf4_dispatch.nf4_path(8, 64, False, None) == "gemv"
        assert any("FASTPEFT_NF4_GEMV_MAX_M=8" in line for line in nf4_dispatch.describe(None))
    finally:
        nf4_dispatch.set_thresholds()
    monkeypatch.setenv("FASTPEFT_NF4_GEMV_MAX_M", "four")
    with pytest.raises(ValueError, match="FASTPEFT_NF4_GEMV_MAX_M='four' is not an integer"):
        nf4_dispatch.nf4_path(1, 64, False, None)


def test_dequant_buffer_is_reused_across_layers(monkeypatch):
    """The cuBLAS path dequantises every layer into one buffer per device and dtype, grown to the largest
    layer: the dense weights of two layers never coexist."""
    from fastpeft import nf4 as nf4_module

    monkeypatch.setattr(nf4_module, "_thread_buffers", threading.local())
    monkeypatch.setenv("FASTPEFT_NF4_GEMV_MAX_M", "0")
    monkeypatch.setenv("FASTPEFT_NF4_TRITON_MAX_M", "0")
    small = NF4Weight.quantize(torch.randn(16, 64, device=DEVICE), 64)
    large = NF4Weight.quantize(torch.randn(24, 128, device=DEVICE), 64, double_quant=True)
    allocations = []
    original_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocations.append(a) or original_empty(*a, **k))
    for weight in (small, large, small, large):
        a = torch.randn(5, weight.in_features, device=DEVICE)
        out = kernels.nf4_lora_matmul(a, weight)
        assert_rel_close(out, _reference(a, weight, False, None, None, None, 0.0, None), torch.float32)
    (buffer,) = nf4_module.dequant_buffers(DEVICE).values()
    assert buffer.numel() == large.shape.numel()  # grown once to the largest layer, never a second one
    assert sum(1 for shape in allocations if shape and shape[0] in (16 * 64, 24 * 128)) == 2
