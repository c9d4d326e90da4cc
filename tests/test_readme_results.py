"""The README's results are measured numbers: each row of its summary table holds what the committed results file
the section links says (one ratio, or the range over a micro case's shapes), the plot it shows is committed, and
the static-check page's rows are the committed compile grid."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(((?:\.\./)?bench/results/[^)]+)\)")
NUMBER = re.compile(r"\d+\.\d+")


def _section(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def _table(section: str, first_header: str) -> list:
    """The cells of each body row of the section's table whose header starts with ``first_header``."""
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _label(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if k not in ("model", "dtype", "r"))


def summary_mismatches(section: str, run: dict) -> list:
    """Each summary row whose ratio is not what ``run`` (a results.json) holds, with what it holds."""
    wrong = []
    for case, params, impl, cell in _table(section, "case"):
        rows = [r for r in run["results"] if (r["case"], r["impl"]) == (case, impl) and "peft" in r.get("vs", {})]
        shapes = re.fullmatch(r"(\d+) shapes", params)
        if shapes:
            values = [r["vs"]["peft"] for r in rows]
            expected = [f"{min(values):.2f}", f"{max(values):.2f}"] if len(values) == int(shapes.group(1)) else None
        else:
            matches = [r for r in rows if _label(r["params"]) == params]
            expected = [f"{matches[0]['vs']['peft']:.2f}"] if len(matches) == 1 else None
        if NUMBER.findall(cell) != expected:
            wrong.append((case, params, impl, cell, expected))
    return wrong


def test_the_summary_table_holds_the_linked_results():
    section = _section(ROOT / "README.md", "## Results")
    assert "CPU RUN" in section
    sources = {link for link in LINK.findall(section) if link.endswith("results.json")}
    assert len(sources) == 1, f"the Results section must link one results.json, links {sources}"
    run = json.loads((ROOT / sources.pop()).read_text())
    assert len(_table(section, "case")) >= 8
    assert summary_mismatches(section, run) == []
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", section):
        assert (ROOT / image).is_file(), f"{image} is shown but not committed"


def test_a_wrong_summary_number_is_caught():
    section = _section(ROOT / "README.md", "## Results")
    run = json.loads((ROOT / next(link for link in LINK.findall(section) if link.endswith("results.json")))
                     .read_text())
    case, params, impl, cell = _table(section, "case")[0]
    value = NUMBER.findall(cell)[0]
    tampered = section.replace(f"| {case} | {params} | {impl} | {cell} |",
                               f"| {case} | {params} | {impl} | {float(value) + 0.01:.2f} |")
    assert summary_mismatches(tampered, run) != []


def test_static_table_rows_are_the_committed_grid():
    """The static GPU check's table: every row named by its launch key holds that launch's numbers in the
    committed grid the page links first (registers, spills, occupancy, per-element counts)."""
    page = ROOT / "docs" / "static-check.md"
    section = _section(page, "## Results")
    grid = (page.parent / LINK.search(section).group(1)).resolve() / "results.json"
    rows = {(r["arch"], r["key"]): r for r in json.loads(grid.read_text()) if r["compiled"]}
    table = _table(section, "launch")
    assert len(table) >= 8
    for key, arch, regs, spill, _, occupancy, mma, _, gmem, weight, packed, instr in table:
        r = rows[(arch, key)]
        assert (int(regs), int(spill), occupancy.split()[0]) == (r["registers"], r["stack_bytes"],
                                                                 f"{r['occupancy']:.0%}"), key
        assert mma == ("none" if not r["mma_count"] else f"{r['mma_kind']} x{r['mma_count']}"), key
        fields = ("global_per_element", "weight_loads_per_element", "instructions_per_element")
        assert [float(gmem), float(weight), float(instr)] == [float(f"{r[f]:.3g}") for f in fields], key
        assert packed == " ".join(map(str, r["packed_load_bits"])), key


def test_docs_links_resolve():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not link.startswith("http"):
                assert (page.parent / link).exists(), f"{page.name} links {link}, which is not there"


def training_many_mismatches(section: str) -> list:
    """Each ratio of the "Training many adapters at once" table (one column per linked results.json, in link order)
    that is not what its run holds for the row's case, implementation and the params the row names."""
    runs = [json.loads((ROOT / link).read_text()) for link in LINK.findall(section) if link.endswith("results.json")]
    wrong = []
    for case, params, impl, *cells in _table(section, "case"):
        wanted = dict(item.split("=") for item in params.split())
        for run, cell in zip(runs, cells, strict=True):
            rows = [r for r in run["results"] if (r["case"], r["impl"]) == (case, impl) and "peft" in r.get("vs", {})
                    and all(str(r["params"].get(k)) == v for k, v in wanted.items())]
            expected = [f"{rows[0]['vs']['peft']:.2f}"] if len(rows) == 1 else None
            if NUMBER.findall(cell) != expected:
                wrong.append((case, params, impl, cell, expected))
    return wrong


def test_training_many_adapters_table_holds_its_results():
    section = _section(ROOT / "README.md", "## Training many adapters at once")
    assert "CPU RUN" in section and len(_table(section, "case")) >= 2
    assert training_many_mismatches(section) == []
    case, params, impl, cell, _ = _table(section, "case")[0]
    tampered = section.replace(f"| {cell} |", f"| {float(cell) + 0.01:.2f} |", 1)
    assert training_many_mismatches(tampered) != []
