"""Plan, then launch: what a Triton launch will run, as data, before it runs.

Every launcher in ``fastpeft.kernels`` first calls its ``plan_<op>(...)`` (next to its kernel): a pure
function of shapes, flags and the GPU architecture that returns a :class:`LaunchPlan` (which kernel, grid,
constexprs, warps, stages, compiler options, or a library path instead of a Triton kernel). It then
validates tensors, builds the argument list and calls :func:`launch`. Tests, ``fastpeft info`` and the
static compile check (``fastpeft.check_kernels``) read the same plan functions, so what is checked is
what runs.

Architecture: ``arch`` is a CUDA compute capability ``(major, minor)`` such as ``(8, 0)``, ``(8, 9)``,
``(9, 0)``, or ``None`` (no GPU: Triton's interpreter, or planning without a device). Block-size tables
are dicts next to their kernel keyed by ``arch`` with a ``"default"`` entry (:func:`config_for`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional

import torch

PATHS = ("triton", "torch")


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class LaunchPlan:
    """One launch, decided before it happens.

    ``op``: the launcher's name (``"nf4_lora_matmul"``); ``variant``: which of its regimes (``"gemm"``,
    ``"gemv"``, ``"shrink"``...). ``path``: ``"triton"`` (``kernel`` runs on ``grid``) or ``"torch"`` (a
    PyTorch / cuBLAS path, no kernel). ``constexprs``: the kernel's ``tl.constexpr`` arguments;
    ``num_warps`` / ``num_stages`` and ``options`` (other Triton compile options, e.g.
    ``enable_fp_fusion``) are passed to the launch as keywords. ``runtime``: planned values the launcher
    passes as ordinary (non-constexpr) arguments or uses itself (e.g. the split-K slice length).
    """

    op: str
    variant: str
    path: str = "triton"
    kernel: Any = None
    grid: tuple = ()
    constexprs: Mapping[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    options: Mapping[str, Any] = field(default_factory=dict)
    runtime: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        if self.path == "triton" and (self.kernel is None or not self.grid):
            raise ValueError(f"a Triton plan needs a kernel and a grid, got {self.kernel!r} on {self.grid!r}")
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        for name in ("constexprs", "options", "runtime"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    @property
    def kernel_name(self) -> str:
        """The kernel's Python name (``"-"`` for a library path)."""
        if self.kernel is None:
            return "-"
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", repr(fn))

    def describe(self) -> str:
        """One line: op, variant, kernel, grid, constexprs, warps, stages, options."""
        if self.path != "triton":
            return f"{self.op}/{self.variant}: {self.path} path"
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs.items())
        opts = "".join(f" {k}={v}" for k, v in self.options.items())
        return (f"{self.op}/{self.variant}: {self.kernel_name} grid={self.grid} {consts} "
                f"num_warps={self.num_warps} num_stages={self.num_stages}{opts}")


def config_for(table: Mapping, arch: Optional[tuple]) -> Mapping:
    """The entry of a per-architecture block-size ``table`` for ``arch``: ``table[arch]`` when present,
    else ``table["default"]``."""
    return table.get(arch, table["default"]) if arch is not None else table["default"]


def device_arch(device: torch.device) -> Optional[tuple]:
    """``(major, minor)`` of a CUDA ``device``; ``None`` for any other device (the interpreter). A meta
    device inside ``recording(arch)`` stands for a GPU of that ``arch``."""
    device = torch.device(device)
    if device.type == "meta" and _recorder is not None:
        return _recording_arch
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


class KernelLaunchError(RuntimeError):
    """A Triton kernel failed to compile or launch (an architecture it was never compiled for, an old
    Triton, a driver error). ``op`` names the launcher; the original exception is ``__cause__``.
    ``output_touched``: an in-place op had already written part of its output when it failed, so running
    another implementation on the same output would apply the update twice."""

    def __init__(self, plan: LaunchPlan, error: BaseException, output_touched: bool = False):
        self.op, self.plan, self.error, self.output_touched = plan.op, plan, error, output_touched
        super().__init__(f"the Triton kernel of {plan.op} ({plan.variant}) failed: {type(error).__name__}: {error}")


# The static check swaps launching for recording (``recording()``): a list while active, else None, and
# the architecture that meta tensors stand for meanwhile.
_recorder: Optional[list] = None
_recording_arch: Optional[tuple] = None


@contextlib.contextmanager
def recording(arch: Optional[tuple] = None):
    """Within this block :func:`launch` records ``(plan, args)`` instead of launching, and meta tensors
    plan as on a GPU of ``arch``: how ``fastpeft.check_kernels`` gets the exact plans and arguments a
    launcher would use on that GPU (with meta tensors)."""
    global _recorder, _recording_arch
    outer = _recorder, _recording_arch
    _recorder, _recording_arch = [], arch
    try:
        yield _recorder
    finally:
        _recorder, _recording_arch = outer


# Lists that ``observing()`` blocks collect launched plans in (launching goes on); process-wide, like the recorder.
_observers: list = []


@contextlib.contextmanager
def observing():
    """Within this block :func:`launch` still launches, and appends each plan it launches (before the launch,
    so a failing one is listed too) to the list this yields: how a GPU run asserts which kernels and variants
    an op really ran. Process-wide: launches from other threads meanwhile are listed as well."""
    plans: list = []
    _observers.append(plans)
    try:
        yield plans
    finally:
        _observers.remove(plans)


def launch(plan: LaunchPlan, *args) -> None:
    """Run a Triton ``plan`` with the kernel's non-constexpr ``args`` (in the kernel's order). Any failure
    of the compile or the launch is raised as :class:`KernelLaunchError` (``fastpeft.ops.dispatch`` then
    falls back to the op's PyTorch path)."""
    if plan.path != "triton":
        raise ValueError(f"{plan.op}/{plan.variant} is planned on the {plan.path} path, not a Triton kernel")
    if _recorder is not None:
        _recorder.append((plan, args))
        return
    for plans in _observers:
        plans.append(plan)
    try:
        _start(plan, args)
    except Exception as exc:  # compile (Triton, ptxas), resource and driver errors alike
        raise KernelLaunchError(plan, exc) from exc


def _start(plan: LaunchPlan, args: tuple) -> None:
    """Compile (on first use) and start ``plan``'s kernel: the one place fastpeft hands a launch to Triton, so a
    test can make a launch fail here on every Triton version (the interpreter of Triton <= 3.5 does not go
    through ``JITFunction.run``)."""
    plan.kernel[plan.grid](*args, **plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages,
                           **plan.options)
