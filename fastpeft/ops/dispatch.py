"""Backend choice for every op, in one place.

``auto`` (the default): CUDA tensors go to the Triton kernels, anything else to ``fastpeft.reference``.
``FASTPEFT_BACKEND=triton`` forces the kernels (on CPU tensors this needs ``TRITON_INTERPRET=1`` set
before triton is imported: Triton's interpreter then runs them, slowly, which is how CI tests them);
``FASTPEFT_BACKEND=reference`` forces the PyTorch reference. The variable is read at each call, so
tests can switch it with ``monkeypatch.setenv``.

Triton's interpreter (triton 3.9) computes bf16 dots and casts on bit patterns; the first op sent to the
Triton backend under the interpreter installs ``fastpeft.kernels.interpreter``'s correction, so bf16 runs
correctly there instead of returning silent garbage.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "reference")


def requested_backend() -> str:
    """The backend asked for by ``FASTPEFT_BACKEND`` (``auto`` when unset)."""
    name = os.environ.get("FASTPEFT_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTPEFT_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def triton_interpreter() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_for(device: torch.device) -> str:
    """``"triton"`` or ``"reference"``: which implementation runs an op whose tensors are on ``device``."""
    name = requested_backend()
    device = torch.device(device)
    if name == "reference":
        return "reference"
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
