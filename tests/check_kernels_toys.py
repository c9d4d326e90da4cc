"""Toy kernels for the tests of ``fastpeft.check_kernels``, and the script the CI gate runs.

``python tests/check_kernels_toys.py OUT.json`` (in a process without ``TRITON_INTERPRET``) compiles the
checker's main launches (``MAIN_KEYS``) and the toys below for sm_80 and sm_90a and writes every row as
JSON; ``tests/test_check_kernels.py`` runs it once and reads the rows.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton
import triton.language as tl

from fastpeft.kernels.plan import LaunchPlan

GATE_ARCHES = ("sm_80", "sm_90a")


@triton.jit
def _toy_spill_kernel(a_ptr, b_ptr, out_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # a 64 x 256 fp32 accumulator on one warp: 512 values per thread, twice the 255-register limit
    offs_m, offs_n, offs_k = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + offs_m[:, None] * K + (k + offs_k)[None, :])
        b = tl.load(b_ptr + (k + offs_k)[:, None] * BLOCK_N + offs_n[None, :])
        acc += tl.dot(a, b)
    tl.store(out_ptr + offs_m[:, None] * BLOCK_N + offs_n[None, :], acc)


@triton.jit
def _toy_bf16_dot_kernel(a_ptr, b_ptr, out_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n, offs_k = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + offs_m[:, None] * K + (k + offs_k)[None, :])
        b = tl.load(b_ptr + (k + offs_k)[:, None] * BLOCK_N + offs_n[None, :])
        acc += tl.dot(a, b)
    tl.store(out_ptr + offs_m[:, None] * BLOCK_N + offs_n[None, :], acc.to(tl.bfloat16))


@triton.jit
def _toy_malformed_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)  # BLOCK = 3: arange needs a power of two
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def toy_cases() -> list:
    """The three toys as ``fastpeft.check_kernels.Case`` rows (family ``toy``, step = the toy's name)."""
    from fastpeft.check_kernels import Case

    def case(name, kernel, args, num_warps, weight_tile, **constexprs):
        plan = LaunchPlan(op="toy", variant=name, kernel=kernel, grid=(1,), constexprs=constexprs,
                          num_warps=num_warps, runtime={"weight_tile": weight_tile})
        return [Case(arch, "toy", name, "bf16", 0, (0, 0), 0, "dense", plan, args) for arch in GATE_ARCHES]

    f16, bf16 = torch.float16, torch.bfloat16
    return [
        *case("spill", _toy_spill_kernel, (_meta(64, 256, dtype=f16), _meta(256, 256, dtype=f16),
                                          _meta(64, 256, dtype=torch.float32), 256),
             1, 32 * 256, BLOCK_M=64, BLOCK_N=256, BLOCK_K=32),
        *case("bf16-dot", _toy_bf16_dot_kernel, (_meta(128, 512, dtype=bf16), _meta(512, 128, dtype=bf16),
                                                _meta(128, 128, dtype=bf16), 512),
             4, 32 * 128, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32),
        *case("malformed", _toy_malformed_kernel, (_meta(16, dtype=torch.float32),), 4, 3, BLOCK=3),
    ]


def unspecialised_gemm() -> dict:
    """The main NF4 GEMM (``MAIN_KEYS[0]``) for sm_90a compiled *without* the JIT's specialisation (no
    divisibility attributes, integers equal to 1 left as i32 arguments): the control that shows the
    specialisation matters."""
    import dataclasses

    from fastpeft import check_kernels

    case = check_kernels.main_cases(("sm_90a",))[0]
    job = check_kernels.Job.of(case.plan, case.args, "sm_90a")
    declared = {p.name for p in case.plan.kernel.params if p.is_constexpr}
    names = [name for name, _ in job.signature]
    signature = tuple((name, "i32" if kind == "constexpr" and name not in declared else kind)
                      for name, kind in job.signature)
    constexprs = tuple((path, value) for path, value in job.constexprs if names[path[0]] in declared)
    return check_kernels.compile_job(dataclasses.replace(job, signature=signature, constexprs=constexprs, attrs=()))


def pack_args_differences():
    """Gate launches whose specialisation by ``check_kernels._pack_args_34`` (Triton 3.4's steps, used where
    ``JITFunction._pack_args`` is missing) differs from ``_pack_args``'s; None on a Triton without ``_pack_args``.
    Empty attribute lists (no attribute at that argument, which ``_pack_args`` also writes for constexprs)
    count as absent."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from fastpeft import check_kernels

    cases = check_kernels.main_cases(GATE_ARCHES)
    if not hasattr(cases[0].plan.kernel, "_pack_args"):
        return None
    differences = []
    for case in cases:
        fn = case.plan.kernel
        backend = make_backend(GPUTarget("cuda", check_kernels.ARCHES[case.arch]["cc"], 32))
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        kwargs = dict(case.plan.constexprs, num_warps=case.plan.num_warps, num_stages=case.plan.num_stages,
                      **case.plan.options)
        bound, specialization, options = binder(*case.args, **kwargs)
        packed = fn._pack_args(backend, kwargs, bound, specialization, options)
        ours = check_kernels._pack_args_34(fn, backend, kwargs, bound, specialization)
        same = (packed[0].__dict__ == ours[0].__dict__ and packed[1:3] == ours[1:3]
                and {k: v for k, v in packed[3].items() if v} == {k: v for k, v in ours[3].items() if v})
        if not same:
            differences.append(f"{case.arch} {case.key}")
    return differences


if __name__ == "__main__":
    from fastpeft import check_kernels

    os.environ.pop("TRITON_INTERPRET", None)
    rows = check_kernels.run(check_kernels.main_cases(GATE_ARCHES) + toy_cases(), jobs=2)
    with open(sys.argv[1], "w") as f:
        json.dump({"rows": rows, "unspecialised_gemm": unspecialised_gemm(),
                   "pack_args_differences": pack_args_differences()}, f)
