"""``summary.md`` of a GPU acceptance run (``bench/gpu_accept.py``), from what ``results.json`` holds: versions and
GPU, the correctness pass (failures, errors and skips named), the headline ratios, the NF4 GEMV's bandwidth against
the measured copy, what each timing group became, and every skipped or failed implementation with its reason."""

from __future__ import annotations

from collections import Counter, defaultdict


def _correctness(data: dict) -> list:
    records = data["correctness"]
    counts = Counter(r.get("status") for r in records)
    lines = ["## Correctness", "",
             f"{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, {counts['skip']} skipped, "
             f"{counts['not-run']} not run (budget). FASTPEFT_STRICT=1: a kernel that fails is an error here, never "
             "a quiet PyTorch fallback."]
    if data.get("checks_note"):
        lines += ["", f"**Correctness pass {data['checks_note']}.**"]
    for status, title in (("fail", "Failed"), ("error", "Errors"), ("skip", "Skipped")):
        chosen = [r for r in records if r.get("status") == status]
        if chosen:
            lines += ["", f"### {title}", ""]
            lines += [f"- `{r['check']}`: {r.get('detail')}" for r in chosen]
    not_run = [r["check"] for r in records if r.get("status") == "not-run"]
    if not_run:
        lines += ["", f"Not run: {', '.join(f'`{name}`' for name in not_run)}"]
    return lines


def _headlines(data: dict) -> list:
    if not data["headlines"]:
        return []
    lines = ["## Headline ratios", "", "Median over rounds of per-round time ratios (below 1: the first is faster).",
             "",
             "| group | case | ratio | value |", "|---|---|---|---|"]
    lines += [f"| {h['group']} | {h['subgroup']} | {h['what']} | {h['ratio']:.3f} |" for h in data["headlines"]]
    return lines


def _bandwidth(data: dict) -> list:
    rows = [r for r in data["results"] if r.get("group") == "nf4_gemv" and r.get("roofline")]
    roofline = data.get("roofline")
    if not rows or not roofline:
        return []
    lines = ["## NF4 GEMV bandwidth", "",
             f"Measured: {roofline['hbm_bytes_per_s'] / 1e9:.0f} GB/s device-to-device copy (1 GiB, read + write), "
             f"{roofline['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s bf16 matmul ({roofline['method']}).", "",
             "| shape | impl | median µs | GB/s | of the copy's |", "|---|---|---|---|---|"]
    for r in rows:
        achieved = r["roofline"]["achieved_bytes_per_s"]
        lines.append(f"| {r['subgroup']} | {r['impl']} | {1e3 * r['median_ms']:.1f} | {achieved / 1e9:.0f} | "
                     f"{100 * achieved / roofline['hbm_bytes_per_s']:.0f} % |")
    return lines


def _groups(data: dict) -> list:
    if not data["groups"]:
        return []
    lines = ["## Timing groups", "", "| group | status |", "|---|---|"]
    lines += [f"| {name} | {status} |" for name, status in data["groups"].items()]
    return lines


def _skips_and_errors(data: dict) -> list:
    skipped = defaultdict(list)
    for r in data["results"]:
        if "skipped" in r:
            skipped[r["skipped"]].append(f"{r['case']} {r['impl']} {r['shape']}")
    errors = [r for r in data["results"] if "error" in r]
    lines = []
    if skipped:
        lines += ["## Skipped implementations", ""]
        lines += [f"- {reason} ({len(jobs)}: {', '.join(jobs[:4])}{', ...' if len(jobs) > 4 else ''})"
                  for reason, jobs in skipped.items()]
    if errors:
        lines += ["", "## Errors in the timings", ""]
        lines += [f"- `{r['case']} {r['impl']} {r['shape']}`: {r['error']}" for r in errors]
    return lines


def _all_rows(data: dict) -> list:
    """Every timed row (``fastpeft.bench.report.markdown_table``), each citing ``results.json``."""
    from fastpeft.bench.report import markdown_table

    if not any("median_ms" in r for r in data["results"]):
        return []
    return ["## Every timed row", "", markdown_table(data, "results.json")]


def summary_markdown(data: dict) -> str:
    clock = "CPU DRY RUN: wall-clock times of the PyTorch reference path, NOT kernel performance" \
        if data.get("device_kind") != "cuda" else "CUDA events"
    head = [f"# GPU acceptance run: {data.get('device', '?')}", "",
            f"{data.get('timestamp', '')}, commit `{data.get('git_commit', '?')}`; torch {data.get('torch')}, triton "
            f"{data.get('triton')}, transformers {data.get('transformers')}, peft {data.get('peft')}; bitsandbytes "
            f"{data.get('bitsandbytes')}.", "",
            f"Budget {data['budget_s']:.0f} s, {data['elapsed_s']:.0f} s so far; timings: {clock}. Command: "
            f"`{' '.join(data.get('command', []))}`"]
    if data.get("stopped"):
        head += ["", f"**Stopped by {data['stopped']}**: what had been written until then is below."]
    sections = [head, _correctness(data), _headlines(data), _bandwidth(data), _groups(data), _skips_and_errors(data),
                _all_rows(data)]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"
