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
from fastpeft.ops import MultiLoraMeta, nf4_dequantize, dora_linear, ia3_linear, lora_linear, multi_lora_add_

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
INF = float("inf")


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
    # M = prod(lead) stays under size // 2 tokens: the interpreter runs a program per token tile
    lead = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3).filter(lambda d: math.prod(d) <= size // 2))
    lead = tuple(lead)
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


def _with_nf4(case: Case, nf4: bool) -> Case:
    """``case`` with an NF4 base (blocksize 64) or a dense one, as the test's ``nf4`` parameter asks: the shared
    ``@example`` cases are written once for both."""
    if nf4 == bool(case.nf4_blocksize):
        return case
    return Case(**{**case.__dict__, "nf4_blocksize": 64 if nf4 else 0})


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
        if 0 in x.stride():
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


def _finite_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double(), ref.detach().double()
    finite = torch.isfinite(ref64) & torch.isfinite(out64)
    diff = torch.linalg.vector_norm(out64[finite] - ref64[finite])
    denom = torch.linalg.vector_norm(ref64[finite])
    return float(diff / denom) if denom > 0 else float(diff)


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output",
                             plain: Optional[torch.Tensor] = None, inf_kinds: bool = True,
                             magnitude: Optional[torch.Tensor] = None):
    """Same shape; non-finite exactly where the float64 reference is (never turned into finite values, never
    invented), and with ``inf_kinds`` also the same kind there (NaN, +inf, -inf); the finite rest within the
    dtype's relative bound, or within twice the error of ``plain`` (the reference computed in ``dtype``,
    what PEFT's plain PyTorch gets) where that is larger. With ``magnitude`` (the reference's sum over the
    terms' absolute values, elementwise >= |ref|) the error is measured relative to its norm instead."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out64, ref64 = out.detach().double(), ref.detach().double()
    kinds = (("NaN", torch.isnan), ("+inf", lambda t: t == math.inf), ("-inf", lambda t: t == -math.inf))
    for kind, mask in kinds if inf_kinds else (("non-finite", lambda t: ~torch.isfinite(t)),):
        wrong = int((mask(out64) != mask(ref64)).sum())
        assert not wrong, f"{what}: {wrong} of {out.numel()} elements differ from the reference in being {kind}"
    bound = BOUND[dtype] if plain is None else max(BOUND[dtype], 2 * _finite_rel_error(plain, ref))
    err = _finite_rel_error(out, ref)
    if magnitude is not None:
        finite = torch.isfinite(ref64) & torch.isfinite(out64)
        err = float(torch.linalg.vector_norm(out64[finite] - ref64[finite])
                    / torch.linalg.vector_norm(magnitude.double()[finite]).clamp(min=1e-300))
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.1e} ({dtype})"


def check_op_and_grads(op, ref_op, tensors: dict, dy: torch.Tensor, dtype: torch.dtype, inf_kinds: bool = True):
    """``op(**leaves)`` against ``ref_op(**float64 leaves)``: output dtype, values, and the gradient of every
    tensor argument for the upstream gradient ``dy``; bounds from ``ref_op`` run in ``dtype`` too."""
    def run(fn, cast):
        leaves = {k: cast(t).detach().requires_grad_() for k, t in tensors.items() if t is not None}
        y = fn(**{**dict.fromkeys(tensors), **leaves})
        grads = torch.autograd.grad(y, list(leaves.values()), cast(dy)) if y.numel() else ()
        return y, dict(zip(leaves, grads))

    y, grads = run(op, lambda t: t)
    ref, grads64 = run(ref_op, torch.Tensor.double)
    plain, plain_grads = run(ref_op, lambda t: t) if dtype in (torch.float16, torch.bfloat16) else (None, {})
    assert y.dtype == dtype, f"output dtype {y.dtype} != {dtype}"
    assert_matches_reference(y, ref, dtype, plain=plain, inf_kinds=inf_kinds)
    for name, grad in grads.items():
        assert_matches_reference(grad, grads64[name], dtype, what=f"d{name}", plain=plain_grads.get(name),
                                 inf_kinds=inf_kinds)


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
        case = _with_nf4(case, nf4)
        t = build(case)
        check_op_and_grads(
            lambda x, lora_a, lora_b, bias: lora_linear(x, t["weight"], bias, lora_a, lora_b, case.scaling),
            lambda x, lora_a, lora_b, bias: reference.lora_linear(x, t["weight64"], bias, lora_a, lora_b,
                                                                  case.scaling),
            {k: t[k] for k in ("x", "lora_a", "lora_b", "bias")}, _dy(t, case), case.dtype)

    check()


# ------------------------------------------------------------------------------------------------- DoRA
# An inf in x makes DoRA's terms inf; whether they sum to ±inf or NaN depends on how the terms are grouped
# (PEFT's x Wᵀ + (c − 1) ⊙ x Wᵀ + c ⊙ s·h Bᵀ, the op's c ⊙ (x Wᵀ + s·h Bᵀ), equal for finite x), so here only
# "non-finite exactly where PEFT's is" is checked, not which kind.


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_linear_fuzz(backend, nf4, request):
    request.getfixturevalue(backend)

    @fuzz(backend)
    @given(case=cases(backend, nf4))
    @example(case=ZERO_SCALING_INF)
    def check(case: Case):
        case = _with_nf4(case, nf4)
        t = build(case)
        magnitude = (1.0 + 0.2 * torch.randn(case.out_features, generator=t["generator"])).to(case.dtype)
        check_op_and_grads(
            lambda x, lora_a, lora_b, bias, magnitude: dora_linear(x, t["weight"], bias, lora_a, lora_b, case.scaling,
                                                                   magnitude),
            lambda x, lora_a, lora_b, bias, magnitude: reference.dora_linear(x, t["weight64"], bias, lora_a, lora_b,
                                                                             case.scaling, magnitude),
            {**{k: t[k] for k in ("x", "lora_a", "lora_b", "bias")}, "magnitude": magnitude}, _dy(t, case),
            case.dtype, inf_kinds=False)

    check()


# -------------------------------------------------------------------------------------------------- IA3


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ia3_linear_fuzz(backend, nf4, request):
    request.getfixturevalue(backend)

    @fuzz(backend)
    @given(case=cases(backend, nf4), is_feedforward=st.booleans())
    # float64 x: dl was summed in fp32 (relative error 6e-8 where float64 promises 1e-16)
    @example(case=Case(torch.float64, 1, 1, (1,), bias=False), is_feedforward=False)
    def check(case: Case, is_feedforward: bool):
        if case.dtype not in BACKENDS[backend][3]:
            return  # an explicit example for another backend's dtypes (float64: reference only)
        case = _with_nf4(case, nf4)
        t = build(case)
        size = case.in_features if is_feedforward else case.out_features
        ia3_scale = (1.0 + 0.3 * torch.randn(size, generator=t["generator"])).to(case.dtype)
        check_op_and_grads(
            lambda x, bias, ia3_scale: ia3_linear(x, t["weight"], bias, ia3_scale, is_feedforward),
            lambda x, bias, ia3_scale: reference.ia3_linear(x, t["weight64"], bias, ia3_scale, is_feedforward),
            {"x": t["x"], "bias": t["bias"], "ia3_scale": ia3_scale}, _dy(t, case), case.dtype)

    check()


# ------------------------------------------------------------------------------------------- multi-LoRA


@dataclass(frozen=True)
class MultiCase:
    """A multi-LoRA example: the layer (``case``), the bank's adapters (rank 0: leaves the layer alone),
    slots per token and prefill / decode tiles; ids and weights are drawn from ``case.seed``."""

    case: Case
    ranks: tuple = (4,)
    scalings: tuple = (1.0,)
    slots: int = 1
    decode: bool = False


@st.composite
def multi_cases(draw, backend: str) -> MultiCase:
    ranks = draw(st.lists(st.integers(0, BACKENDS[backend][2]), min_size=1, max_size=4))
    return MultiCase(draw(cases(backend, nf4=False)), tuple(ranks),
                     tuple(draw(SCALINGS) for _ in ranks), draw(st.integers(1, 3)), draw(st.booleans()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_lora_add_fuzz(backend, request):
    """``multi_lora_add_`` over a packed bank (ranks 0..max, mixed), 1..3 weighted slots per token, prefill
    or decode tiles, against ``reference.multi_lora_delta`` in float64."""
    request.getfixturevalue(backend)

    @fuzz(backend)
    @given(multi=multi_cases(backend))
    @example(multi=MultiCase(Case(torch.float32, 3, 5, (0,))))  # M = 0: the reference reshaped to (0, -1)
    @example(multi=MultiCase(ZERO_SCALING_INF, scalings=(0.0,)))
    def check(multi: MultiCase):
        case = multi.case
        t = build(case)
        g = t["generator"]
        x = t["x"].reshape(-1, case.in_features)  # a view (keeping the layout) where one exists
        m = x.shape[0]
        adapters = [None if r == 0 else ModuleAdapter(lora_a=torch.randn(r, case.in_features, generator=g),
                                                      lora_b=0.3 * torch.randn(case.out_features, r, generator=g),
                                                      scaling=s)
                    for r, s in zip(multi.ranks, multi.scalings)]
        bank = LoraBank.pack(adapters, case.in_features, case.out_features, case.dtype, x.device)
        slot_ids = torch.randint(-1, len(adapters), (m, multi.slots), generator=g)
        slot_weights = torch.randn(m, multi.slots, generator=g)
        meta = MultiLoraMeta.build(slot_ids, slot_weights, decode=multi.decode)
        y = torch.randn(m, case.out_features, generator=g).to(case.dtype)

        def delta(cast):  # the float64 reference on the same tensors, cast
            return reference.multi_lora_delta(
                cast(x.double()),
                [cast(bank.lora_a[k, :r].double()) for k, r in enumerate(multi.ranks)],
                [cast(bank.lora_b[k, :, :r].double()) for k, r in enumerate(multi.ranks)],
                [abs(s) if cast is torch.abs else s for s in bank.scalings.tolist()], slot_ids,
                cast(slot_weights.double()))

        expected = y.double() + delta(lambda t: t)
        # rounding errors scale with the terms' magnitudes, not with a sum that cancels (rank up to 256 into
        # one output element): the bound is relative to the same sum over absolute values
        magnitude = y.double().abs() + delta(torch.abs)
        assert multi_lora_add_(y, x, bank, meta) is y
        # slot weights are fp32 by MultiLoraMeta's contract (two slots naming one adapter add in fp32): a
        # float64 batch is held to fp32's bound
        bound_dtype = torch.float32 if case.dtype == torch.float64 else case.dtype
        assert_matches_reference(y, expected, bound_dtype, magnitude=magnitude)

    check()


# -------------------------------------------------------------------------------------------------- NF4


def _nf4_oracle(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' dequantisation, rebuilt independently in float64 with its fp32 rounding after each
    step: nested absmax ``code2[q] * absmax2`` then ``+ offset``, then ``code[idx] * absmax``, one cast."""
    from fastpeft.nf4 import NF4_CODE

    absmax = weight.absmax.double()
    if weight.is_nested:
        scale = weight.nested_absmax.double().repeat_interleave(256)[: absmax.numel()]
        absmax = (weight.nested_code.double()[weight.absmax.long()] * scale).float().double()
        absmax = (absmax + weight.nested_offset.double()).float().double()
    codes = torch.stack([weight.packed >> 4, weight.packed & 0xF], 1).reshape(-1)[: weight.shape.numel()].long()
    values = NF4_CODE.double()[codes] * absmax.repeat_interleave(weight.blocksize)[: codes.numel()]
    return values.float().to(dtype).view(weight.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nf4_quantize_and_dequantize_fuzz(backend, request):
    """Quantisation is bit-exact with bitsandbytes' (packed codes, absmax, nested statistics) on any shape
    and blocksize; dequantisation (the backend's op) bit-exact with the float64-rebuilt oracle."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    request.getfixturevalue(backend)
    _, size, _, dtypes = BACKENDS[backend]
    float_dtypes = [d for d in dtypes if d != torch.float64]

    @fuzz(backend)
    @given(out_features=st.integers(1, size), in_features=st.integers(1, size),
           blocksize=st.sampled_from([32, 64, 128, 256, 4096]), double_quant=st.booleans(),
           dtype=st.sampled_from(float_dtypes), out_dtype=st.sampled_from(float_dtypes),
           layout=st.sampled_from(LAYOUTS[:3]), seed=st.integers(0, 2**31 - 1))
    def check(out_features, in_features, blocksize, double_quant, dtype, out_dtype, layout, seed):
        dense = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)
        dense = _with_layout(dense, layout)
        weight = NF4Weight.quantize(dense, blocksize, double_quant)
        if backend == "reference_backend":  # bitsandbytes' CPU quantiser is the format's definition here
            packed, state = bnb_functional.quantize_4bit(dense.contiguous(), blocksize=blocksize,
                                                         compress_statistics=double_quant, quant_type="nf4")
            assert torch.equal(weight.packed, packed.view(torch.uint8).reshape(-1))
            assert torch.equal(weight.absmax, state.absmax)
            if double_quant:
                assert torch.equal(weight.nested_absmax, state.state2.absmax)
                assert torch.equal(weight.nested_offset, state.offset.reshape(()))
        out = nf4_dequantize(weight, out_dtype)
        assert out.dtype == out_dtype and torch.equal(out, _nf4_oracle(weight, out_dtype))

    check()
