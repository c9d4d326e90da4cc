"""Backend choice for every op, in one place.

``auto`` (the default): CUDA tensors go to the Triton kernels, anything else to ``fastpeft.reference``.
``FASTPEFT_BACKEND=triton`` forces the kernels (on CPU tensors this needs ``TRITON_INTERPRET=1`` set
before triton is imported: Triton's interpreter then runs them, slowly, which is how CI tests them);
``FASTPEFT_BACKEND=reference`` forces the PyTorch reference. The variable is read at each call, so
tests can switch it with ``monkeypatch.setenv``.

Safe fallback (:func:`run_kernel`): when a Triton kernel fails to compile or launch on the user's GPU (an
architecture it was never compiled for, an old Triton), the op warns once, naming itself and the error, and
runs its PyTorch path instead of crashing. ``FASTPEFT_STRICT=1`` raises instead (the test suite sets it, so
a kernel failure in CI is never hidden behind the reference).

Triton's interpreter (Triton 3.4-3.9) computes bf16 dots and casts on bit patterns; the first op sent to the
Triton backend under the interpreter installs ``fastpeft.kernels.interpreter``'s correction, so bf16 runs
correctly there instead of returning silent garbage.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, TypeVar

import torch
from torch.torch_version import TorchVersion

from ..kernels.interpreter import triton_interpreter
from ..kernels.plan import KernelLaunchError

T = TypeVar("T")
_warned_ops: set = set()

BACKENDS = ("auto", "triton", "reference")

# The variable is read at every op call. ``os.environ.get`` of an unset name raises and catches a KeyError inside
# ``os.environ`` (1-2 µs: a tenth of an M = 1 layer call's Python); CPython's ``os.environ`` keeps its entries in
# ``_data`` (encoded keys and values), updated by its own setters, so a plain dict lookup there reads the same.
_ENVIRON, _BACKEND_KEY = ((os.environ._data, os.environ.encodekey("FASTPEFT_BACKEND")) if hasattr(os.environ, "_data")
                          else (os.environ, "FASTPEFT_BACKEND"))


def requested_backend() -> str:
    """The backend asked for by ``FASTPEFT_BACKEND`` (``auto`` when unset)."""
    raw = backend_setting()
    if raw is None:  # the common case, read at every op call
        return "auto"
    name = (os.fsdecode(raw) if isinstance(raw, bytes) else raw).strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTPEFT_BACKEND={name!r} is not one of {BACKENDS}")
    return name


# ``backend_setting()``: ``FASTPEFT_BACKEND`` as set, unparsed (None when unset), what a cache of per-call decisions
# keys on: one dict lookup, called without a Python frame (a frame costs about 1 % of an M = 1 layer call on CPU).
# torch.compile traces that partial of a builtin method from torch 2.13 on; before, dynamo refuses it (a graph
# break, an error under fullgraph=True), so there it is a plain function.
if TorchVersion(torch.__version__) >= (2, 13):
    backend_setting = functools.partial(_ENVIRON.get, _BACKEND_KEY)
else:
    def backend_setting():
        return _ENVIRON.get(_BACKEND_KEY)


def backend_for(device: torch.device) -> str:
    """``"triton"`` or ``"reference"``: which implementation runs an op whose tensors are on ``device``."""
    name = requested_backend()
    if name == "reference":
        return "reference"
    device = device if isinstance(device, torch.device) else torch.device(device)
    if name == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if device.type != "cuda" and not triton_interpreter():
        raise RuntimeError(
            f"FASTPEFT_BACKEND=triton on a {device.type} tensor needs TRITON_INTERPRET=1 set before triton is "
            "imported (Triton's CPU interpreter); or use FASTPEFT_BACKEND=reference"
        )
    if device.type != "cuda":
        from ..kernels.interpreter import install_bf16_interpreter_fix

        install_bf16_interpreter_fix()
    return "triton"


def strict() -> bool:
    """True when ``FASTPEFT_STRICT=1``: a failing Triton kernel raises instead of falling back."""
    return os.environ.get("FASTPEFT_STRICT", "0").strip() == "1"


def run_kernel(op: str, kernel: Callable[[], T], fallback: Callable[[], T]) -> T:
    """``kernel()``; if its Triton launch fails (:class:`~fastpeft.kernels.plan.KernelLaunchError`), warn
    once for ``op`` and return ``fallback()`` (the op's PyTorch path), unless :func:`strict` or the kernel
    had already written part of an in-place output. Validation errors (``ValueError`` / ``TypeError``)
    pass through untouched."""
    try:
        return kernel()
    except KernelLaunchError as exc:
        if strict() or exc.output_touched:
            raise
        if op not in _warned_ops:
            _warned_ops.add(op)
            warnings.warn(f"fastpeft: {exc}; running the PyTorch path of {op} instead (warned once per op; "
                          "FASTPEFT_STRICT=1 raises)", RuntimeWarning, stacklevel=3)
        return fallback()
