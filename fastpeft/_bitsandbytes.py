"""``import bitsandbytes`` without its warning about an optional CPU kernel from the Hugging Face Hub.

bitsandbytes 0.50, imported on a CPU with AVX512-BF16, tries to fetch a fused 4-bit CPU kernel from the Hub
(``kernels-community/quantization-bitsandbytes``, through the ``kernels`` package) and logs a warning when it
cannot: no network, a publisher it cannot verify, or ``kernels`` not installed. It then runs its built-in CPU
code, which is what fastpeft reads and compares against. Where fastpeft's commands import bitsandbytes they
drop that one log record; the import and everything bitsandbytes sets up are unchanged.
"""

from __future__ import annotations

import importlib
import logging
import sys

_LOGGER = "bitsandbytes.backends.cpu.ops"
_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _HubKernelWarning(logging.Filter):
    """Drops bitsandbytes' record about the Hub kernel; lets every other record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_MESSAGE)


def import_bitsandbytes():
    """The ``bitsandbytes`` module, imported without the Hub-kernel warning (it is logged only at the first
    import, so a module already imported is returned as it is). Raises ImportError as ``import`` does."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    logger, drop = logging.getLogger(_LOGGER), _HubKernelWarning()
    logger.addFilter(drop)
    try:
        return importlib.import_module("bitsandbytes")
    finally:
        logger.removeFilter(drop)
