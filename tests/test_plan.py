"""The launch plans (``fastpeft.kernels.plan``): pure, frozen, and what the launchers really launch."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from fastpeft.kernels import ia3, multi_lora, nf4, nf4_matmul
from fastpeft.kernels.plan import LaunchPlan, config_for, observing, recording
from fastpeft.nf4 import NF4Weight, weight_from_op_args, weight_op_args

ARCHES = (None, (8, 0), (8, 9), (9, 0))


def test_plan_is_frozen_and_validated():
    plan = nf4.plan_nf4_dequantize(4096, 4096, 64, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.num_warps = 8
    with pytest.raises(TypeError):
        plan.constexprs["BLOCK"] = 1
    with pytest.raises(ValueError, match="path"):
        LaunchPlan(op="x", variant="y", path="cuda-graph")
    with pytest.raises(ValueError, match="kernel and a grid"):
        LaunchPlan(op="x", variant="y")
    assert "nf4_dequantize/tiles: _nf4_dequant_kernel grid=(256, 2)" in plan.describe()
    assert plan.options["enable_fp_fusion"] is False


def test_config_for_falls_back_to_default():
    table = {"default": {"BLOCK": 1}, (9, 0): {"BLOCK": 2}}
    assert config_for(table, None)["BLOCK"] == 1
    assert config_for(table, (8, 0))["BLOCK"] == 1
    assert config_for(table, (9, 0))["BLOCK"] == 2


@pytest.mark.parametrize("arch", ARCHES)
def test_nf4_matmul_plan_picks_gemv_for_decode_and_splits_k(arch):
    gemv = nf4_matmul.plan_nf4_lora_matmul(1, 4096, 4096, 16, arch=arch)
    assert gemv.variant == "gemv" and not gemv.constexprs["USE_DOT"]
    # K = 4096 in GEMV slices of 4 steps of 256 (2 groups of 2): 4 splits; rows of 4096 hold whole groups
    assert gemv.constexprs["SPLIT_K"] == 4 and gemv.runtime["k_per_split"] == 1024
    assert gemv.constexprs["GROUP"] == 2 and gemv.constexprs["GROUPED"] and gemv.constexprs["ROW_NESTED"]
    assert nf4_matmul.plan_nf4_lora_matmul(1, 5, 300, 0, arch=arch).constexprs["HAS_LORA"] is False
    # dx: 8 steps of 32 W rows x 256 in-features
    dx = nf4_matmul.plan_nf4_lora_matmul(1, 4096, 4096, 16, transpose_weight=True, arch=arch)
    assert dx.variant == "gemv" and dx.constexprs["BLOCK_K"] == 32 and dx.constexprs["BLOCK_N"] == 256
    assert dx.runtime["k_per_split"] == 256 and dx.constexprs["BLOCK_R"] == 16
    # rows of 11008 in-features (172 blocks) hold no whole group of 8 blocks: one nested absmax per block
    assert not nf4_matmul.plan_nf4_lora_matmul(1, 4096, 11008, 16, arch=arch).constexprs["ROW_NESTED"]
    # a row of 4096 (64 blocks) lies in one nested block of 256: its nested absmax loads once per program; a
    # row of 14336 (224 blocks) and one of 11008 do not
    assert gemv.constexprs["ROW_IN_NESTED"]
    for k in (14336, 11008):
        assert not nf4_matmul.plan_nf4_lora_matmul(1, 4096, k, 16, arch=arch).constexprs["ROW_IN_NESTED"]


@pytest.mark.parametrize("m", [16, 64, 512, 4096])
def test_ia3_plans_swap_to_weight_rows_on_sm90_only(m):
    # sm_90's wgmma needs 64-row warpgroup tiles: the 64 weight columns of a tile are the MMA's rows
    # there (check-kernels: HGMMA), on sm_80 / sm_89 the token rows stay (mma.sync)
    for is_nf4 in (False, True):
        hopper = ia3.plan_ia3_matmul(m, 4096, is_nf4=is_nf4, in_features=4096, arch=(9, 0))
        assert hopper.path == "torch" or (hopper.constexprs["SWAP_AB"] and hopper.num_warps == 4
                                          and hopper.constexprs["BLOCK_N"] == (128 if is_nf4 else 64))
        ampere = ia3.plan_ia3_matmul(m, 4096, is_nf4=is_nf4, in_features=4096, arch=(8, 0))
        assert ampere.path == "torch" or not ampere.constexprs["SWAP_AB"]


def test_multi_lora_plan_follows_fused_table(monkeypatch):
    shrink, expand = multi_lora.plan_multi_lora(64, 64, 4096, 1)
    assert (shrink.variant, expand.variant) == ("shrink-decode", "expand-decode")
    assert shrink.grid == (64, 4) and expand.grid == (64, 128) and not shrink.constexprs["USE_DOT"]
    monkeypatch.setattr(multi_lora, "FUSED", {"decode": False, "prefill": True})
    (fused,) = multi_lora.plan_multi_lora(8, 64, 4096, 16)
    assert fused.variant == "fused-prefill" and fused.constexprs["USE_DOT"]


def _recorded(fn, *args, **kwargs):
    with recording() as launches:
        fn(*args, **kwargs)
    return launches


def test_launchers_launch_their_plan():
    # on meta tensors: the launchers validate, plan and build their arguments, and nothing runs
    meta = torch.device("meta")
    weight = NF4Weight.quantize(torch.randn(40, 128), 64, double_quant=True)
    weight = weight_from_op_args(*[t.to(meta) if isinstance(t, torch.Tensor) else t for t in weight_op_args(weight)])
    a = torch.empty(3, 128, device=meta, dtype=torch.float16)
    ((plan, args),) = _recorded(nf4_matmul.nf4_lora_matmul, a, weight)
    assert plan == nf4_matmul.plan_nf4_lora_matmul(3, 40, 128, 0, blocksize=64, nested=True)
    ((plan, _),) = _recorded(nf4_matmul.nf4_lora_matmul, torch.empty(3, 40, device=meta, dtype=torch.float16), weight,
                             transpose_weight=True)
    assert plan == nf4_matmul.plan_nf4_lora_matmul(3, 128, 40, 0, blocksize=64, nested=True, transpose_weight=True)
    assert args[0] is a
    ((plan, _),) = _recorded(nf4.nf4_dequantize, weight, torch.float16)
    assert plan == nf4.plan_nf4_dequantize(40, 128, 64, True)
    lora_a, lora_b = torch.empty(16, 128, device=meta), torch.empty(40, 16, device=meta)
    # the DoRA norm's A Wᵀ (fastpeft.ops.dora) is fused_linear's NF4 launcher with M = r = 16 rows and an fp32 output
    # (fp32: cuBLAS after dequantising); its CUDA kernel picks that launcher for these arguments
    fused = importlib.import_module("fastpeft.ops.fused_linear")  # the module (fastpeft.ops.fused_linear: the function)
    plans = [plan for plan, _ in _recorded(fused._launch, lora_a, weight, False, None, None, False, None, None, 1.0,
                                           None, None, True, torch.float32)]
    assert plans == [nf4.plan_nf4_dequantize(40, 128, 64, True)]
    assert lora_b.shape == (40, 16)
    ((plan, _),) = _recorded(ia3.ia3_matmul, a, weight, in_scale=torch.empty(128, device=meta, dtype=torch.float16))
    assert plan == ia3.plan_ia3_matmul(3, 40, is_nf4=True, nested=True, has_in_scale=True, in_features=128)


def test_observing_lists_each_launched_plan_and_still_launches():
    # in Triton's interpreter on CPU: the kernels really run, and every open observer sees each launch
    weight = NF4Weight.quantize(torch.randn(40, 128), 64, double_quant=True)
    a = torch.randn(3, 128)
    with observing() as outer:
        out = nf4.nf4_dequantize(weight, torch.float32)
        with observing() as inner:
            y = nf4_matmul.nf4_lora_matmul(a, weight)
    dequantize = nf4.plan_nf4_dequantize(40, 128, 64, True)
    matmul = nf4_matmul.plan_nf4_lora_matmul(3, 40, 128, 0, blocksize=64, nested=True, fp32=True)
    assert outer == [dequantize, matmul] and inner == [matmul]
    assert torch.equal(out, weight.dequantize(torch.float32))
    assert torch.allclose(y, a @ weight.dequantize(torch.float32).t(), rtol=1e-5, atol=1e-5)
    nf4.nf4_dequantize(weight, torch.float32)  # after the blocks: listed nowhere
    assert len(outer) == 2 and len(inner) == 1
    with recording() as recorded, observing() as observed:  # recording launches nothing: nothing observed
        nf4.nf4_dequantize(weight, torch.float32)
    assert len(recorded) == 1 and observed == []
