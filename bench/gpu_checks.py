"""The correctness pass of the GPU acceptance run (``bench/gpu_accept.py``): every kernel family against the
float64 reference, through every plan the dispatch picks, and accelerated PEFT models against PEFT's.

Kernel families (each in bf16, fp16 and fp32, at odd shapes first, then production ones): NF4 dequantisation;
QLoRA (``fastpeft.ops.lora_linear`` over an NF4 base, forward and backward: the GEMV at ``M = 1``, the split-K
``tl.dot`` GEMM at small ``M``, dequantise + cuBLAS at large ``M``); DoRA and IA3 over dense and NF4 bases; the
multi-LoRA add in decode and prefill, two-launch and fused. NF4 weights come from ``NF4Weight.quantize`` (the
bits bitsandbytes would store), so no check needs bitsandbytes. An output and every gradient is compared with
``fastpeft.reference`` in float64; the bound scales itself with the shape: ``err <= 2 * err_torch + ATOL[dtype]``,
``err_torch`` being the error of the same reference computed by PyTorch in the working dtype (a bf16 product over
K = 14336 is allowed what PyTorch's own bf16 makes of it, and no more than twice that).

Which kernels ran is asserted, not assumed: ``fastpeft.kernels.plan.observing`` lists every plan launched, each
check requires the variants that ``fastpeft.kernels.nf4_dispatch`` / ``plan_multi_lora`` choose for its shapes on
this GPU, and the coverage checks (:func:`coverage`, which the driver runs over every shard's log) require that
the pass as a whole launched each variant of the NF4 product and of the multi-LoRA add in each dtype.

Model parity: a small random Llama with LoRA, DoRA and IA3 adapters (random, non-zero), dense and over a
bitsandbytes NF4 base (skipped without bitsandbytes), in fp32 and bf16: logits and every adapter gradient of
``fastpeft.accelerate``'d PEFT against PEFT itself, both measured from PEFT in float64 (dense) or fp32 (NF4, the
widest bitsandbytes computes in) with the same ``2 * err + ATOL`` rule. ``accelerate`` must replace every adapted
layer and leave none on PEFT's forward.

``FASTPEFT_STRICT=1`` is set: a kernel that fails raises instead of falling back to PyTorch. One JSON line per check
(``{"check", "family", "status": "pass" | "fail" | "error" | "skip", "detail", ...}``) is appended to the log as it
finishes.
``python3 -m bench.gpu_checks --log FILE --budget-s S [--shard I/N] [--dry-run]``: checks not started within the
budget are logged as ``not-run``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

from bench.gpu_accept import append_line, hide_bitsandbytes_if_asked

os.environ.setdefault("FASTPEFT_STRICT", "1")
hide_bitsandbytes_if_asked()

import torch  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The floor of the bound, beside twice PyTorch's own error: about one rounding of the working dtype's output
ATOL = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}
# fastpeft's fp32 NF4 GEMV / GEMM accumulate in another order than cuBLAS: the fp32 model parity allows this much
PARITY_ATOL = {torch.float32: 1e-4, torch.bfloat16: 4e-3}


@dataclass(frozen=True)
class Sizes:
    """Shapes of the pass: ``odd`` (out, in) with its token counts, then the ``production`` shapes with theirs."""

    odd: tuple
    odd_m: tuple
    production: tuple
    production_m: tuple
    rank: int
    adapters: int  # multi-LoRA bank size
    llama: dict  # LlamaConfig kwargs of the parity model
    tokens: tuple  # (batch, sequence) of the parity input


GPU_SIZES = Sizes(odd=(95, 129), odd_m=(1, 3, 19, 600), production=((4096, 4096), (14336, 4096)),
                  production_m=(1, 3, 16, 600), rank=16, adapters=8,
                  llama=dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=4),
                  tokens=(2, 33))
DRY_SIZES = Sizes(odd=(47, 65), odd_m=(1, 3, 9), production=(), production_m=(), rank=5, adapters=3,
                  llama=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2),
                  tokens=(1, 5))


class Skip(Exception):
    """The check cannot run here (a package is missing); the message says why."""


@dataclass
class Check:
    name: str
    family: str
    run: Callable[[], dict]  # raises AssertionError on a failure; returns what it measured
    unit: str = ""  # checks of one unit (a shape and dtype, or the models) share their kernels' compilations


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    triton: bool  # ops run on the Triton backend: their launches are asserted


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    denom = torch.linalg.vector_norm(ref64)
    return float(torch.linalg.vector_norm(out64 - ref64) / denom) if denom > 0 else float(
        torch.linalg.vector_norm(out64))


def compare(name: str, out, torch_out, ref, dtype, atol: Optional[dict] = None) -> dict:
    """``{name: {"err", "err_torch", "bound"}}``, asserting ``out`` finite, of ``ref``'s shape and within
    ``2 * err_torch + atol[dtype]`` of ``ref``."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: NaN or inf in the output"
    err, err_torch = rel_error(out, ref), rel_error(torch_out, ref)
    bound = 2 * err_torch + (atol or ATOL)[dtype]
    assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.3e} (PyTorch's own {err_torch:.3e})"
    return {name: {"err": err, "err_torch": err_torch, "bound": bound}}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@contextlib.contextmanager
def launched(ctx: Context, dtype: torch.dtype, require: set):
    """Collect the plans launched in the block; on the Triton backend assert each ``(op, variant)`` of ``require``
    is among them. Yields the check's detail dict, which gets the launches (for :func:`coverage`)."""
    from fastpeft.kernels.plan import observing

    detail: dict = {"dtype": _name(dtype)}
    with observing() as plans:
        yield detail
    ran = sorted({(p.op, p.variant) for p in plans})
    detail["launched"] = [f"{op}/{variant}" for op, variant in ran]
    if ctx.triton:
        missing = sorted(require - set(ran))
        assert not missing, f"planned {missing} but launched only {detail['launched']}"


def _grads(fn, inputs: list, dy=None) -> list:
    """``[fn(*inputs), d inputs...]`` for the upstream gradient ``dy`` (None: a seeded random one of the output's
    shape and dtype)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    if dy is None:
        dy = _random(y.device, *y.shape, seed=99).to(y.dtype)
    return [y, *torch.autograd.grad(y, leaves, dy)]


def _random(device, *shape, scale: float = 1.0, centre: float = 0.0, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return centre + scale * torch.randn(*shape, generator=g, device=device)


def _nf4_variant(m: int, n: int, dtype: torch.dtype, device: torch.device) -> str:
    from fastpeft.kernels.nf4_dispatch import nf4_path
    from fastpeft.kernels.plan import device_arch

    return nf4_path(m, n, dtype == torch.float32, device_arch(device))


def _nf4_requirements(m: int, n: int, dtype, device, op: str = "nf4_lora_matmul") -> set:
    """The launches an NF4 product of ``(m, ·) · (·, n)`` must show: its kernel's variant, or the dequantisation
    kernel where the plan is dequantise + cuBLAS."""
    variant = _nf4_variant(m, n, dtype, device)
    if variant == "cublas":
        return {("nf4_dequantize", "tiles")}
    return {(op, variant if op == "nf4_lora_matmul" else "nf4")}


def _compare_all(names: list, fast: list, torch_vals: list, ref: list, dtype) -> dict:
    detail = {}
    for name, a, b, c in zip(names, fast, torch_vals, ref):
        detail.update(compare(name, a, b, c, dtype))
    return detail


def _three_ways(op, reference_op, inputs: list) -> tuple:
    """``(fastpeft, PyTorch in the inputs' dtype, float64)`` values of ``[y, d inputs...]`` for ``op`` /
    ``reference_op`` (called with the inputs in that order; the weight and other fixed arguments bound in them),
    all for one upstream gradient."""
    fast = _grads(op, inputs)
    dy = _random(fast[0].device, *fast[0].shape, seed=99).to(fast[0].dtype)
    return fast, _grads(reference_op, inputs, dy), _grads(reference_op, [t.double() for t in inputs], dy.double())


# -------------------------------------------------------------------------------------------- kernel checks


def _nf4_dequant_check(ctx: Context, out_f: int, in_f: int, dtype, nested: bool) -> Check:
    def run():
        from fastpeft.nf4 import NF4Weight
        from fastpeft.ops import nf4_dequantize

        weight = NF4Weight.quantize(_random(ctx.device, out_f, in_f, seed=1), 64, double_quant=nested)
        with launched(ctx, dtype, {("nf4_dequantize", "tiles")}) as detail:
            out = nf4_dequantize(weight, dtype)
        # bit-exact: the fp32 code x absmax product, one rounding to dtype (bitsandbytes' order)
        assert torch.equal(out, weight.dequantize(torch.float64).float().to(dtype)), "not bit-exact"
        return detail
    return Check(f"nf4_dequantize {_name(dtype)} {out_f}x{in_f} nested={nested}", "nf4_dequantize", run)


def _qlora_check(ctx: Context, m: int, out_f: int, in_f: int, dtype) -> Check:
    def run():
        from fastpeft import ops, reference
        from fastpeft.nf4 import NF4Weight

        r, dev = ctx.sizes.rank, ctx.device
        weight = NF4Weight.quantize(_random(dev, out_f, in_f, seed=2) / in_f ** 0.5, 64, double_quant=True)
        x = _random(dev, m, in_f, seed=3).to(dtype)
        lora_a = (_random(dev, r, in_f, seed=4) / in_f ** 0.5).to(dtype)
        lora_b = (_random(dev, out_f, r, seed=5) * 0.1).to(dtype)
        bias = (_random(dev, out_f, seed=6) * 0.1).to(dtype)
        require = _nf4_requirements(m, out_f, dtype, dev) | _nf4_requirements(m, in_f, dtype, dev)
        with launched(ctx, dtype, require) as detail:
            fast, torch_vals, ref = _three_ways(
                lambda x, a, b: ops.lora_linear(x, weight, bias, a, b, 2.0),
                lambda x, a, b: reference.lora_linear(x, weight, bias.to(x.dtype), a, b, 2.0),
                [x, lora_a, lora_b])
        detail["variants"] = {"fwd": _nf4_variant(m, out_f, dtype, dev), "dx": _nf4_variant(m, in_f, dtype, dev)}
        detail.update(_compare_all(["y", "dx", "dA", "dB"], fast, torch_vals, ref, dtype))
        return detail
    return Check(f"qlora {_name(dtype)} M={m} {out_f}x{in_f}", "qlora", run)


def _dora_check(ctx: Context, m: int, out_f: int, in_f: int, dtype, nf4: bool) -> Check:
    def run():
        from fastpeft import ops, reference
        from fastpeft.nf4 import NF4Weight
        from fastpeft.ops.inputs import fusable_scaling

        r, dev = ctx.sizes.rank, ctx.device
        dense = _random(dev, out_f, in_f, seed=7) / in_f ** 0.5
        weight = NF4Weight.quantize(dense, 64, double_quant=True) if nf4 else dense.to(dtype)
        x = _random(dev, m, in_f, seed=8).to(dtype)
        lora_a = (_random(dev, r, in_f, seed=9) / in_f ** 0.5).to(dtype)
        lora_b = (_random(dev, out_f, r, seed=10) * 0.1).to(dtype)
        magnitude = (_random(dev, out_f, seed=11, scale=0.1, centre=1.0)).to(dtype)
        # factors whose product the fused op would not round as PEFT does (fp16) run PEFT's ops in PEFT's order
        fused = fusable_scaling(2.0, dtype)
        require = _nf4_requirements(m, out_f, dtype, dev) if nf4 and fused else set()

        def ref_op(x, a, b, mag):
            w = weight if nf4 else weight.to(x.dtype)
            return reference.dora_linear(x, w, None, a, b, 2.0, mag)
        with launched(ctx, dtype, require) as detail:
            fast, torch_vals, ref = _three_ways(
                lambda x, a, b, mag: ops.dora_linear(x, weight, None, a, b, 2.0, mag), ref_op,
                [x, lora_a, lora_b, magnitude])
        detail["path"] = "fused" if fused else "peft-order"
        detail.update(_compare_all(["y", "dx", "dA", "dB", "dm"], fast, torch_vals, ref, dtype))
        return detail
    base = "nf4" if nf4 else "dense"
    return Check(f"dora {base} {_name(dtype)} M={m} {out_f}x{in_f}", "dora", run)


def _ia3_check(ctx: Context, m: int, out_f: int, in_f: int, dtype, nf4: bool, feedforward: bool) -> Check:
    def run():
        from fastpeft import ops, reference
        from fastpeft.kernels.ia3 import plan_ia3_matmul
        from fastpeft.kernels.plan import device_arch
        from fastpeft.nf4 import NF4Weight

        dev = ctx.device
        dense = _random(dev, out_f, in_f, seed=12) / in_f ** 0.5
        weight = NF4Weight.quantize(dense, 64, double_quant=True) if nf4 else dense.to(dtype)
        x = _random(dev, m, in_f, seed=13).to(dtype)
        scale = _random(dev, in_f if feedforward else out_f, seed=14, scale=0.1, centre=1.0).to(dtype)
        bias = (_random(dev, out_f, seed=15) * 0.1).to(dtype)
        plan = plan_ia3_matmul(m, out_f, is_nf4=nf4, nested=nf4, in_features=in_f, fp32=dtype == torch.float32,
                               arch=device_arch(dev))
        require = {("ia3_matmul", plan.variant)} if plan.path == "triton" else {("nf4_dequantize", "tiles")}

        def ref_op(x, l):
            w = weight if nf4 else weight.to(x.dtype)
            return reference.ia3_linear(x, w, bias.to(x.dtype), l, feedforward)
        with launched(ctx, dtype, require) as detail:
            fast, torch_vals, ref = _three_ways(lambda x, l: ops.ia3_linear(x, weight, bias, l, feedforward), ref_op,
                                                [x, scale])
        detail["variants"] = {"fwd": plan.variant}
        detail.update(_compare_all(["y", "dx", "dl"], fast, torch_vals, ref, dtype))
        return detail
    base = "nf4" if nf4 else "dense"
    return Check(f"ia3 {base} {'ff' if feedforward else 'out'} {_name(dtype)} M={m} {out_f}x{in_f}", "ia3", run)


@contextlib.contextmanager
def _fused_table(fused: bool):
    """The multi-LoRA launcher's choice between its fused kernel and its two launches, set for the block."""
    from fastpeft.kernels import multi_lora

    saved = dict(multi_lora.FUSED)
    multi_lora.FUSED.update(decode=fused, prefill=fused)
    try:
        yield
    finally:
        multi_lora.FUSED.update(saved)


def _multi_lora_check(ctx: Context, m: int, out_f: int, in_f: int, dtype, decode: bool, fused: bool) -> Check:
    def run():
        from fastpeft import reference
        from fastpeft.adapters import ModuleAdapter
        from fastpeft.bank import LoraBank
        from fastpeft.ops.multi_lora import MultiLoraMeta, multi_lora_add_

        dev, n = ctx.device, ctx.sizes.adapters
        ranks = [ctx.sizes.rank + k % 3 for k in range(n)]  # mixed ranks: each masked by its own
        adapters = [ModuleAdapter(lora_a=(_random(dev, r, in_f, seed=20 + k) / in_f ** 0.5).to(dtype),
                                  lora_b=(_random(dev, out_f, r, seed=40 + k) * 0.1).to(dtype), scaling=0.5 + k)
                    for k, r in enumerate(ranks)]
        bank = LoraBank.pack(adapters, in_f, out_f, dtype, dev)
        ids = torch.randint(-1, n, (m,), generator=torch.Generator().manual_seed(m)).to(dev)
        x = _random(dev, m, in_f, seed=16).to(dtype)
        base = _random(dev, m, out_f, seed=17).to(dtype)
        regime = "decode" if decode else "prefill"
        require = {("multi_lora_add_", f"{part}-{regime}") for part in (("fused",) if fused else ("shrink", "expand"))}
        zero = torch.zeros(out_f, in_f, dtype=torch.float64, device=dev)

        def ref(dt):
            return base.to(dt) + reference.multi_lora_linear(
                x.to(dt), zero.to(dt), None, [a.lora_a.to(dt) for a in adapters],
                [a.lora_b.to(dt) for a in adapters], [a.scaling for a in adapters], ids)
        with _fused_table(fused), launched(ctx, dtype, require) as detail:
            y = base.clone()
            multi_lora_add_(y, x, bank, MultiLoraMeta.build(ids, decode=decode))
        detail.update(compare("y", y, ref(dtype), ref(torch.float64), dtype))
        return detail
    kind = f"{'decode' if decode else 'prefill'} {'fused' if fused else 'two-launch'}"
    return Check(f"multi_lora {kind} {_name(dtype)} M={m} {out_f}x{in_f}", "multi_lora", run)


def kernel_checks(ctx: Context, shapes: list) -> list:
    """Every family at each ``(out, in, token counts)`` of ``shapes``, in each dtype."""
    checks = []
    for out_f, in_f, ms in shapes:
        for dtype in DTYPES:
            first = len(checks)
            checks.append(_nf4_dequant_check(ctx, out_f, in_f, dtype, nested=True))
            checks += [_qlora_check(ctx, m, out_f, in_f, dtype) for m in ms]
            for nf4 in (True, False):
                checks += [_dora_check(ctx, m, out_f, in_f, dtype, nf4) for m in (ms[0], ms[-1])]
                checks += [_ia3_check(ctx, m, out_f, in_f, dtype, nf4, ff) for m in ms[1:] for ff in (False, True)]
            for decode, fused in ((True, False), (True, True), (False, False), (False, True)):
                checks.append(_multi_lora_check(ctx, ms[-1], out_f, in_f, dtype, decode, fused))
            for check in checks[first:]:
                check.unit = f"{out_f}x{in_f} {_name(dtype)}"
    return checks


# What each family's passing checks must have launched in each dtype over the whole pass (on the Triton backend)
COVERAGE = {
    "qlora": {"nf4_lora_matmul/gemv", "nf4_lora_matmul/splitk", "nf4_dequantize/tiles"},  # the last: cuBLAS plans
    "multi_lora": {f"multi_lora_add_/{part}-{regime}" for part in ("shrink", "expand", "fused")
                   for regime in ("decode", "prefill")},
}


def coverage(records: list) -> list:
    """Log records of the coverage checks, from the log records of a whole pass (every shard): for each family
    of :data:`COVERAGE` and dtype, ``pass`` when its passing checks launched every variant listed there; ``fail``
    (naming the missing ones) otherwise. A pass cut short by its budget fails them too: a plan nobody ran is
    not accepted."""
    results = []
    for family, wanted in COVERAGE.items():
        for dtype in map(_name, DTYPES):
            seen = set()
            for r in records:
                if r.get("family") == family and r.get("status") == "pass" and r["detail"].get("dtype") == dtype:
                    seen.update(r["detail"].get("launched", ()))
            missing = sorted(wanted - seen)
            results.append({"check": f"coverage {family} {dtype}", "family": "coverage",
                            "status": "fail" if missing else "pass",
                            "detail": f"no passing check launched {missing}" if missing else sorted(seen)})
    return results


# ------------------------------------------------------------------------------------------- model parity


def _adapter_config(peft, method: str):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if method == "ia3":
        return peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    return peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=method == "dora")


def _peft_model(ctx: Context, checkpoint: str, method: str, nf4: bool, dtype):
    """PEFT's model of ``method`` over the saved Llama loaded in ``dtype`` (NF4: bitsandbytes computing in it), its
    adapters random and non-zero (``fastpeft.bench.cases._randomise_adapters``: the same values in every dtype)."""
    from fastpeft.bench.cases import BenchConfig, _model, _model_4bit, _randomise_adapters, _require

    peft = _require("peft")
    cfg = BenchConfig(device=ctx.device, dtype=dtype, rank=8, micro_m=[], micro_features=[], micro_adapters=1,
                      warmup=0, repeats=1, rotations=1, llama={}, model_path=checkpoint)
    base = _model_4bit(cfg) if nf4 else _model(cfg)
    model = peft.get_peft_model(base, _adapter_config(peft, method))
    _randomise_adapters(model)
    return model.train()


def _first_packed(model) -> torch.Tensor:
    """The packed NF4 bytes of the model's first bitsandbytes 4-bit weight."""
    return next(m.weight.data for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state"))


def _forward_backward(model, ids: torch.Tensor, probe: torch.Tensor) -> list:
    """``[logits, gradient of each trainable parameter (by name)...]`` of ``sum(logits * probe)``."""
    params = [(n, p) for n, p in sorted(model.named_parameters()) if p.requires_grad]
    logits = model(input_ids=ids).logits
    grads = torch.autograd.grad((logits.double() * probe).sum(), [p for _, p in params])
    return [logits.detach()] + [torch.cat([g.reshape(-1) for g in grads])]


def _parity_check(ctx: Context, checkpoint: Callable[[], str], method: str, nf4: bool, dtype) -> Check:
    def run():
        from fastpeft import accelerate
        from fastpeft.bench.cases import Unavailable

        try:
            ref_dtype = torch.float32 if nf4 else torch.float64  # bitsandbytes computes in fp32 at most
            path = checkpoint()
            ref_model = _peft_model(ctx, path, method, nf4, ref_dtype)
            peft_model = _peft_model(ctx, path, method, nf4, dtype)
            fast_model = _peft_model(ctx, path, method, nf4, dtype)
        except Unavailable as exc:
            raise Skip(str(exc)) from None
        if nf4:
            assert torch.equal(_first_packed(ref_model), _first_packed(fast_model)), \
                "the fp32 and the working-dtype loads quantised the checkpoint differently: no common reference"
        summary = accelerate(fast_model)
        assert summary.replaced and not summary.skipped and not summary.peft_forward, f"accelerate: {summary}"
        batch, length = ctx.sizes.tokens
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(1, ctx.sizes.llama["vocab_size"], (batch, length), generator=g).to(ctx.device)
        probe = torch.randn(batch, length, ctx.sizes.llama["vocab_size"], generator=g, dtype=torch.float64)
        probe = probe.to(ctx.device)
        ref = _forward_backward(ref_model, ids, probe)
        try:
            peft_vals = _forward_backward(peft_model, ids, probe)
        except Exception as exc:  # PEFT's own model fails here: nothing to compare with; say what fastpeft does
            try:
                _forward_backward(fast_model, ids, probe)
                fast_outcome = "runs"
            except Exception as fast_exc:
                fast_outcome = f"raises {type(fast_exc).__name__} too"
            raise Skip(f"PEFT's own model raises {type(exc).__name__}: {exc}; the accelerated one {fast_outcome}")
        hidden = ctx.sizes.llama["hidden_size"]  # the q / o projections' output: an NF4 product each layer runs
        op = "ia3_matmul" if method == "ia3" else "nf4_lora_matmul"
        require = _nf4_requirements(batch * length, hidden, dtype, ctx.device, op) if nf4 else set()
        with launched(ctx, dtype, require) as detail:
            fast = _forward_backward(fast_model, ids, probe)
        detail["replaced"] = len(summary.replaced)
        for name, a, b, c in zip(["logits", "grads"], fast, peft_vals, ref):
            detail.update(compare(name, a, b, c, dtype, PARITY_ATOL))
        return detail
    return Check(f"parity {method} {'nf4' if nf4 else 'dense'} {_name(dtype)}", "parity", run)


def parity_checks(ctx: Context, workdir: str) -> list:
    """LoRA / DoRA / IA3 over dense and NF4 Llamas in fp32 and bf16, all from one bf16 checkpoint (saved once, on
    first use): every precision then holds the same values, and both NF4 loads quantise them alike."""
    saved: list = []

    def checkpoint() -> str:
        if not saved:
            from fastpeft.bench.cases import BenchConfig, _model

            cfg = BenchConfig(device=ctx.device, dtype=torch.bfloat16, rank=8, micro_m=[], micro_features=[],
                              micro_adapters=1, warmup=0, repeats=1, rotations=1, llama=ctx.sizes.llama)
            path = os.path.join(workdir, "parity-llama")
            _model(cfg).save_pretrained(path)
            saved.append(path)
        return saved[0]
    checks = [_parity_check(ctx, checkpoint, method, nf4, dtype) for nf4 in (False, True)
              for method in ("lora", "dora", "ia3") for dtype in (torch.float32, torch.bfloat16)]
    for check in checks:
        check.unit = "parity"
    return checks


# ------------------------------------------------------------------------------------------------- driver


def all_checks(ctx: Context, workdir: str) -> list:
    """The pass in order: every family at the odd shape, the models, every family at production shapes."""
    s = ctx.sizes
    checks = kernel_checks(ctx, [(*s.odd, s.odd_m)]) + parity_checks(ctx, workdir)
    checks += kernel_checks(ctx, [(out_f, in_f, s.production_m) for out_f, in_f in s.production])
    return checks


def shard(checks: list, index: int, count: int) -> list:
    """Shard ``index`` of ``count``: whole units, dealt in turn (shards compiling the same kernel specialisations
    side by side would each compile them), each shard's checks in the pass's order."""
    units = list(dict.fromkeys(check.unit for check in checks))
    mine = {unit for k, unit in enumerate(units) if k % count == index}
    return [check for check in checks if check.unit in mine]


def run_checks(checks: list, log: str, deadline: float, shard: str, triton: bool) -> int:
    """Run ``checks``, one log line each (``triton``: on the Triton backend, where launches are asserted); the rest
    ``not-run`` past ``deadline`` (monotonic). Returns the count of failures and errors."""
    bad = 0
    for check in checks:
        record = {"check": check.name, "family": check.family, "shard": shard, "triton": triton}
        if time.monotonic() > deadline:
            append_line(log, {**record, "status": "not-run", "detail": "the pass's budget was spent"})
            continue
        start = time.monotonic()
        try:
            record.update(status="pass", detail=check.run())
        except Skip as exc:
            record.update(status="skip", detail=str(exc))
        except AssertionError as exc:
            record.update(status="fail", detail=str(exc))
        except Exception as exc:  # a kernel error, a CUDA error: reported with its traceback's last lines
            tail = traceback.format_exc().strip().splitlines()[-6:]
            record.update(status="error", detail=f"{type(exc).__name__}: {exc}", traceback=tail)
        record["seconds"] = round(time.monotonic() - start, 3)
        bad += record["status"] in ("fail", "error")
        append_line(log, record)
    return bad


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", required=True, help="JSON-lines log to append to")
    parser.add_argument("--budget-s", type=float, required=True)
    parser.add_argument("--shard", default="0/1", help="I/N: run the I-th of N shards (see shard())")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (kernels in Triton's interpreter)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    index, count = (int(v) for v in args.shard.split("/"))
    from fastpeft.ops.dispatch import backend_for

    device = torch.device("cpu" if args.dry_run else "cuda")
    ctx = Context(device=device, sizes=DRY_SIZES if args.dry_run else GPU_SIZES,
                  triton=backend_for(device) == "triton")
    with tempfile.TemporaryDirectory() as workdir:
        checks = all_checks(ctx, workdir)
        bad = run_checks(shard(checks, index, count), args.log, deadline, args.shard, ctx.triton)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
