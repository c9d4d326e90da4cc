"""Backend choice for every device primitive, in one place.

fastpeft's device primitives (``fused_linear``, ``nf4_dequantize``, ``multi_lora_add_``) are ``torch.library`` ops
declared by :func:`register_primitive`: one schema, one fake (meta) implementation, and one kernel registered for
the ``cpu`` and the ``cuda`` device that runs the primitive's Triton launcher or its ``fastpeft.reference``
function, as :func:`backend_for` decides:

``auto`` (the default): CUDA tensors go to the Triton launchers, anything else to ``fastpeft.reference``.
``FASTPEFT_BACKEND=triton`` forces the launchers (on CPU tensors this needs ``TRITON_INTERPRET=1`` set before triton
is imported: Triton's interpreter then runs them, slowly, which is how CI tests them); ``FASTPEFT_BACKEND=reference``
forces the reference, CUDA tensors included. The variable is read at each call, so tests can switch it with
``monkeypatch.setenv``.

Safe fallback (:func:`run_kernel`): when a Triton kernel fails to compile or launch on the user's GPU (an
architecture it was never compiled for, an old Triton), the primitive warns once, naming itself and the error, and
runs its reference instead of crashing. ``FASTPEFT_STRICT=1`` raises instead (the test suite sets it, so a kernel
failure in CI is never hidden behind the reference).

Eager calls that run the reference (:func:`eager_reference`: the reference backend, or arguments whose CUDA kernel
is the reference's own torch ops) call the reference function directly: the dispatcher's per-call cost (and
rebuilding an ``NF4Weight`` from its flat op arguments) is more than a small layer's math at M = 1 on CPU, and than
a decode step's small cuBLAS product on a GPU. Under ``torch.compile`` the ``torch.ops`` op is always called: it is what dynamo traces.

Triton's interpreter (Triton 3.4-3.9) computes bf16 dots and casts on bit patterns; the first primitive sent to the
Triton backend under the interpreter installs ``fastpeft.kernels.interpreter``'s correction, so bf16 runs correctly
there instead of returning silent garbage.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, TypeVar

import torch

from ..kernels.interpreter import triton_interpreter
from ..kernels.plan import KernelLaunchError

T = TypeVar("T")
_warned_ops: set = set()

BACKENDS = ("auto", "triton", "reference")
_BACKEND_VARIABLE = "FASTPEFT_BACKEND"
_CPU = torch.device("cpu")
# (FASTPEFT_BACKEND as last read, its parsed name), replaced as one tuple (a thread reads either pair whole): parsing
# runs only when the variable changes. Reading it costs one ``os.environ.get`` per call (about 1.2 µs when unset,
# where ``os.environ`` raises and catches a KeyError inside; 0.4 µs when set; CPython 3.11, CPU).
_backend_read: tuple = (None, "auto")


def requested_backend() -> str:
    """The backend asked for by ``FASTPEFT_BACKEND`` (``auto`` when unset); ValueError for another name."""
    global _backend_read
    raw = os.environ.get(_BACKEND_VARIABLE)
    read = _backend_read
    if raw == read[0]:
        return read[1]
    name = "auto" if raw is None else raw.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTPEFT_BACKEND={name!r} is not one of {BACKENDS}")
    _backend_read = (raw, name)
    return name




def backend_for(device: torch.device) -> str:
    """``"triton"`` or ``"reference"``: which implementation runs a primitive whose tensors are on ``device``."""
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


def eager_reference(device: torch.device, torch_route: bool = False) -> bool:
    """True when dynamo is not tracing and a primitive on ``device`` runs its reference: on the reference backend, or
    with ``torch_route`` (the primitive's device kernel would run the reference's own torch ops for these arguments,
    as ``fused_linear``'s cuBLAS path does). The caller then calls the reference function itself instead of the
    ``torch.ops`` op (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    if torch_route:
        return True
    name = requested_backend()  # backend_for's answer, without its frame in the common cases (a call at M = 1 on CPU)
    if name == "auto":
        return device == _CPU or device.type != "cuda"  # the comparison first: reading device.type costs 5x more
    return name == "reference" or backend_for(device) == "reference"


def strict() -> bool:
    """True when ``FASTPEFT_STRICT=1``: a failing Triton kernel raises instead of falling back."""
    return os.environ.get("FASTPEFT_STRICT", "0").strip() == "1"


def run_kernel(op: str, kernel: Callable[[], T], fallback: Callable[[], T]) -> T:
    """``kernel()``; if its Triton launch fails (:class:`~fastpeft.kernels.plan.KernelLaunchError`), warn
    once for ``op`` and return ``fallback()`` (the op's reference), unless :func:`strict` or the kernel
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


_LIBRARY = torch.library.Library("fastpeft", "FRAGMENT")


def register_primitive(name: str, schema: str, fake: Callable, triton_launcher: Callable, reference_fn: Callable,
                       from_op_args: Callable[..., tuple], to_op_result: Optional[Callable[[T, tuple], T]] = None):
    """Declare the op ``fastpeft::<name>`` (``schema``: its arguments and results, ``"(Tensor a, ...) -> Tensor"``)
    with ``fake`` as its meta implementation, and one kernel for the ``cpu`` and ``cuda`` devices: it turns the op's
    arguments into the primitive's (``from_op_args``: an ``NF4Weight`` from its flat tensors, ...), runs
    ``triton_launcher`` or ``reference_fn`` on them (:func:`backend_for` of the first argument's device; a failed
    launch falls back to the reference, :func:`run_kernel`) and turns the result into the op's (``to_op_result(result,
    args)``: tensors in place of None; default: as it is). Returns the op's overload
    (``torch.ops.fastpeft.<name>.default``)."""
    _LIBRARY.define(name + schema)
    convert = to_op_result or (lambda result, args: result)

    def kernel(*op_args):
        args = from_op_args(*op_args)
        device = next(t.device for t in op_args if isinstance(t, torch.Tensor))
        if backend_for(device) == "triton":
            result = run_kernel(name, lambda: triton_launcher(*args), lambda: reference_fn(*args))
        else:
            result = reference_fn(*args)
        return convert(result, args)

    qualname = f"fastpeft::{name}"
    torch.library.register_kernel(qualname, ("cpu", "cuda"), kernel, lib=_LIBRARY)
    torch.library.register_fake(qualname, fake, lib=_LIBRARY)
    return getattr(torch.ops.fastpeft, name).default
