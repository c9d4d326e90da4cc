"""The supported Triton range and the numpy constraint of old interpreters (``fastpeft.kernels.versions``), and
that CI runs the versions the range names."""

import re
from pathlib import Path

import pytest

from fastpeft.kernels import versions

ROOT = Path(__file__).resolve().parents[1]


def test_version_tuple():
    assert versions.version_tuple("3.6.0") == (3, 6)
    assert versions.version_tuple("3.4.0+git1a2b3c") == (3, 4)
    assert versions.version_tuple("3.10.1") == (3, 10)
    with pytest.raises(ValueError, match="not a version"):
        versions.version_tuple("main")


def test_supported_range_includes_both_ends():
    assert versions.supported_range() == "3.4-3.9"
    for inside in ("3.4.0", "3.6.0", "3.9.0", "3.9.1"):
        assert versions.unsupported_triton(inside) is None
    for outside in ("3.3.1", "3.10.0", "4.0.0"):
        assert versions.unsupported_triton(outside) == f"fastpeft supports Triton 3.4-3.9; this is Triton {outside}"


def test_numpy_constraint_of_old_interpreters():
    assert "needs numpy < 2.4" in versions.interpreter_numpy_error("3.6.0", "2.4.0")
    assert "pip install 'numpy<2.4'" in versions.interpreter_numpy_error("3.4.0+git1a2b3c", "2.4.6")
    assert versions.interpreter_numpy_error("3.6.0", "2.3.5") is None
    assert versions.interpreter_numpy_error("3.7.0", "2.4.6") is None
    assert versions.interpreter_numpy_error("3.9.0", "2.4.6") is None


def test_ci_runs_the_oldest_supported_triton_and_the_gpu_machines():
    """``.ci/run`` tests the kernels under the oldest supported Triton and 3.6 besides the installed newest one,
    with numpy < 2.4 pinned beside them, and runs the README's test command as the README writes it."""
    script = (ROOT / ".ci" / "run").read_text()
    test_command = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
    assert test_command in script and test_command in (ROOT / "README.md").read_text()
    assert script.splitlines()[1:].count("set -euo pipefail") == 1
    older = re.search(r"OLDER_TRITONS=\(([^)]*)\)", script).group(1).split()
    assert {versions.version_tuple(v) for v in older} == {versions.SUPPORTED_TRITON[0], (3, 6)}
    assert '"numpy<2.4"' in script and "--system-site-packages" in script
