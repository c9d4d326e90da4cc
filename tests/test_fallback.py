"""Safe fallback: a Triton kernel that fails to compile or launch warns once and the op runs its PyTorch
path (``fastpeft.ops.dispatch.run_kernel``); ``FASTPEFT_STRICT=1`` raises instead. The failure is injected
on CPU where fastpeft hands a launch to Triton (``fastpeft.kernels.plan._start``), as a compile error on an
unknown GPU would raise there, on every Triton version."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastpeft import ops, reference
from fastpeft.adapters import ModuleAdapter
from fastpeft.bank import LoraBank
from fastpeft.kernels import ia3, multi_lora, nf4, nf4_matmul, plan
from fastpeft.kernels.plan import KernelLaunchError
from fastpeft.nf4 import NF4Weight
from fastpeft.ops import dispatch

from conftest import assert_rel_close

ERROR = "ptxas fatal: Value 'sm_200' is not defined for option 'gpu-name'"


def _fail_launches(monkeypatch, *kernels, fails=lambda launches: True):
    """Launches of ``kernels`` raise ``ERROR`` when ``fails(number of launches of them so far)``; every other
    launch runs."""
    start, launches = plan._start, []

    def failing_start(launch_plan, args):
        if launch_plan.kernel in kernels:
            launches.append(launch_plan)
            if fails(len(launches)):
                raise RuntimeError(ERROR)
        return start(launch_plan, args)

    monkeypatch.setattr(plan, "_start", failing_start)
    return launches


@pytest.fixture
def fallback(triton_backend, monkeypatch):
    """Triton backend, not strict, no op warned yet."""
    monkeypatch.delenv("FASTPEFT_STRICT", raising=False)
    monkeypatch.setattr(dispatch, "_warned_ops", set())


def _nf4(out_features=19, in_features=70):
    return NF4Weight.quantize(torch.randn(out_features, in_features), 64, double_quant=True)


def test_failing_kernel_warns_once_and_runs_the_torch_path(fallback, monkeypatch):
    launches = _fail_launches(monkeypatch, nf4_matmul._nf4_lora_matmul_kernel)
    weight, a = _nf4(), torch.randn(5, 70, dtype=torch.float64).float()
    lora_h, lora_expand = torch.randn(5, 3), torch.randn(3, 19)
    expected = a.double() @ weight.dequantize(torch.float64).t() + 0.5 * lora_h.double() @ lora_expand.double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = ops.fused_linear(a, weight, lora_h=lora_h, lora_expand=lora_expand, scaling=0.5)[0]
            assert_rel_close(out, expected, torch.float32)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "fused_linear" in messages[0] and "nf4_lora_matmul" in messages[0] and ERROR in messages[0] and "FASTPEFT_STRICT=1" in messages[0]
    assert len(launches) == 3  # every call tried the kernel first


def test_strict_raises_the_kernel_error(fallback, monkeypatch):
    monkeypatch.setenv("FASTPEFT_STRICT", "1")
    _fail_launches(monkeypatch, nf4._nf4_dequant_kernel)
    with pytest.raises(KernelLaunchError, match="nf4_dequantize.*sm_200") as info:
        ops.nf4_dequantize(_nf4(), torch.float32)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_validation_errors_are_not_swallowed(fallback, monkeypatch):
    launches = _fail_launches(monkeypatch, nf4_matmul._nf4_lora_matmul_kernel)
    with pytest.raises(TypeError, match="bias dtype"):
        nf4_matmul.nf4_lora_matmul(torch.randn(2, 70), _nf4(), bias=torch.randn(19).half())
    assert not launches


def test_every_op_falls_back(fallback, monkeypatch):
    _fail_launches(monkeypatch, nf4._nf4_dequant_kernel, nf4_matmul._nf4_lora_matmul_kernel, ia3._ia3_matmul_kernel,
                   multi_lora._multi_lora_shrink_kernel, multi_lora._multi_lora_fused_kernel)
    weight = _nf4()
    dense = weight.dequantize(torch.float32)
    lora_a, lora_b = torch.randn(4, 70), torch.randn(19, 4)
    with pytest.warns(RuntimeWarning) as caught:
        assert torch.equal(ops.nf4_dequantize(weight, torch.float32), dense)
        assert_rel_close(ops.dora_weight_norm(weight, lora_a, lora_b, 2.0),
                         reference.dora_weight_norm(dense.double(), lora_a.double(), lora_b.double(), 2.0))
        x, scale = torch.randn(6, 70), torch.rand(70) + 0.5
        out, _ = ops.fused_linear(x, weight, in_scale=scale, scale_bias=True)
        assert_rel_close(out, ((x * scale).double() @ dense.double().t()))
        bank = LoraBank.pack([ModuleAdapter(lora_a=lora_a, lora_b=lora_b, scaling=1.5)], 70, 19, torch.float32, "cpu")
        meta = ops.MultiLoraMeta.build(torch.tensor([0, -1, 0, 0]))
        x4, y = torch.randn(4, 70), torch.zeros(4, 19)
        ops.multi_lora_add_(y, x4, bank, meta)
        expected = 1.5 * (x4.double() @ lora_a.double().t()) @ lora_b.double().t()
        expected[1] = 0
        assert_rel_close(y, expected)
    ops_warned = {str(w.message).split("PyTorch path of ")[1].split(" instead")[0] for w in caught}
    # the DoRA norm is a composition: its launches are the primitives' (warned once each)
    assert ops_warned == {"nf4_dequantize", "fused_linear", "multi_lora_add_"}


def test_in_place_update_already_applied_is_not_redone(fallback, monkeypatch):
    # two slots: the expand of the second slot fails after the first slot already added into y
    launches = _fail_launches(monkeypatch, multi_lora._multi_lora_expand_kernel, fails=lambda launches: launches == 2)
    monkeypatch.setattr(multi_lora, "FUSED", {"decode": False, "prefill": False})
    bank = LoraBank.pack([ModuleAdapter(lora_a=torch.randn(2, 9), lora_b=torch.randn(5, 2), scaling=1.0)], 9, 5,
                         torch.float32, "cpu")
    meta = ops.MultiLoraMeta.build(torch.tensor([[0, 0], [0, -1]]), torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    with pytest.raises(KernelLaunchError) as info:
        ops.multi_lora_add_(torch.zeros(2, 5), torch.randn(2, 9), bank, meta)
    assert info.value.output_touched and len(launches) == 2
