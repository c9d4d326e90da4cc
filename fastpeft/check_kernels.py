"""``fastpeft check-kernels``: every production launch compiled for real GPUs, on a CPU, and read in SASS.

No GPU is needed. For each launch of a fixed production grid (``production_grid``) the launchers of
``fastpeft.kernels`` run on meta tensors inside ``fastpeft.kernels.plan.recording()``: they validate,
plan and build their arguments exactly as on a GPU, and the ``(plan, args)`` they would launch is
recorded instead. Each launch is then specialised as Triton's JIT specialises it at launch (Triton's own
binder and ``_pack_args`` over the real argument list, or on Triton 3.4, which has no ``_pack_args``, the same
steps its ``JITFunction.run`` takes: ``tt.divisibility=16`` on pointers and integers divisible by 16, integers
equal to 1 turned into constants, the plan's ``num_warps`` / ``num_stages`` / compiler options), compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for sm_80 / sm_89 / sm_90a, and its cubin
read with the ``cuobjdump`` that the triton wheel bundles:

- registers, stack (spill) and local bytes from ``cuobjdump --dump-resource-usage``; spill instructions
  (``STL`` / ``LDL``) counted in the SASS; shared memory from the compiled kernel's metadata;
- theoretical occupancy from registers, shared memory and warps per block against each architecture's
  per-SM limits (``ARCHES``), and which of the three limits it;
- the **main loop**: the SASS is scanned for backward branches (a ``BRA`` whose target address is before
  its own); each one closes a loop spanning ``[target, branch]``. The main loop is, among the loops
  with global loads or tensor-core instructions, one with the most tensor-core instructions, and of
  those the first in program order (nested loops are counted with their outer loop): the K loop comes
  before the epilogue's rank loop (the LoRA term), which may hold as many or more loads but runs once
  per program, in split 0 only. A kernel without a backward branch is counted whole, as is one whose
  loops hold neither. The software pipeliner does not unroll; the NF4 kernels unroll ``GROUP`` steps of
  ``BLOCK_K`` into one pass themselves (their scales load once per pass), so one pass is ``GROUP`` steps;
- in that loop: tensor-core instructions (``HMMA`` = ``mma.sync``, ``HGMMA`` = Hopper ``wgmma``) and
  global loads (``LDG``, and ``LDGSTS`` = ``cp.async`` to shared memory) by width in bits (8/16/32/64/128),
  per thread; and per weight element: ``loads x threads / weight elements per iteration`` (the weight tile
  of one pass: ``weight_tile``). "Narrow" loads are those under 64 bits. ``global_per_element``: every
  global memory instruction of the loop (loads of weights, scales and activations, ``cp.async``, stores,
  atomics) per weight element, the same way (the NF4 main loops' target: at most 1 per 16 weight elements), split
  into ``global_loads_per_element`` and ``global_stores_per_element``, and of the loads those that read the NF4
  weight (packed bytes, absmax, nested absmax: their innermost source line, from ``nvdisasm
  --print-line-info``, is in ``fastpeft/kernels/nf4.py``), ``weight_loads_per_element``, and the widths of
  those in ``nf4_codes`` (the packed codes, meant to be 64 bits or wider), ``packed_load_bits``;
  ``instructions_per_element``: every instruction of the loop, the same way (what decoding costs beside the
  memory traffic).

Identical compilations (many shapes specialise the same way) are compiled once per architecture; Triton's
on-disk cache makes a second run fast. ``--jobs`` compiles in parallel processes. See ``--help``.
Triton 3.4-3.9 are supported (``fastpeft.kernels.versions``; another version is refused with one line).
``--check`` compares with this version's section of the thresholds file (see ``compare``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .kernels.versions import unsupported_triton, version_tuple

# Per-SM limits (CUDA occupancy calculator data): registers, shared memory per SM and the most
# one block may use, warps, blocks, and the shared memory the system reserves per block (1 KB on sm_80+).
ARCHES = {
    "sm_80": {"cc": 80, "regs": 65536, "smem": 167936, "smem_block": 166912, "warps": 64, "blocks": 32},
    "sm_89": {"cc": 89, "regs": 65536, "smem": 102400, "smem_block": 101376, "warps": 48, "blocks": 24},
    "sm_90a": {"cc": 90, "regs": 65536, "smem": 233472, "smem_block": 232448, "warps": 64, "blocks": 32},
}
SMEM_RESERVED_PER_BLOCK = 1024
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
MMA_RANK = {"none": 0, "HMMA": 1, "HGMMA": 2}
THRESHOLDS_PATH = Path(__file__).with_name("check_kernels_thresholds.json")

# The production grid: the token counts, (out, in) shapes and LoRA ranks the kernels are planned for.
TOKENS = (1, 4, 16, 64, 512, 4096)
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))  # (out, in)
RANKS = (16, 64)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16+fp32": torch.bfloat16}
# The adapter tensors' dtype per grid dtype: "bf16+fp32" is what PEFT users run (a bf16 model with fp32 adapters,
# PEFT's autocast_adapter_dtype): bf16 activations and weights, fp32 LoRA factors, rank-r intermediates and
# IA3 / DoRA scales, and for multi-LoRA an fp32 bank (its rank-r intermediate h in fp32) beside bf16 tokens.
ADAPTER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16+fp32": torch.float32}
NF4_BLOCKSIZE = 64
MULTI_LORA_ADAPTERS = 64
MULTI_LORA_RANKS = tuple(8 + (56 * k) // (MULTI_LORA_ADAPTERS - 1) for k in range(MULTI_LORA_ADAPTERS))  # 8..64
MULTI_LORA_CASES = {"decode": (64, 1), "prefill": (64, 128)}  # (sequences, tokens per sequence)
# Multi-adapter training's backward (fastpeft.ops.multi_lora_grad): (adapters, tokens per adapter, largest rank).
# "train": eight adapters of ranks up to 64 over 1024 tokens each (one program per adapter and block fills the GPU);
# "long": one rank-16 adapter over 8192 tokens (too few programs: its segment gradients split over tokens).
MULTI_LORA_GRAD_CASES = {"train": (8, 1024, 64), "long": (1, 8192, 16)}
FAMILIES = ("qlora", "dora", "ia3", "nf4_dequant", "multi_lora", "multi_lora_grad")


def weight_tile(plan) -> int:
    """Weight elements one main-loop iteration of ``plan``'s kernel consumes (one program); a plan of
    another op states it as ``runtime["weight_tile"]``."""
    c = plan.constexprs
    if "weight_tile" in plan.runtime:
        return plan.runtime["weight_tile"]
    if plan.op in ("nf4_lora_matmul", "ia3_matmul"):  # GROUP steps of BLOCK_K per iteration
        return c.get("GROUP", 1) * c["BLOCK_K"] * c["BLOCK_N"]
    if plan.op == "nf4_dequantize":  # GROUP tiles of BLOCK_R x BLOCK_C per iteration
        return c.get("GROUP", 1) * c["BLOCK_R"] * c["BLOCK_C"]
    if plan.op in ("multi_lora_add_", "multi_lora_shrink"):  # adapter weights: A slices in shrink (and fused), B slices in expand
        return c["BLOCK_R"] * (c["BLOCK_N"] if plan.variant.startswith("expand") else c["BLOCK_K"])
    raise ValueError(f"no weight tile known for {plan.op}")


# ---------------------------------------------------------------------------------------------------------
# The grid: each case calls the launchers on meta tensors and records what they would launch.

@dataclasses.dataclass(frozen=True)
class Case:
    """One launch of the grid: ``family`` and ``step`` (``fwd``, ``dx``, ``dm``...), its parameters and the
    recorded ``plan`` / ``args``. ``key`` names it uniquely (the thresholds file uses it)."""

    arch: str
    family: str
    step: str
    dtype: str
    tokens: int
    shape: tuple
    rank: int
    base: str  # "nf4" or "dense"
    plan: object
    args: tuple

    @property
    def key(self) -> str:
        out, inp = self.shape
        rank = f" r={self.rank}" if self.rank else ""
        return f"{self.family}/{self.step} {self.base} {self.dtype} M={self.tokens} {out}x{inp}{rank} {self.plan.variant}"


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _nf4_weight(out_features: int, in_features: int, dtype):
    from .nf4 import NESTED_BLOCKSIZE, NF4Weight

    numel = out_features * in_features
    blocks = -(-numel // NF4_BLOCKSIZE)
    return NF4Weight(packed=_meta((numel + 1) // 2, dtype=torch.uint8), absmax=_meta(blocks, dtype=torch.uint8),
                     shape=torch.Size((out_features, in_features)), dtype=dtype, blocksize=NF4_BLOCKSIZE,
                     nested_code=_meta(256), nested_absmax=_meta(-(-blocks // NESTED_BLOCKSIZE)),
                     nested_offset=_meta(()))


def _record(arch: str, fn, *args, **kwargs) -> list:
    from .kernels.plan import recording

    cc = ARCHES[arch]["cc"]
    with recording((cc // 10, cc % 10)) as launches:
        fn(*args, **kwargs)
    return launches


def _layer_launches(arch: str, family: str, base: str, m: int, out_f: int, in_f: int, rank: int, dtype,
                    adapter_dtype) -> list:
    """``[(step, plan, args)]``: the Triton launches of one layer's forward and backward, as the autograd
    functions in ``fastpeft.ops`` issue them (no dropout, every input requiring a gradient)."""
    from .kernels.ia3 import ia3_matmul
    from .kernels.nf4 import nf4_dequantize
    from .kernels.nf4_matmul import nf4_lora_matmul

    weight = _nf4_weight(out_f, in_f, dtype) if base == "nf4" else _meta(out_f, in_f, dtype=dtype)
    x, dy = _meta(m, in_f, dtype=dtype), _meta(m, out_f, dtype=dtype)
    lora_a, lora_b = _meta(rank, in_f, dtype=adapter_dtype), _meta(out_f, rank, dtype=adapter_dtype)
    h, g = _meta(m, rank, dtype=adapter_dtype), _meta(m, rank, dtype=adapter_dtype)
    steps = []
    if family == "qlora":  # ops/lora.py: forward with the LoRA term in the epilogue; dx with g A in it
        steps.append(("fwd", nf4_lora_matmul, (x, weight), dict(lora_h=h, lora_expand=lora_b.t(), scaling=2.0)))
        steps.append(("dx", nf4_lora_matmul, (dy, weight),
                      dict(transpose_weight=True, lora_h=g, lora_expand=lora_a, scaling=2.0)))
    elif family == "dora":  # ops/dora.py: norm; c ⊙ (x Wᵀ + s h Bᵀ); dx = dz W + s g A; dm's reduction
        col_scale = _meta(out_f, dtype=adapter_dtype)
        if base == "nf4":
            # the norm's identity: ‖W‖² of the dequantised base (once per base), then A Wᵀ with M = r rows, fp32 out
            steps.append(("norm", nf4_dequantize, (weight, dtype), {}))
            steps.append(("norm", nf4_lora_matmul, (_meta(rank, in_f, dtype=dtype), weight),
                          dict(out=_meta(rank, out_f, dtype=torch.float32))))
            steps.append(("fwd", nf4_lora_matmul, (x, weight),
                          dict(lora_h=h, lora_expand=lora_b.t(), scaling=2.0, col_scale=col_scale)))
            steps.append(("dx", nf4_lora_matmul, (dy, weight),
                          dict(transpose_weight=True, lora_h=g, lora_expand=lora_a, scaling=2.0)))
        steps.append(("dm", ia3_matmul, (x, weight), dict(reduce_rows=dy, store_out=False)))
    elif family == "ia3":  # ops/ia3.py, feed-forward (input scale) and output (output scale) layers
        l_in, l_out = _meta(in_f, dtype=adapter_dtype), _meta(out_f, dtype=adapter_dtype)
        steps.append(("ff-fwd", ia3_matmul, (x, weight), dict(in_scale=l_in)))
        steps.append(("ff-bwd", ia3_matmul, (dy, weight), dict(transpose_weight=True, out_scale=l_in, reduce_rows=x)))
        steps.append(("out-fwd", ia3_matmul, (x, weight), dict(out_scale=l_out)))
        steps.append(("out-dx", ia3_matmul, (dy, weight), dict(transpose_weight=True, in_scale=l_out)))
        steps.append(("out-dl", ia3_matmul, (x, weight), dict(reduce_rows=dy, store_out=False)))
    launches = []
    for step, fn, args, kwargs in steps:
        launches += [(step, plan, largs) for plan, largs in _record(arch, fn, *args, **kwargs)]
    return launches


def _multi_lora_launches(arch: str, regime: str, out_f: int, in_f: int, dtype, adapter_dtype) -> list:
    """The launches of ``fastpeft.ops.multi_lora_add_`` for 64 adapters of ranks 8..64, one per sequence:
    tokens in ``dtype``, the bank in ``adapter_dtype``."""
    from .kernels.multi_lora import multi_lora_add_
    from .ops.multi_lora import prefill_block_m

    seqs, per_seq = MULTI_LORA_CASES[regime]
    m = seqs * per_seq
    cc = ARCHES[arch]["cc"]
    block_m = 1 if regime == "decode" else prefill_block_m((cc // 10, cc % 10))  # as MultiLoraMeta.build there
    tiles = [(k, k * per_seq + start, min(block_m, per_seq - start))
             for k in range(seqs) for start in range(0, per_seq, block_m)]
    n, max_rank = MULTI_LORA_ADAPTERS, max(MULTI_LORA_RANKS)
    launches = _record(
        arch, multi_lora_add_, _meta(m, out_f, dtype=dtype), _meta(m, in_f, dtype=dtype),
        _meta(n, max_rank, in_f, dtype=adapter_dtype), _meta(n, out_f, max_rank, dtype=adapter_dtype),
        _meta(n, dtype=torch.int32), _meta(n), _meta(m, 1), _meta(1, m, dtype=torch.int32),
        _meta(len(tiles), 3, dtype=torch.int32), [len(tiles)], block_m, n - 1,
    )
    return [(plan.variant.split("-")[0], plan, args) for plan, args in launches]


def _multi_lora_grad_launches(arch: str, case: str, out_f: int, in_f: int, dtype, adapter_dtype) -> list:
    """``[(step, plan, args)]``: the Triton launches of the multi-adapter backward of one layer
    (``fastpeft.ops.multi_lora_grad``'s composition: the shrinks of ``h`` and ``g``, the segment gradients ``dB`` and
    ``dA``, and ``dx`` through the transposed bank), tokens in ``dtype``, the bank in ``adapter_dtype``."""
    from .kernels.multi_lora import multi_lora_add_
    from .kernels.multi_lora_grad import multi_lora_segment_grad, multi_lora_shrink
    from .ops.multi_lora import prefill_block_m

    n, per_adapter, max_rank = MULTI_LORA_GRAD_CASES[case]
    m = n * per_adapter
    cc = ARCHES[arch]["cc"]
    block_m = prefill_block_m((cc // 10, cc % 10))  # as MultiLoraMeta.build there
    tiles = _meta(-(-per_adapter // block_m) * n, 3, dtype=torch.int32)
    x, dy = _meta(m, in_f, dtype=dtype), _meta(m, out_f, dtype=dtype)
    lora_a, lora_b = _meta(n, max_rank, in_f, dtype=adapter_dtype), _meta(n, out_f, max_rank, dtype=adapter_dtype)
    h, g = _meta(m, max_rank, dtype=adapter_dtype), _meta(m, max_rank, dtype=adapter_dtype)
    ranks, scalings, weights = _meta(n, dtype=torch.int32), _meta(n), _meta(m, 1)
    order, segments = _meta(1, m, dtype=torch.int32), _meta(1, n, 2, dtype=torch.int32)
    lora_a_t, lora_b_t = lora_b.transpose(1, 2), lora_a.transpose(1, 2)  # LoraBank.transposed()
    steps = (
        ("shrink-h", multi_lora_shrink, (x, lora_a, ranks, order, tiles, block_m, n - 1)),
        ("shrink-g", multi_lora_shrink, (dy, lora_a_t, ranks, order, tiles, block_m, n - 1)),
        ("dB", multi_lora_segment_grad, (dy, h, ranks, scalings, weights, order, segments, "lora_b")),
        ("dA", multi_lora_segment_grad, (g, x, ranks, scalings, weights, order, segments, "lora_a")),
        ("dx", multi_lora_add_, (_meta(m, in_f, dtype=dtype), dy, lora_a_t, lora_b_t, ranks, scalings, weights, order,
                                 tiles, [tiles.shape[0]], block_m, n - 1)),
    )
    launches = []
    for step, fn, args in steps:
        launches += [(step, plan, largs) for plan, largs in _record(arch, fn, *args)]
    return launches


def production_grid(arches=tuple(ARCHES), families=FAMILIES, dtypes=tuple(DTYPES), tokens=TOKENS, shapes=SHAPES,
                    ranks=RANKS) -> list:
    """Every launch of the production grid as :class:`Case` rows, planned for each of ``arches``
    and restricted to the given families / dtypes / token counts / (out, in) shapes / ranks. Launches that
    do not depend on a parameter (the norm on ``M``, IA3 on the rank) appear once for it."""
    from .kernels.nf4 import nf4_dequantize

    cases = []
    for arch in arches:
        for dtype_name in dtypes:
            dtype, adapter_dtype = DTYPES[dtype_name], ADAPTER_DTYPES[dtype_name]
            for out_f, in_f in shapes:
                if "nf4_dequant" in families and adapter_dtype == dtype:  # no adapter tensors
                    for plan, args in _record(arch, nf4_dequantize, _nf4_weight(out_f, in_f, dtype), dtype):
                        cases.append(Case(arch, "nf4_dequant", "dequant", dtype_name, 0, (out_f, in_f), 0, "nf4",
                                          plan, args))
                if "multi_lora_grad" in families:
                    for case, (n, per_adapter, max_rank) in MULTI_LORA_GRAD_CASES.items():
                        for step, plan, args in _multi_lora_grad_launches(arch, case, out_f, in_f, dtype,
                                                                          adapter_dtype):
                            cases.append(Case(arch, "multi_lora_grad", f"{case}-{step}", dtype_name, n * per_adapter,
                                              (out_f, in_f), max_rank, "dense", plan, args))
                if "multi_lora" in families:
                    for regime, (seqs, per_seq) in MULTI_LORA_CASES.items():
                        for step, plan, args in _multi_lora_launches(arch, regime, out_f, in_f, dtype, adapter_dtype):
                            cases.append(Case(arch, "multi_lora", f"{regime}-{step}", dtype_name, seqs * per_seq,
                                              (out_f, in_f), 0, "dense", plan, args))
                for family, bases in (("qlora", ("nf4",)), ("dora", ("nf4", "dense")), ("ia3", ("nf4", "dense"))):
                    if family not in families:
                        continue
                    for base in bases:
                        seen = set()
                        for m in tokens:
                            for rank in (ranks if family != "ia3" else (0,)):
                                for step, plan, args in _layer_launches(arch, family, base, m, out_f, in_f,
                                                                        max(rank, 1), dtype, adapter_dtype):
                                    m_used, rank_used = (0 if step == "norm" else m), (0 if family == "ia3" else rank)
                                    if (step, m_used, rank_used, plan.variant) in seen:
                                        continue
                                    seen.add((step, m_used, rank_used, plan.variant))
                                    cases.append(Case(arch, family, step, dtype_name, m_used, (out_f, in_f),
                                                      rank_used, base, plan, args))
    return cases


# The CI gate's subset: the main plan of each kernel family (tests/test_check_kernels.py).
MAIN_KEYS = (
    "qlora/fwd nf4 bf16 M=16 14336x4096 r=16 splitk",
    "qlora/fwd nf4 bf16 M=1 4096x4096 r=16 gemv",
    "qlora/dx nf4 bf16 M=1 4096x4096 r=16 gemv",
    "ia3/ff-fwd nf4 bf16 M=1 4096x4096 nf4",
    "ia3/ff-fwd dense bf16 M=512 4096x4096 dense",
    "nf4_dequant/dequant nf4 bf16 M=0 4096x4096 tiles",
    "multi_lora/decode-shrink dense bf16 M=64 4096x4096 shrink-decode",
    "multi_lora/prefill-expand dense bf16 M=8192 4096x4096 expand-prefill",
)


def main_cases(arches=("sm_80", "sm_90a")) -> list:
    """The :data:`MAIN_KEYS` launches for each of ``arches``, built from the smallest grid that holds them."""
    cases = production_grid(arches, dtypes=("bf16",), tokens=(1, 16, 512), shapes=((4096, 4096), (14336, 4096)),
                            ranks=(16, 64))
    by_key = {(c.arch, c.key): c for c in cases}
    missing = [(a, k) for a in arches for k in MAIN_KEYS if (a, k) not in by_key]
    if missing:
        raise RuntimeError(f"main launches missing from the grid: {missing}")
    return [by_key[a, k] for a in arches for k in MAIN_KEYS]


# ---------------------------------------------------------------------------------------------------------
# Specialise and compile.

def specialise(plan, args, arch: str):
    """``(signature, constexprs, attrs, options)`` for ``plan`` launched with ``args`` on ``arch``, computed by
    Triton's own JIT binder (``create_function_from_signature`` + ``JITFunction._pack_args``): what
    ``kernel[grid](*args, ...)`` would compile on that GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    fn = plan.kernel
    backend = make_backend(GPUTarget("cuda", ARCHES[arch]["cc"], 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages, **plan.options)
    bound, specialization, options = binder(*args, **kwargs)
    if hasattr(fn, "_pack_args"):  # Triton >= 3.5
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    else:
        options, signature, constexprs, attrs = _pack_args_34(fn, backend, kwargs, bound, specialization)
    return signature, constexprs, attrs, options.__dict__


def _pack_args_34(fn, backend, kwargs: dict, bound: dict, specialization: list) -> tuple:
    """``(options, signature, constexprs, attrs)`` of a launch as Triton 3.4's ``JITFunction.run`` derives them
    from the binder's output before compiling (3.5 moved these steps into ``JITFunction._pack_args``): the
    parameters' types, the constexpr values at their paths in the (possibly nested) arguments, and the
    backend's parse of every string specialisation attribute."""
    from triton._utils import find_paths_if, get_iterable_path

    types = [kind for kind, _ in specialization]
    signature = dict(zip((p.name for p in fn.params), types))
    values = list(bound.values())
    constexprs = {path: get_iterable_path(values, path)
                  for path in find_paths_if(types, lambda _, kind: kind == "constexpr")}
    hints = [hint for _, hint in specialization]
    attrs = {path: backend.parse_attr(get_iterable_path(hints, path))
             for path in find_paths_if(hints, lambda _, hint: isinstance(hint, str))}
    return backend.parse_options(kwargs), signature, constexprs, attrs


def _freeze(value):
    """A hashable copy of nested dicts / lists (dicts become item tuples, in their order)."""
    if isinstance(value, dict):
        return tuple((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw_attrs(attrs: tuple) -> dict:
    return {path: [list(pair) for pair in pairs] for path, pairs in attrs}


@dataclasses.dataclass(frozen=True)
class Job:
    """One compilation: a kernel (``module:qualname``), its specialisation and the target, plus what the
    SASS analysis needs (threads per program, weight elements per main-loop iteration)."""

    kernel: str
    arch: str
    signature: tuple
    constexprs: tuple
    attrs: tuple
    options: tuple
    num_warps: int
    weight_elements: int

    @classmethod
    def of(cls, plan, args, arch: str) -> "Job":
        signature, constexprs, attrs, options = specialise(plan, args, arch)
        fn = plan.kernel
        return cls(
            kernel=f"{fn.module}:{fn.fn.__qualname__}", arch=arch, signature=_freeze(signature),
            constexprs=_freeze(constexprs), attrs=_freeze(attrs), options=_freeze(options),
            num_warps=plan.num_warps, weight_elements=weight_tile(plan),
        )


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _error_line(exc: BaseException) -> str:
    """One line for a failed compile: the exception's type and the last line of its message, or of its cause's
    where the message does not hold the cause (Triton 3.4's ``CompilationError`` ends with the source excerpt
    and keeps the reason in ``__cause__``)."""
    text, cause = str(exc).strip(), exc.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        return f"{type(exc).__name__}: {_error_line(cause)}"
    return f"{type(exc).__name__}: {text.splitlines()[-1][:300]}" if text else type(exc).__name__


def compile_job(job: Job, plan_kernel=None) -> dict:
    """Compile ``job`` and analyse its cubin; ``{"compiled": False, "error": ...}`` when Triton or ptxas fails."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    start = time.perf_counter()
    if plan_kernel is None:
        module, qualname = job.kernel.split(":")
        plan_kernel = getattr(importlib.import_module(module), qualname)
    signature, constexprs, options = dict(job.signature), dict(job.constexprs), dict(job.options)
    target = GPUTarget("cuda", ARCHES[job.arch]["cc"], 32)
    try:
        kernel = triton.compile(ASTSource(plan_kernel, signature, constexprs, _thaw_attrs(job.attrs)), target=target,
                                options=options)
    except Exception as exc:  # a compile error is a result of the check, reported in its row
        return {"compiled": False, "error": _error_line(exc), "seconds": time.perf_counter() - start}
    result = analyse_cubin(kernel.asm["cubin"], job.arch, int(kernel.metadata.shared), job.num_warps,
                           job.weight_elements)
    result.update(compiled=True, seconds=time.perf_counter() - start)
    return result


# ---------------------------------------------------------------------------------------------------------
# Read the cubin.

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse_sass(text: str) -> list:
    """``[(address, opcode, operands)]`` of every instruction in ``cuobjdump -sass`` output."""
    return [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _SASS_LINE.finditer(text)]


def _load_width(opcode: str):
    """Width in bits of a global load opcode (``LDG`` / ``LDGSTS``), None for anything else."""
    parts = opcode.split(".")
    if parts[0] not in ("LDG", "LDGSTS"):
        return None
    for width, tokens in ((128, {"128"}), (64, {"64"}), (16, {"U16", "S16"}), (8, {"U8", "S8"})):
        if tokens & set(parts[1:]):
            return width
    return 32


def _is_global_memory(opcode: str) -> bool:
    """A global memory instruction: load, ``cp.async``, store, reduction or atomic."""
    return opcode.split(".")[0] in ("LDG", "LDGSTS", "STG", "RED", "REDG", "ATOMG", "ATOM")


def _mma_kind(opcode: str):
    head = opcode.split(".")[0]
    return head if head in ("HMMA", "HGMMA") else None


def main_loop(instructions: list) -> tuple:
    """``(first, last, found)`` address range of the main loop (see the module docstring); the whole
    kernel with ``found=False`` when it has no loop with global loads or tensor-core instructions."""
    loops = []
    for addr, opcode, operands in instructions:
        if opcode.split(".")[0] == "BRA":
            target = re.search(r"0x([0-9a-f]+)", operands)
            # a branch to itself is the padding loop ptxas puts after the last EXIT, not a loop
            if target and int(target.group(1), 16) < addr:
                loops.append((int(target.group(1), 16), addr))
    if not loops:
        return instructions[0][0], instructions[-1][0], False

    def counts(loop):
        body = [op for a, op, _ in instructions if loop[0] <= a <= loop[1]]
        return sum(_mma_kind(op) is not None for op in body), sum(_load_width(op) is not None for op in body)

    candidates = [loop for loop in loops if any(counts(loop))]
    if not candidates:
        return instructions[0][0], instructions[-1][0], False
    # most MMA, then the earliest start, then the widest span (an outer loop before its nested ones)
    first, last = min(candidates, key=lambda loop: (-counts(loop)[0], loop[0], -loop[1]))
    return first, last, True


def occupancy(arch: str, registers: int, shared: int, num_warps: int) -> tuple:
    """``(occupancy in [0, 1], limiter, blocks per SM)``; the limiter is ``regs``, ``smem`` or ``warps``
    (the block and warp counts per SM), ``none`` if the block does not fit at all."""
    limits = ARCHES[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by = {
        "regs": (limits["regs"] // regs_per_warp) // num_warps,
        "smem": limits["smem"] // (shared + SMEM_RESERVED_PER_BLOCK) if shared else limits["blocks"],
        "warps": min(limits["warps"] // num_warps, limits["blocks"]),
    }
    if shared > limits["smem_block"]:
        by["smem"] = 0
    limiter = min(by, key=lambda k: (by[k], k != "warps"))
    blocks = by[limiter]
    return blocks * num_warps / limits["warps"], (limiter if blocks else "none"), blocks


_LINE_FILE = re.compile(r'//## File "([^"]*)", line (\d+)')
_LINE_ADDRESS = re.compile(r"/\*([0-9a-f]{4,})\*/")
# The NF4 decode helpers (packed bytes, absmax, nested absmax): a main-loop load whose innermost source line is
# in this file reads the weight; one in the lines of ``nf4_codes`` reads the packed codes.
WEIGHT_SOURCE = "fastpeft/kernels/nf4.py"


def source_lines(line_info: str) -> dict:
    """``{address: (source file, line)}`` of every instruction in ``nvdisasm --print-line-info`` output (the
    innermost location of an inlined call)."""
    lines, current = {}, None
    for text in line_info.splitlines():
        found = _LINE_FILE.search(text)
        if found:
            current = (found.group(1), int(found.group(2)))
            continue
        found = _LINE_ADDRESS.search(text)
        if found and current is not None:
            lines[int(found.group(1), 16)] = current
    return lines


@functools.lru_cache(maxsize=None)
def _packed_code_lines() -> range:
    """The source lines of :func:`fastpeft.kernels.nf4.nf4_codes`, whose loads are those of the packed codes."""
    from .kernels.nf4 import nf4_codes

    source, first = inspect.getsourcelines(nf4_codes.fn)
    return range(first, first + len(source))


def analyse_cubin(cubin: bytes, arch: str, shared: int, num_warps: int, weight_elements: int) -> dict:
    """Registers, spills, shared memory, occupancy, main-loop MMA and global loads of one compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
        line_info = subprocess.run([_tool("nvdisasm"), "--print-line-info", str(path)], capture_output=True,
                                   text=True).stdout
    resources = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage)}
    instructions = parse_sass(sass)
    first, last, found = main_loop(instructions)
    loop = [(a, op, _load_width(op)) for a, op, _ in instructions if first <= a <= last]
    body = [op for _, op, _ in loop]
    # without line info (TRITON_DISABLE_LINE_INFO) the weight's share is unknown
    lines, packed_lines = source_lines(line_info), _packed_code_lines()
    weight_widths = [(width, lines[a][1] in packed_lines) for a, _, width in loop
                     if width is not None and lines.get(a, ("", 0))[0].endswith(WEIGHT_SOURCE)]
    packed_widths = sorted({width for width, packed in weight_widths if packed})
    mma = [k for k in map(_mma_kind, body) if k]
    loads = {}
    for width in (width for _, _, width in loop if width):
        loads[width] = loads.get(width, 0) + 1
    global_ops = sum(_is_global_memory(op) for op in body)
    global_loads = sum(loads.values())
    threads = num_warps * 32
    total_shared = shared + resources.get("SHARED", 0)
    occ, limiter, blocks = occupancy(arch, resources.get("REG", 0), total_shared, num_warps)
    spill_ops = sum(op.split(".")[0] in ("STL", "LDL") for _, op, _ in instructions)
    return {
        "registers": resources.get("REG", 0), "stack_bytes": resources.get("STACK", 0),
        "local_bytes": resources.get("LOCAL", 0), "spill_instructions": spill_ops,
        "shared_bytes": total_shared, "occupancy": round(occ, 4), "occupancy_limiter": limiter,
        "blocks_per_sm": blocks,
        "main_loop": {"found": found, "instructions": len(body)},
        "mma_kind": (max(set(mma), key=MMA_RANK.get) if mma else "none"), "mma_count": len(mma),
        "loads_per_thread": {str(w): n for w, n in sorted(loads.items())},
        "loads_per_element": {str(w): round(n * threads / weight_elements, 4) for w, n in sorted(loads.items())},
        "narrow_loads_per_element": round(sum(n for w, n in loads.items() if w < 64) * threads / weight_elements, 4),
        "global_per_element": round(global_ops * threads / weight_elements, 4),
        "global_loads_per_element": round(global_loads * threads / weight_elements, 4),
        "global_stores_per_element": round((global_ops - global_loads) * threads / weight_elements, 4),
        "weight_loads_per_element": (round(len(weight_widths) * threads / weight_elements, 4) if lines else None),
        "packed_load_bits": packed_widths if lines else None,
        "instructions_per_element": round(len(body) * threads / weight_elements, 3),
    }


# ---------------------------------------------------------------------------------------------------------
# Run, report, compare with thresholds.

def _compile_in_worker(job: Job) -> dict:
    return compile_job(job)


def run(cases: list, jobs: int = 1, progress=None) -> list:
    """Compile every case for its arch (each distinct specialisation once) and return result rows:
    ``{"key", "arch", "family", "step", ..., "plan": describe(), **analysis}``."""
    pairs = [(case, case.arch, Job.of(case.plan, case.args, case.arch)) for case in cases]
    unique = list(dict.fromkeys(job for _, _, job in pairs))
    results = {}
    if jobs > 1 and len(unique) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(jobs, len(unique))) as pool:
            for done, (job, result) in enumerate(zip(unique, pool.imap(_compile_in_worker, unique)), 1):
                results[job] = result
                if progress:
                    progress(done, len(unique), job)
    else:
        for done, job in enumerate(unique, 1):
            results[job] = compile_job(job)
            if progress:
                progress(done, len(unique), job)
    import triton

    rows = []
    for case, arch, job in pairs:
        rows.append({"key": case.key, "arch": arch, "triton": triton.__version__, "family": case.family,
                     "step": case.step, "base": case.base,
                     "dtype": case.dtype, "tokens": case.tokens, "shape": list(case.shape), "rank": case.rank,
                     "kernel": case.plan.kernel_name, "variant": case.plan.variant, "grid": list(case.plan.grid),
                     "plan": case.plan.describe(), **results[job]})
    return rows


