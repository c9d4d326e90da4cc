"""Hypothesis fuzzing of every public op against ``fastpeft.reference`` in float64.

Random shapes (1 and odd sizes, ``M = 0``), ranks 1..256 (also above ``in_features``), layouts of the input
(contiguous, transposed, sliced, expanded), dtypes, scalings 0 and negative, and NaN / inf planted in the
input: wherever the float64 reference is NaN or ±inf the op must be too (the same kind, the same sign:
what PEFT's plain PyTorch gives), and the finite rest within the dtype's bound. Forward and gradients. The
reference backend gets the larger budget; Triton's interpreter (``FASTPEFT_BACKEND=triton``) a smaller
one on smaller shapes. Hypothesis runs derandomised (profile in conftest.py), so CI sees the same
examples every run; each bug found is pinned by an ``@example``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastpeft import reference
from fastpeft.adapters import ModuleAdapter
from fastpeft.bank import LoraBank
from fastpeft.nf4 import NF4Weight
from fastpeft.ops import MultiLoraMeta, dequantize_nf4, dora_linear, ia3_linear, lora_linear, multi_lora_add_

from conftest import REL_TOL, kernel_dtypes, non_contiguous

BACKENDS = {
    # backend fixture: (examples per test, largest feature size, largest rank, dtypes)
    "reference_backend": (40, 70, 256, (torch.float32, torch.float16, torch.bfloat16, torch.float64)),
    "triton_backend": (4, 40, 40, tuple(kernel_dtypes())),
}
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
SPECIALS = (None, float("nan"), float("inf"), float("-inf"))
SCALINGS = st.one_of(st.sampled_from([0.0, -1.0, 2.0]), st.floats(-4.0, 4.0, allow_nan=False, width=32))
# the op's own float64 results: long sums in another order than the reference's
BOUND = {**REL_TOL, torch.float64: 1e-10}
NAN, INF = float("nan"), float("inf")


def fuzz(backend: str):
    """A fuzz test's settings on ``backend`` (its example budget); the rest is conftest.py's profile."""
    return settings(max_examples=BACKENDS[backend][0], suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Case:
    """One linear-layer example: every tensor is built from these fields by :func:`build`."""

    dtype: torch.dtype
    in_features: int
    out_features: int
    lead: tuple  # x is (*lead, in_features)
    rank: int = 4
    scaling: float = 1.0
    layout: str = "contiguous"  # x's memory layout
    special: Optional[float] = None  # planted in x at special_at (flat index modulo x.numel())
    special_at: int = 0
    bias: bool = True
    nf4_blocksize: int = 0  # 0: dense base
    double_quant: bool = False
    seed: int = 0


@st.composite
def cases(draw, backend: str, nf4: bool) -> Case:
    _, size, max_rank, dtypes = BACKENDS[backend]
    tokens = st.integers(0, max(size // 4, 1))
    lead = draw(st.one_of(st.tuples(tokens), st.tuples(tokens, tokens), st.tuples(tokens, tokens, tokens)))
    return Case(
        dtype=draw(st.sampled_from(dtypes)),
        in_features=draw(st.integers(1, size)),
        out_features=draw(st.integers(1, size)),
        lead=lead,
        rank=draw(st.integers(1, max_rank)),
        scaling=draw(SCALINGS),
        layout=draw(st.sampled_from(LAYOUTS)),
        special=draw(st.sampled_from(SPECIALS)),
        special_at=draw(st.integers(0, 10**6)),
        bias=draw(st.booleans()),
        nf4_blocksize=draw(st.sampled_from([32, 64, 128])) if nf4 else 0,
        double_quant=nf4 and draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` in the given memory layout; "expanded" repeats its first row (stride 0 over the rows)."""
    if layout == "transposed":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "sliced":
        return non_contiguous(t) if t.numel() else t
    if layout == "expanded":
        flat = t.reshape(-1, t.shape[-1])
        return flat[:1].expand(flat.shape).view(t.shape) if flat.shape[0] else t
    return t.contiguous()


