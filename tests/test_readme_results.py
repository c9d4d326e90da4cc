"""The README's Results rows are measured numbers: each row citing a committed bench file holds a number that
file contains (a results.json row of that case, implementation and shape, or a check_cpu.py ratio)."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\((bench/results/[^)]+)\)")
VS = re.compile(r"(\d+\.\d+)x ([\w-]+)")


def _results_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Results")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def _rows(section: str) -> list:
    """Table rows (cells) of the section that cite a committed bench file."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.lstrip().startswith("|") and LINK.search(line)]


def _numbers(cell: str) -> list:
    return [float(v) for v in re.findall(r"\d+\.\d+", cell)]


def test_every_results_row_cites_a_committed_file_holding_its_number():
    section = _results_section()
    rows = _rows(section)
    assert rows, "the Results section has no rows citing a committed bench/results file"
    assert "CPU RUN" in section
    for cells in rows:
        path = ROOT / LINK.search(" | ".join(cells)).group(1)
        assert path.is_file(), f"{path} is cited but not committed"
        data = json.loads(path.read_text())
        if path.name == "results.json":  # | case | impl | params | median ms (p20–p80) | ... | source |
            case, impl, shape, timing = cells[:4]
            matches = [r for r in data["results"] if (r["case"], r["impl"], r["shape"]) == (case, impl, shape)]
            assert len(matches) == 1, f"no single {case} {impl} {shape} row in {path}"
            r = matches[0]
            assert _numbers(timing)[:3] == [float(f"{r[k]:.3f}") for k in ("median_ms", "p20_ms", "p80_ms")], cells
            for value, baseline in VS.findall(" | ".join(cells[4:])):  # "time vs": 0.96x peft, ...
                assert f"{r['vs'][baseline]:.2f}" == value, cells
        else:  # check_cpu.py's JSON: | case | shape | what | ratio | bound | source |
            case, shape, what, ratio = cells[:4]
            checks = [c for g in data["groups"] if (g["case"], g["shape"]) == (case, shape)
                      for c in g["checks"] if c["what"] == what]
            assert len(checks) == 1, f"no single check {what!r} of {case} {shape} in {path}"
            assert _numbers(ratio)[0] == float(f"{checks[0]['ratio']:.2f}"), cells


def test_static_table_rows_are_the_committed_grid():
    """The static GPU check's table: every row named by its launch key holds that launch's numbers in the
    committed grid the section cites first (registers, spills, occupancy, per-element counts)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Static GPU check")
    section = text[start:text.index("\n## ", start + 1)]
    grid = ROOT / LINK.search(section).group(1) / "results.json"
    rows = {(r["arch"], r["key"]): r for r in json.loads(grid.read_text()) if r["compiled"]}
    table = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
             if line.startswith("| ") and "/" in line.split("|")[1] and not line.startswith("| before")]
    assert len(table) >= 8
    for key, arch, regs, spill, _, occupancy, mma, _, gmem, weight, packed, instr in table:
        r = rows[(arch, key)]
        assert (int(regs), int(spill), occupancy.split()[0]) == (r["registers"], r["stack_bytes"],
                                                                 f"{r['occupancy']:.0%}"), key
        assert mma == ("none" if not r["mma_count"] else f"{r['mma_kind']} x{r['mma_count']}"), key
        fields = ("global_per_element", "weight_loads_per_element", "instructions_per_element")
        assert [float(gmem), float(weight), float(instr)] == [float(f"{r[f]:.3g}") for f in fields], key
        assert packed == " ".join(map(str, r["packed_load_bits"])), key