def _progress_bar(done: int, total: int, job: Job, stream=sys.stderr):
    width = 30
    filled = width * done // total
    name = job.kernel.split(":")[1]
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {job.arch} {name[:40]:<40}")
    if done == total:
        stream.write("\n")
    stream.flush()


COLUMNS = ("arch", "launch", "regs", "spill B", "smem KB", "occupancy", "MMA in loop", "loads/thread in loop",
           "narrow loads/elem", "gmem instr/elem", "weight loads/elem", "packed load bits", "instr/elem")


def _cells(row: dict) -> list:
    if not row["compiled"]:
        return [row["arch"], row["key"], "ERROR", row["error"], "", "", "", "", "", "", "", "", ""]
    loads = " ".join(f"{n}x{w}b" for w, n in row["loads_per_thread"].items()) or "-"
    return [row["arch"], row["key"], str(row["registers"]), str(row["stack_bytes"]),
            f"{row['shared_bytes'] / 1024:.1f}", f"{row['occupancy']:.0%} ({row['occupancy_limiter']})",
            f"{row['mma_kind']} x{row['mma_count']}" if row["mma_count"] else "none", loads,
            f"{row['narrow_loads_per_element']:.3g}", f"{row['global_per_element']:.3g}",
            "-" if row["weight_loads_per_element"] is None else f"{row['weight_loads_per_element']:.3g}",
            " ".join(map(str, row["packed_load_bits"] or [])) or "-",
            f"{row['instructions_per_element']:.3g}"]