def build(case: Case) -> dict:
    """The tensors of ``case``: ``x`` (its layout, the special value planted), the base ``weight`` (dense in
    ``case.dtype`` or NF4) and ``weight64`` (what the float64 reference reads), ``bias``, LoRA factors
    ``lora_a`` (a transposed layout) / ``lora_b``, and a ``generator`` for anything else."""
    g = torch.Generator().manual_seed(case.seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(case.dtype)

    x = _with_layout(randn(*case.lead, case.in_features), case.layout)
    if case.special is not None and x.numel():
        if x.stride()[0] == 0:
            x = x.clone()  # written into an expanded x, the value would land in every row
        index = torch.unravel_index(torch.tensor(case.special_at % x.numel()), x.shape)
        x[tuple(int(i) for i in index)] = case.special
    dense = torch.randn(case.out_features, case.in_features, generator=g) * case.in_features ** -0.5
    if case.nf4_blocksize:
        weight_dtype = torch.float32 if case.dtype == torch.float64 else case.dtype
        weight = weight64 = NF4Weight.quantize(dense.to(weight_dtype), case.nf4_blocksize, case.double_quant)
    else:
        weight = dense.to(case.dtype)
        weight64 = weight.double()
    return dict(
        x=x, weight=weight, weight64=weight64,
        bias=randn(case.out_features) if case.bias else None,
        lora_a=randn(case.in_features, case.rank).t(),
        lora_b=randn(case.out_features, case.rank, scale=0.3),
        generator=g,
    )


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output"):
    """Same shape; NaN, +inf and -inf exactly where the float64 reference has them (never turned into finite
    values, never invented); the finite rest within the dtype's relative bound."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out64, ref64 = out.detach().double(), ref.detach().double()
    for kind, mask in (("NaN", torch.isnan), ("+inf", lambda t: t == math.inf), ("-inf", lambda t: t == -math.inf)):
        wrong = int((mask(out64) != mask(ref64)).sum())
        assert not wrong, f"{what}: {wrong} of {out.numel()} elements differ from the reference in being {kind}"
    finite = torch.isfinite(ref64)
    diff = torch.linalg.vector_norm(out64[finite] - ref64[finite])
    denom = torch.linalg.vector_norm(ref64[finite])
    err = float(diff / denom) if denom > 0 else float(diff)
    assert err <= BOUND[dtype], f"{what}: relative error {err:.3e} > {BOUND[dtype]:.1e} ({dtype})"


def check_op_and_grads(op, ref_op, tensors: dict, dy: torch.Tensor, dtype: torch.dtype):
    """``op(**leaves)`` against ``ref_op(**float64 leaves)``: output dtype, values, and the gradient of every
    tensor argument for the upstream gradient ``dy``."""
    leaves = {k: t.detach().requires_grad_() for k, t in tensors.items() if t is not None}
    leaves64 = {k: t.detach().double().requires_grad_() for k, t in tensors.items() if t is not None}
    y = op(**{**dict.fromkeys(tensors), **leaves})
    ref = ref_op(**{**dict.fromkeys(tensors), **leaves64})
    assert y.dtype == dtype, f"output dtype {y.dtype} != {dtype}"
    assert_matches_reference(y, ref, dtype)
    if y.numel() == 0:
        return
    names = list(leaves)
    grads = torch.autograd.grad(y, [leaves[k] for k in names], dy)
    grads64 = torch.autograd.grad(ref, [leaves64[k] for k in names], dy.double())
    for name, grad, grad64 in zip(names, grads, grads64):
        assert_matches_reference(grad, grad64, dtype, what=f"d{name}")


def _dy(built: dict, case: Case) -> torch.Tensor:
    return torch.randn(*case.lead, case.out_features, generator=built["generator"]).to(case.dtype)


# ------------------------------------------------------------------------------------------------- LoRA

# scaling 0 with an inf in x: PEFT's lora_B(lora_A(x)) * 0 is NaN; BLAS's addmm with alpha = 0 skips the
# product and left the base's inf
ZERO_SCALING_INF = Case(torch.float32, 5, 3, (2,), rank=2, scaling=0.0, special=INF, special_at=3)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear_fuzz(backend, nf4, request):
    request.getfixturevalue(backend)

    @fuzz(backend)
    @given(case=cases(backend, nf4))
    @example(case=ZERO_SCALING_INF)
    @example(case=Case(torch.float32, 7, 5, (0, 3), rank=9, nf4_blocksize=32 if nf4 else 0))  # M = 0
    def check(case: Case):
        if nf4 != bool(case.nf4_blocksize):
            case = Case(**{**case.__dict__, "nf4_blocksize": 64 if nf4 else 0})
        t = build(case)
        check_op_and_grads(
            lambda x, lora_a, lora_b, bias: lora_linear(x, t["weight"], bias, lora_a, lora_b, case.scaling),
            lambda x, lora_a, lora_b, bias: reference.lora_linear(x, t["weight64"], bias, lora_a, lora_b,
                                                                  case.scaling),
            {k: t[k] for k in ("x", "lora_a", "lora_b", "bias")}, _dy(t, case), case.dtype)

    check()
