"""The per-GPU NF4 crossover file that ``fastpeft tune`` writes and the NF4 dispatch reads.

File: ``$FASTPEFT_TUNE_DIR/sm_<major><minor>.json`` (default ``~/.cache/fastpeft``)::

    {"format": 1, "gpu": "NVIDIA H100 80GB HBM3", "arch": [9, 0], "sms": 132, "dtype": "bfloat16",
     "tiers": [[waves, gemv_max_m, triton_max_m], ...],          # descending waves, first match wins
     "measurements": [{"n": 4096, "k": 4096, "m": 1, "gemv": ms, "splitk": ms, "cublas": ms}, ...]}

A missing file means the shipped table (``fastpeft.kernels.nf4_dispatch.THRESHOLDS``); an unreadable or
malformed one a warning, once, and the shipped table, never an error at a launch. The writer is
``fastpeft.kernels.tuning``, the reader ``fastpeft.kernels.nf4_dispatch``: both import this module and
neither imports the other's side.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional

FORMAT = 1
# parsed tiers per file path (None: no usable file), read once per process; ``write`` clears it
_loaded: dict = {}


def tune_dir() -> Path:
    return Path(os.environ.get("FASTPEFT_TUNE_DIR") or Path.home() / ".cache" / "fastpeft")


def tune_path(arch: tuple) -> Path:
    """Where the file for GPU architecture ``arch`` (``(major, minor)``) lives."""
    return tune_dir() / f"sm_{arch[0]}{arch[1]}.json"


def write(content: dict, path: Path) -> None:
    """Write ``content`` (the format above) to ``path``; the next :func:`tuned_tiers` reads it afresh."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1))
    _loaded.clear()


def _validate(content) -> list:
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ValueError(f"not a format-{FORMAT} fastpeft tune file")
    tiers = content["tiers"]
    if not tiers or any(len(t) != 3 or t[1] < 0 or t[2] < t[1] for t in tiers):
        raise ValueError(f"bad tiers {tiers!r}")
    return [(float(w), int(g), int(t)) for w, g, t in tiers]


def tuned_tiers(arch: Optional[tuple]) -> Optional[list]:
    """The measured tiers ``[(waves, gemv_max_m, triton_max_m)]`` for ``arch``, or None (no GPU, no file,
    or a file that does not parse: then a warning, once, and the shipped table)."""
    if arch is None:
        return None
    path = tune_path(arch)
    if path not in _loaded:
        try:
            _loaded[path] = _validate(json.loads(path.read_text())) if path.exists() else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"ignoring the fastpeft tune file {path} ({exc}); using the shipped NF4 dispatch table",
                          stacklevel=2)
            _loaded[path] = None
    return _loaded[path]