def format_table(rows: list) -> str:
    """A plain-text table, one row per launch and architecture."""
    table = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)


def format_markdown(rows: list) -> str:
    """The same table in Markdown, after a line naming the Triton version(s) that compiled the rows."""
    versions = ", ".join(sorted({r["triton"] for r in rows}))
    arches = ", ".join(dict.fromkeys(r["arch"] for r in rows))
    lines = [f"Static check, Triton {versions}, {arches}: {len(rows)} launches x arch", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines)


# Threshold fields and in which direction a number gets worse.
THRESHOLD_FIELDS = {"stack_bytes": "max", "registers": "max", "shared_bytes": "max", "occupancy": "min",
                    "narrow_loads_per_element": "max", "global_per_element": "max",
                    "instructions_per_element": "max", "mma_kind": "mma"}
# The thresholds file holds one section per Triton version (``"3.9"``), each with an entry per gate launch
# (``"<arch> <key>"``). On the newest version in the file every field is a ratchet; on the others, whose
# register allocation differs, only these: no more spill bytes, no less occupancy than that version gave.
FLOOR_FIELDS = ("stack_bytes", "occupancy")
# Every launch without an entry, on every version: it compiles, does not spill, and keeps this occupancy, the
# lowest of the production grid (bench/results/static-*: at least 25 % everywhere on Triton 3.9; on 3.6 18.75 %
# at the 16 sm_90a split-K dx launches of M = 4 with fp32 adapters).
OCCUPANCY_FLOOR = 0.1875


