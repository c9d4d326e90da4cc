"""The Triton versions fastpeft's kernels support, and what each of them needs around it.

Every kernel compiles and passes its interpreter tests on Triton 3.4 through 3.9 (CI runs the oldest, 3.6
and the newest). Below 3.4 the static check cannot specialise as the JIT does, and below 3.3 there is no
``tl.gather``, which the NF4 decode uses.

Triton's interpreter up to 3.6 converts 1-element numpy arrays with ``int()``, which numpy 2.4 refuses, so
under ``TRITON_INTERPRET=1`` those versions need numpy < 2.4. A package marker cannot say "numpy < 2.4 when
triton <= 3.6", so the constraint is checked here, where the interpreter is first used, with a one-line
error saying what to install.
"""

from __future__ import annotations

import re

SUPPORTED_TRITON = ((3, 4), (3, 9))  # (major, minor), oldest and newest, both included
INTERPRETER_NUMPY = ((3, 6), (2, 4))  # Triton <= 3.6's interpreter needs numpy < 2.4


def version_tuple(version: str) -> tuple:
    """``(major, minor)`` of a version string such as ``"3.6.0"`` or ``"3.4.0+git1a2b3c"``."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise ValueError(f"not a version: {version!r}")
    return int(found.group(1)), int(found.group(2))


def triton_version() -> tuple:
    """``(major, minor)`` of the installed Triton."""
    import triton

    return version_tuple(triton.__version__)


def supported_range() -> str:
    """The supported Triton versions as text, ``"3.4-3.9"``."""
    (low_major, low_minor), (high_major, high_minor) = SUPPORTED_TRITON
    return f"{low_major}.{low_minor}-{high_major}.{high_minor}"


def unsupported_triton(version: str) -> str | None:
    """Why Triton ``version`` is outside :data:`SUPPORTED_TRITON`, or None when it is inside."""
    if SUPPORTED_TRITON[0] <= version_tuple(version) <= SUPPORTED_TRITON[1]:
        return None
    return f"fastpeft supports Triton {supported_range()}; this is Triton {version}"


def interpreter_numpy_error(triton: str, numpy: str) -> str | None:
    """Why Triton ``triton``'s interpreter cannot run with numpy ``numpy``, or None when it can."""
    (last_triton, first_numpy) = INTERPRETER_NUMPY
    if version_tuple(triton) <= last_triton and version_tuple(numpy) >= first_numpy:
        return (f"Triton {triton}'s interpreter (TRITON_INTERPRET=1) needs numpy < {first_numpy[0]}.{first_numpy[1]}, "
                f"numpy {numpy} is installed: pip install 'numpy<{first_numpy[0]}.{first_numpy[1]}'")
    return None
