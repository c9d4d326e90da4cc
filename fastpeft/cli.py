"""The ``fastpeft`` command: ``fastpeft info`` (versions, device, backend, CUDA extension, NF4 dispatch
thresholds) and
``fastpeft bench`` (the benchmark harness, :mod:`fastpeft.bench`)."""

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
    ], backend_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastpeft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, device, backend and whether the CUDA extension is built")
    from .bench.__main__ import build_parser as bench_parser, exit_status, run as run_bench

    bench_parser(sub.add_parser("bench", help="benchmark fastpeft against the references, PEFT and bitsandbytes",
                                description="Micro and end-to-end benchmarks; see `python -m fastpeft.bench -h`."))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command == "info":
        lines, backend_ok = info_lines()
        print("\n".join(lines))
        return 0 if backend_ok else 1
    elif args.command == "bench":
        return exit_status(run_bench(args, argv[argv.index("bench") + 1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
