"""The package's layers, read from the source with ``ast``: every import of a file counts, at module level or
inside a function, so a lazy import cannot hide a dependency or a cycle.

- ``fastpeft/kernels/*.py`` import only each other, ``fastpeft.nf4`` (the NF4 weight format), the standard
  library, torch, triton and numpy: nothing of the ops, modules, patching, serving or the benchmark above them;
  and the imports among the kernel files form no cycle.
- ``fastpeft/nn/*.py`` (the modules) import neither triton nor ``fastpeft.kernels``: they reach kernels only
  through ``fastpeft.ops``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastpeft"
KERNELS_ALLOWED_THIRD_PARTY = {"torch", "triton", "numpy"}
KERNELS_ALLOWED_FASTPEFT = ("fastpeft.kernels", "fastpeft.nf4")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``path``, relative imports resolved; ``from . import x``
    names the submodule ``package.x`` where ``x`` is a file of the package."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if target == "__future__":
                continue
            folder = PACKAGE.parent.joinpath(*target.split("."))
            submodules = [f"{target}.{alias.name}" for alias in node.names
                          if (folder / f"{alias.name}.py").exists() or (folder / alias.name / "__init__.py").exists()]
            found += [(node.lineno, name) for name in submodules] or [(node.lineno, target)]
    return found


def _is_within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _kernel_files() -> list[Path]:
    files = sorted((PACKAGE / "kernels").glob("*.py"))
    assert len(files) > 5, files
    return files


def test_the_import_reader_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The reader the checks below rely on: module-level, function-level, relative and ``from . import``."""
    fake = tmp_path / "fastpeft"
    (fake / "kernels").mkdir(parents=True)
    (fake / "kernels" / "other.py").write_text("")
    (fake / "kernels" / "probe.py").write_text(
        "from __future__ import annotations\nimport os\nfrom . import other\nfrom ..ops.dispatch import x\n"
        "def f():\n    from ..bench.timing import measure\n    import triton.language as tl\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert imports_of(fake / "kernels" / "probe.py") == [
        (2, "os"), (3, "fastpeft.kernels.other"), (4, "fastpeft.ops.dispatch"), (6, "fastpeft.bench.timing"),
        (7, "triton.language")]


@pytest.mark.parametrize("path", _kernel_files(), ids=lambda p: p.name)
def test_kernels_import_nothing_above_them(path):
    bad = []
    for line, name in imports_of(path):
        top = name.partition(".")[0]
        if top == "fastpeft":
            ok = any(_is_within(name, prefix) for prefix in KERNELS_ALLOWED_FASTPEFT)
        else:
            ok = top in KERNELS_ALLOWED_THIRD_PARTY or top in sys.stdlib_module_names
        if not ok:
            bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_kernel_imports_have_no_cycle():
    graph = {_module_name(path): {name for _, name in imports_of(path) if _is_within(name, "fastpeft.kernels")}
             for path in _kernel_files()}
    done: set = set()

    def visit(module: str, stack: list):
        if module in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, stack + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


@pytest.mark.parametrize("path", sorted((PACKAGE / "nn").glob("*.py")), ids=lambda p: p.name)
def test_modules_know_nothing_of_triton(path):
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}" for line, name in imports_of(path)
           if _is_within(name, "triton") or _is_within(name, "fastpeft.kernels")]
    assert not bad, "\n".join(bad)
