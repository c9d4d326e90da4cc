"""The ``fastpeft`` command: ``fastpeft info`` (versions, device, backend, CUDA extension, NF4 dispatch
thresholds, sample launch plans), ``fastpeft tune`` (NF4 crossovers measured on this GPU), ``fastpeft bench``
(the benchmark harness, :mod:`fastpeft.bench`) and ``fastpeft check-kernels`` (every production launch compiled
for sm_80 / sm_89 / sm_90a and read in SASS, no GPU needed: :mod:`fastpeft.check_kernels`)."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as exc:  # an optional dependency that is absent or broken is reported, not fatal
        return f"not available ({type(exc).__name__})"


def cuda_extension_built() -> bool:
    """Whether the optional CUDA extension ``fastpeft._C`` was compiled and imports."""
    try:
        importlib.import_module("fastpeft._C")
        return True
    except ImportError:
        return False


def backend_line(device) -> tuple[str, bool]:
    """The ``FASTPEFT_BACKEND`` line of ``fastpeft info`` and whether the setting works on ``device``: a
    misspelt backend, or the Triton kernels forced on a CPU without the interpreter, is reported here
    rather than raised, since ``info`` is what people run to find out why fastpeft fails."""
    from fastpeft.ops.dispatch import backend_for, requested_backend

    try:
        return f"FASTPEFT_BACKEND={requested_backend()} -> ops on {device.type} use: {backend_for(device)}", True
    except (ValueError, RuntimeError) as exc:
        return f"FASTPEFT_BACKEND problem: {exc}", False


def info_lines() -> tuple[list[str], bool]:
    """What ``fastpeft info`` prints, a line each, and whether the backend setting works here."""
    import torch

    import fastpeft
    from fastpeft.kernels.nf4_dispatch import describe as nf4_dispatch_lines
    from fastpeft.kernels.plan import device_arch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backend, backend_ok = backend_line(device)
    return [
        f"fastpeft {fastpeft.__version__}",
        f"python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        *(f"{name} {_version(name)}" for name in ("triton", "transformers", "bitsandbytes", "peft")),
        f"device: {torch.cuda.get_device_name() if cuda else 'cpu (no CUDA device)'}",
        backend,
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}",
        f"CUDA extension (fastpeft._C): {'built' if cuda_extension_built() else 'not built'}",
        *nf4_dispatch_lines(device_arch(device)),
        *plan_lines(device),
    ], backend_ok


def plan_lines(device) -> list[str]:
    """The launch plans of a QLoRA layer (4096x4096, r=16) on ``device``'s architecture at decode and
    prefill sizes: what the kernels would run (``fastpeft.kernels.plan``)."""
    from fastpeft.kernels.nf4_matmul import plan_nf4_lora_matmul
    from fastpeft.kernels.plan import device_arch

    arch = device_arch(device)
    where = f"sm_{arch[0]}{arch[1]}" if arch else "no GPU: the default table"
    return [f"plan, QLoRA forward M={m} 4096x4096 r=16 ({where}): "
            f"{plan_nf4_lora_matmul(m, 4096, 4096, 16, nested=True, arch=arch).describe()}" for m in (1, 512)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastpeft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, device, backend, whether the CUDA extension is built and a "
                   "sample launch plan")
    from .bench.__main__ import build_parser as bench_parser, exit_status, run as run_bench

    tune = sub.add_parser("tune", help="measure the NF4 GEMV / split-K / cuBLAS crossovers on this GPU (CUDA only)",
                          description="Times the three NF4 product variants over the static-check shapes and "
                                      "writes a per-GPU JSON that the NF4 dispatch prefers over the shipped table.")
    tune.add_argument("--out", type=str, default=None, help="file to write (default: $FASTPEFT_TUNE_DIR/sm_XY.json)")
    tune.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    bench_parser(sub.add_parser("bench", help="benchmark fastpeft against the references, PEFT and bitsandbytes",
                                description="Micro and end-to-end benchmarks; see `python -m fastpeft.bench -h`."))
    from .check_kernels import build_parser as check_parser, run_cli as run_check

    check_parser(sub.add_parser("check-kernels", help="compile every production launch for sm_80/89/90a and "
                                "report registers, spills, occupancy, MMA and loads (no GPU needed)",
                                description="See `python -m fastpeft.check_kernels -h`."))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command == "info":
        lines, backend_ok = info_lines()
        print("\n".join(lines))
        return 0 if backend_ok else 1
    elif args.command == "tune":
        import torch

        from .kernels.tuning import tune as run_tune, tune_path

        if not torch.cuda.is_available():
            print("fastpeft tune needs a CUDA GPU (it measures kernels); none is available", file=sys.stderr)
            return 2
        content = run_tune(dtype=getattr(torch, args.dtype), path=args.out, progress=print)
        print(f"wrote {args.out or tune_path(tuple(content['arch']))}: tiers {content['tiers']}")
    elif args.command == "bench":
        return exit_status(run_bench(args, argv[argv.index("bench") + 1:]))
    elif args.command == "check-kernels":
        return run_check(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