def thresholds_of(rows: list) -> dict:
    """One version's section of the thresholds file for ``rows``: per ``"<arch> <key>"`` each field's value in
    ``rows``."""
    return {f"{r['arch']} {r['key']}": {f: r[f] for f in THRESHOLD_FIELDS} for r in rows if r["compiled"]}


def version_key(version: str) -> str:
    """The thresholds file's section name of a Triton version: ``"3.6.0"`` -> ``"3.6"``."""
    return "%d.%d" % version_tuple(version)


def compare(rows: list, thresholds: dict, version: str) -> tuple:
    """``(regressions, improvements)``: lists of messages, each row of Triton ``version`` against its entry in
    that version's section of ``thresholds`` (every field on the newest version of the file, else
    :data:`FLOOR_FIELDS`). A launch that does not compile, or spills, is a regression; one without an entry
    must also keep :data:`OCCUPANCY_FLOOR`."""
    section = version_key(version)
    entries = thresholds.get(section, {})
    newest = max(thresholds, key=version_tuple, default=None)
    fields = THRESHOLD_FIELDS if section == newest else {f: THRESHOLD_FIELDS[f] for f in FLOOR_FIELDS}
    worse, better = [], []
    for r in rows:
        name = f"{r['arch']} {r['key']}"
        if not r["compiled"]:
            worse.append(f"{name}: does not compile on Triton {version}: {r['error']}")
            continue
        limit = entries.get(name)
        if limit is None:
            if r["stack_bytes"] or r["spill_instructions"]:
                worse.append(f"{name}: spills {r['stack_bytes']} bytes on Triton {version}")
            if r["occupancy"] < OCCUPANCY_FLOOR:
                worse.append(f"{name}: occupancy {r['occupancy']} is under the floor {OCCUPANCY_FLOOR} on Triton "
                             f"{version}")
            continue
        for field, direction in fields.items():
            value, bound = r[field], limit[field]
            if direction == "mma":
                value, bound = MMA_RANK[value], MMA_RANK[bound]
            if (value > bound) if direction in ("max",) else (value < bound):
                worse.append(f"{name}: {field} {r[field]} is worse than the threshold {limit[field]} of Triton "
                             f"{section}")
            elif value != bound:
                better.append(f"{name}: {field} {r[field]} beats the threshold {limit[field]} of Triton {section} "
                              "(tighten it)")
    return worse, better


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="fastpeft check-kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", choices=tuple(ARCHES), default=list(ARCHES),
                        help="GPU architectures to compile for (default: all)")
    parser.add_argument("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="kernel families")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=list(DTYPES),
                        help="kernel dtypes; bf16+fp32 is a bf16 model with fp32 adapters, as PEFT makes them")
    parser.add_argument("--tokens", "-M", nargs="+", type=int, default=list(TOKENS), help="token counts M")
    parser.add_argument("--shape", nargs="+", default=[f"{o}x{i}" for o, i in SHAPES], help="OUTxIN weight shapes")
    parser.add_argument("--rank", nargs="+", type=int, default=list(RANKS), help="LoRA ranks")
    parser.add_argument("--main", action="store_true", help="only the CI gate's main launch of each family")
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--json", metavar="PATH", help="write every row as JSON")
    parser.add_argument("--md", metavar="PATH", help="write the table as Markdown")
    parser.add_argument("--check", action="store_true",
                        help=f"compare with this Triton version's section of {THRESHOLDS_PATH.name}: exit 1 on any "
                             "regression")
    parser.add_argument("--write-thresholds", action="store_true",
                        help=f"write these launches' numbers into this Triton version's section of "
                             f"{THRESHOLDS_PATH.name}")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no table on the terminal")
    return parser


