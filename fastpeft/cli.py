"""The ``fastpeft`` command and its sub-commands ``info``, ``bench``, ``check-kernels`` and ``tune``."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import textwrap


def _version(module: str) -> str:
    from ._bitsandbytes import import_bitsandbytes

    try:
        imported = import_bitsandbytes() if module == "bitsandbytes" else importlib.import_module(module)
        return getattr(imported, "__version__", "unknown")
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


DESCRIPTION = """\
fastpeft: fused Triton kernels for LoRA, QLoRA (NF4), DoRA, IA3 and multi-LoRA serving, as drop-in PyTorch \
modules.

Run "fastpeft COMMAND --help" for a command's options."""


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped to the terminal paragraph by paragraph, a paragraph with indented lines (a list) kept
    as written; each option's default appended to its help unless the help names it already or the option is a
    flag ("none" for an option that is off unless given)."""

    def _fill_text(self, text, width, indent):
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if any(line.startswith("  ") for line in paragraph.splitlines()):
                paragraphs.append("\n".join(indent + line for line in paragraph.splitlines()))
            else:
                paragraphs.append(textwrap.fill(" ".join(paragraph.split()), width, initial_indent=indent,
                                                subsequent_indent=indent))
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or not action.option_strings or default is argparse.SUPPRESS or action.nargs == 0:
            return text
        if default is None:
            default = "none"
        elif isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"


def build_parser() -> argparse.ArgumentParser:
    """The ``fastpeft`` parser with its four sub-commands."""
    from . import __version__
    from .bench.__main__ import DESCRIPTION as BENCH_DESCRIPTION, build_parser as bench_parser
    from .check_kernels import build_parser as check_parser

    parser = argparse.ArgumentParser(prog="fastpeft", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastpeft {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    sub.add_parser("info", help="versions, device, backend and sample launch plans on this machine",
                   description="Prints the versions of fastpeft and its dependencies, the device, the backend the "
                               "ops use on it, whether the CUDA extension is built, the NF4 dispatch thresholds "
                               "and the launch plans of a QLoRA layer. Exit status 1 when FASTPEFT_BACKEND names "
                               "a backend that cannot run here.", formatter_class=HelpFormatter)
    bench_parser(sub.add_parser("bench", help="time fastpeft against PEFT, bitsandbytes and the PyTorch reference",
                                description=BENCH_DESCRIPTION, formatter_class=HelpFormatter))
    check_parser(sub.add_parser(
        "check-kernels", help="compile every production kernel launch for sm_80 / sm_89 / sm_90a and report "
        "registers, spills, occupancy, tensor-core use and loads (no GPU needed)",
        description="Compiles every launch the kernel launchers plan for a production grid (token counts, weight "
                    "shapes, ranks, dtypes, every kernel family) for real GPU architectures, on this CPU, and reads "
                    "the compiled code: registers, spills, shared memory, occupancy, tensor-core instructions and "
                    "global loads by width. These are compiler facts, not timings. --main is the subset CI checks; "
                    "--check compares it with the thresholds shipped in the package (exit status 1 on a "
                    "regression).", formatter_class=HelpFormatter))
    tune = sub.add_parser("tune", help="measure the NF4 kernel crossovers on this GPU (CUDA only)",
                          description="Times the three NF4 product variants (GEMV, split-K GEMM, dequantise + "
                                      "cuBLAS) over the static-check shapes and writes a per-GPU JSON that the NF4 "
                                      "dispatch then prefers over the shipped table.", formatter_class=HelpFormatter)
    tune.add_argument("--out", type=str, default=None,
                      help="file to write (default: $FASTPEFT_TUNE_DIR/sm_XY.json, else ~/.cache/fastpeft/sm_XY.json)")
    tune.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16", help="activation dtype timed")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "info":
        lines, backend_ok = info_lines()
        print("\n".join(lines))
        return 0 if backend_ok else 1
    if args.command == "tune":
        import torch

        if not torch.cuda.is_available():
            print("fastpeft tune needs a CUDA GPU (it measures kernels); none is available", file=sys.stderr)
            return 2
        from .bench.timing import call_timer
        from .kernels.tune_file import tune_path
        from .kernels.tuning import tune as run_tune

        # the benchmark harness's timer: CUDA events around each call, L2 flushed before it, median of 10
        content = run_tune(call_timer(torch.device("cuda")), dtype=getattr(torch, args.dtype), path=args.out, progress=print)
        print(f"wrote {args.out or tune_path(tuple(content['arch']))}: tiers {content['tiers']}")
        return 0
    if args.command == "bench":
        from .bench.__main__ import exit_status, run as run_bench

        return exit_status(run_bench(args, argv[argv.index("bench") + 1:]))
    from .check_kernels import run_cli as run_check

    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
