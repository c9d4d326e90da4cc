"""What the bench writes: the run's metadata, a text table, ``results.json`` and PNG plots."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

RESULT_KEYS = ("case", "impl", "params", "shape", "median_ms", "p20_ms", "p80_ms", "repeats", "calls_per_round",
               "samples_ms", "clock")
METADATA_KEYS = ("device", "device_kind", "torch", "triton", "fastpeft", "transformers", "peft", "bitsandbytes",
                 "git_commit", "command", "timestamp", "roofline", "results")


def _dist_version(name: str) -> str:
    """An installed distribution's version without importing it (importing triton is not free)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """The commit of the fastpeft checkout being measured (``+dirty`` with local changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def metadata(device: torch.device, command: list, roofline: Optional[dict]) -> dict:
    import fastpeft

    return {
        "device": device_name(device),
        "device_kind": device.type,
        "torch": torch.__version__,
        "triton": _dist_version("triton"),
        "fastpeft": fastpeft.__version__,
        "transformers": _dist_version("transformers"),
        "peft": _dist_version("peft"),
        "bitsandbytes": _dist_version("bitsandbytes"),
        "git_commit": git_commit(),
        "command": list(command),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "roofline": roofline,
    }


def shape_label(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if k not in ("model", "dtype"))


def _fmt_bytes(n: Optional[int]) -> str:
    return "" if n is None else f"{n / 2**20:.1f} MiB"


def _fmt_rate(x: Optional[float]) -> str:
    if x is None:
        return ""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.1f}"


def _fmt_vs(vs: Optional[dict]) -> str:
    """``{"peft": 0.82}`` -> ``"0.82x peft"``: the median per-round time ratio to each baseline (below 1: faster)."""
    return ", ".join(f"{r:.2f}x {impl}" for impl, r in (vs or {}).items())


def _fmt_roofline(roof: Optional[dict]) -> str:
    return f"{100 * roof['fraction']:.0f}% ({roof['bound']})" if roof else ""


def table(run: dict) -> str:
    """The results as a fixed-width text table, headed by the device and what the clock measures."""
    cpu = run["device_kind"] != "cuda"
    lines = [f"fastpeft bench on {run['device']}  (commit {run['git_commit']}, {run['timestamp']})"]
    if cpu:
        lines.append("CPU RUN: wall-clock times of PyTorch code on this CPU (the reference path); "
                     "NOT kernel performance. Peak memory is the process RSS.")
    if run["roofline"]:
        r = run["roofline"]
        lines.append(f"roofline (measured): HBM {r['hbm_bytes_per_s'] / 1e9:.0f} GB/s, "
                     f"bf16 matmul {r['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s")
    lines.append("Implementations of a case are timed side by side, round after round; 'time vs' is the median "
                 "per-round time ratio to each baseline (below 1: faster).")
    header = ("case", "impl", "params", "median ms", "p20-p80 ms", "time vs", "tokens/s", "peak mem", "roofline",
              "note")
    rows = []
    for res in run["results"]:
        if "skipped" in res or "error" in res:
            why = "skipped: " + res["skipped"] if "skipped" in res else "ERROR: " + res["error"]
            rows.append((res["case"], res["impl"], res["shape"], "-", "-", "", "", "", "", why))
            continue
        roof = res.get("roofline")
        rows.append((
            res["case"], res["impl"], res["shape"], f"{res['median_ms']:.3f}",
            f"{res['p20_ms']:.3f}-{res['p80_ms']:.3f}", _fmt_vs(res.get("vs")), _fmt_rate(res.get("tokens_per_s")),
            _fmt_bytes(res.get("peak_mem_bytes")),
            _fmt_roofline(roof), res.get("note", ""),
        ))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)).rstrip() for r in rows]
    return "\n".join(lines)


def markdown_table(run: dict, source: str) -> str:
    """The measured rows as a Markdown table for the README, each row citing ``source`` (its results file)."""
    clock = "CPU wall clock, not kernel performance" if run["device_kind"] != "cuda" else "CUDA events"
    lines = [f"{run['device']}, {clock}, commit `{run['git_commit']}`, {run['timestamp']}", "",
             "| case | impl | params | median ms (p20–p80) | time vs | tokens/s | peak mem | roofline | source |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in run["results"]:
        if "median_ms" not in res:
            continue
        lines.append(
            f"| {res['case']} | {res['impl']} | {res['shape']} | {res['median_ms']:.3f} "
            f"({res['p20_ms']:.3f}–{res['p80_ms']:.3f}) | {_fmt_vs(res.get('vs'))} | "
            f"{_fmt_rate(res.get('tokens_per_s'))} | "
            f"{_fmt_bytes(res.get('peak_mem_bytes'))} | {_fmt_roofline(res.get('roofline'))} | [{source}]({source}) |")
    skipped = sum("median_ms" not in r for r in run["results"])
    if skipped:
        lines += ["", f"{skipped} jobs skipped or failed: see {source}."]
    return "\n".join(lines)


def write_json(run: dict, out_dir: Path) -> Path:
    path = out_dir / "results.json"
    path.write_text(json.dumps(run, indent=1) + "\n")
    return path


def write_plots(run: dict, out_dir: Path) -> list:
    """One PNG per case: median time per shape (micro) or tokens/s (end to end), a series per impl.

    Returns the files written; raises ImportError without matplotlib (the caller says so and goes on)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    by_case = defaultdict(lambda: defaultdict(dict))
    for res in run["results"]:
        if "median_ms" in res:
            by_case[res["case"]][res["impl"]][res["shape"]] = res
    written = []
    for case, impls in by_case.items():
        throughput = case in ("train_step", "decode", "multi_lora_serving")
        shapes = list(dict.fromkeys(s for series in impls.values() for s in series))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(shapes) + 3), 4.5))
        for impl, series in impls.items():
            xs = [i for i, s in enumerate(shapes) if s in series]
            if throughput:
                ys = [series[shapes[i]]["tokens_per_s"] for i in xs]
            else:
                ys = [series[shapes[i]]["median_ms"] for i in xs]
            lo = [series[shapes[i]]["p20_ms"] for i in xs]
            hi = [series[shapes[i]]["p80_ms"] for i in xs]
            if throughput:
                ax.plot(xs, ys, marker="o", label=impl)
            else:
                ax.errorbar(xs, ys, yerr=[[y - l for y, l in zip(ys, lo)], [h - y for y, h in zip(ys, hi)]],
                            marker="o", capsize=3, label=impl)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=35, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("tokens/s (higher is better)" if throughput else "median ms (lower is better), p20-p80")
        clock = "CPU wall clock: NOT kernel performance" if run["device_kind"] != "cuda" else "CUDA events"
        ax.set_title(f"{case} on {run['device']}\n{clock}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{case}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