def run_cli(args) -> int:
    """Run ``fastpeft check-kernels`` with parsed ``args``; the exit status."""
    # The check compiles for real GPUs: Triton must not be in interpreter mode (TRITON_INTERPRET=1 turns
    # every @triton.jit kernel into an interpreted function that cannot be compiled). Before triton is
    # imported the variable can still be dropped (for this process and the compile workers).
    if "triton" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET", None)
    elif os.environ.get("TRITON_INTERPRET") == "1":
        print("check-kernels compiles for real GPUs: run it in a process without TRITON_INTERPRET=1",
              file=sys.stderr)
        return 2
    import triton

    unsupported = unsupported_triton(triton.__version__)
    if unsupported:
        print(f"check-kernels: {unsupported}", file=sys.stderr)
        return 2
    if args.main:
        cases = main_cases(tuple(args.arch))
    else:
        shapes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in args.shape)
        cases = production_grid(tuple(args.arch), tuple(args.family), tuple(args.dtype), tuple(args.tokens), shapes,
                                tuple(args.rank))
    start = time.perf_counter()
    rows = run(cases, args.jobs, None if args.quiet else _progress_bar)
    elapsed = time.perf_counter() - start
    if not args.quiet:
        print(format_table(rows))
    failed = sum(not r["compiled"] for r in rows)
    print(f"Triton {triton.__version__}: {len(rows)} launches x arch, {len(rows) - failed} compiled, {failed} failed, "
          f"{elapsed:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(format_markdown(rows) + "\n")
    if args.write_thresholds:
        current = json.loads(THRESHOLDS_PATH.read_text()) if THRESHOLDS_PATH.exists() else {}
        section = current.setdefault(version_key(triton.__version__), {})
        section.update(thresholds_of(rows))
        current = {v: dict(sorted(current[v].items())) for v in sorted(current, key=version_tuple)}
        THRESHOLDS_PATH.write_text(json.dumps(current, indent=1) + "\n")
    status = 1 if failed else 0
    if args.check:
        worse, better = compare(rows, json.loads(THRESHOLDS_PATH.read_text()), triton.__version__)
        for line in better:
            print("better:", line, file=sys.stderr)
        for line in worse:
            print("REGRESSION:", line, file=sys.stderr)
        status = 1 if worse else status
    return status


def main(argv=None) -> int:
    return run_cli(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
