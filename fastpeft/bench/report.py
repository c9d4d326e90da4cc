"""What the bench writes: the run's metadata, a text table, ``results.json`` and PNG plots."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import textwrap
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


def _backend(device: torch.device) -> str:
    from ..ops.dispatch import backend_for

    try:
        return backend_for(device)
    except (ValueError, RuntimeError) as exc:  # a FASTPEFT_BACKEND setting that cannot run here is reported
        return f"unusable ({exc})"


def metadata(cfg, command: list, roofline: Optional[dict]) -> dict:
    """The run's facts beside its results: device, versions, commit, command, torch threads, clock and the backend
    fastpeft's ops use (``cfg`` is the run's ``BenchConfig``)."""
    import fastpeft

    device = cfg.device
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
        "threads": torch.get_num_threads(),
        "clock": "cuda-events" if device.type == "cuda" else f"cpu-{cfg.clock}",
        "backend": _backend(device),
        "repeats": cfg.repeats,
    }


def run_line(cfg, jobs: int, suite: str) -> str:
    """What a run says before it starts: the suite, the job count, threads and clock, and why those."""
    if cfg.device.type == "cuda":
        return f"fastpeft bench: {suite} suite, {jobs} jobs on {device_name(cfg.device)}, CUDA events"
    threads = torch.get_num_threads()
    why = ("one thread keeps ratios steady on a small or busy CPU; --threads N to change" if threads == 1
           else "--threads / $OMP_NUM_THREADS")
    clock = ("this process's CPU time (other programs' load does not count)" if cfg.clock == "process"
             else "wall time")
    return (f"fastpeft bench: {suite} suite, {jobs} jobs on {device_name(cfg.device)}\n"
            f"  torch threads: {threads} ({why})\n  clock: {clock}")


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


def _text_table(header: tuple, rows: list, limit: Optional[int] = None, squeeze: int = 0) -> list:
    """Lines of a fixed-width table; with ``limit``, the column ``squeeze`` is cut (ending in ``~``) until every
    line fits ``limit`` characters."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    if limit is not None:
        widths[squeeze] = max(len(header[squeeze]), widths[squeeze] - max(0, sum(widths) + 2 * (len(widths) - 1)
                                                                         - limit))

    def cell(value, i):
        value = str(value)
        return value if len(value) <= widths[i] else value[:widths[i] - 1] + "~"

    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*(cell(v, i) for i, v in enumerate(row))).rstrip()
            for row in [header, tuple("-" * w for w in widths), *rows]]


def _clock_line(run: dict) -> list:
    if run["device_kind"] == "cuda":
        return []
    return ["CPU RUN: times of PyTorch code on this CPU (fastpeft's CPU path is its reference), NOT kernel "
            "performance."]


def table(run: dict) -> str:
    """Every result as a fixed-width text table (``table.txt``), headed by the run's facts."""
    lines = [f"fastpeft bench on {run['device']}  (commit {run['git_commit']}, {run['timestamp']})",
             *_clock_line(run)]
    if run.get("threads") is not None:
        lines.append(f"torch threads {run['threads']}, clock {run['clock']}, fastpeft backend {run['backend']}; "
                     "peak memory is " + ("the CUDA allocator's peak" if run["device_kind"] == "cuda"
                                          else "the process's peak RSS"))
    if run["roofline"]:
        r = run["roofline"]
        lines.append(f"roofline (measured): HBM {r['hbm_bytes_per_s'] / 1e9:.0f} GB/s, "
                     f"bf16 matmul {r['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s")
    lines.append("Implementations of a case are timed side by side, round after round; 'time vs' is the median "
                 "per-round time ratio to each baseline (below 1: faster).")
    roofline = any(res.get("roofline") for res in run["results"])
    header = ("case", "impl", "params", "median ms", "p20-p80 ms", "time vs", "tokens/s", "peak mem",
              *(("roofline",) if roofline else ()), "note")
    rows = []
    for res in run["results"]:
        if "skipped" in res or "error" in res:
            why = "skipped: " + res["skipped"] if "skipped" in res else "ERROR: " + res["error"]
            rows.append((res["case"], res["impl"], res["shape"], "-", "-", "", "", "", *(("",) if roofline else ()),
                         why))
            continue
        rows.append((res["case"], res["impl"], res["shape"], f"{res['median_ms']:.3f}",
                     f"{res['p20_ms']:.3f}-{res['p80_ms']:.3f}", _fmt_vs(res.get("vs")),
                     _fmt_rate(res.get("tokens_per_s")), _fmt_bytes(res.get("peak_mem_bytes")),
                     *((_fmt_roofline(res.get("roofline")),) if roofline else ()), res.get("note", "")))
    return "\n".join(lines + _text_table(header, rows))


# The cases that run a whole model (the rest time one layer or one op)
END_TO_END = ("train_step", "decode", "train_step_4bit", "decode_4bit", "multi_lora_decode", "multi_lora_serving")
CONSOLE_WIDTH = 120


def _short_label(params: dict) -> str:
    """A shape label without the rank, which the headline's header names once."""
    return " ".join(f"{k}={v}" for k, v in params.items() if k not in ("model", "dtype", "r"))


def _span(values: list) -> str:
    return "" if not values else (f"{min(values):.2f}" if len(values) == 1 else
                                  f"{min(values):.2f}-{max(values):.2f}")


def headline(run: dict) -> str:
    """The console summary: each end-to-end comparison, each micro case's range of ratios over its shapes, and
    fastpeft / PEFT over everything; at most :data:`CONSOLE_WIDTH` columns."""
    timed = [r for r in run["results"] if r.get("vs")]
    ranks = sorted({r["params"]["r"] for r in timed if "r" in r["params"]})
    lines = ["", *_clock_line(run),
             *textwrap.wrap(f"Time ratio of fastpeft to each baseline, the median over {run.get('repeats', '?')} "
                            "rounds of per-round ratios; below 1, fastpeft is faster"
                            + (f" (LoRA rank {', '.join(map(str, ranks))})." if ranks else "."), CONSOLE_WIDTH), ""]
    e2e = [r for r in timed if r["case"] in END_TO_END]
    if e2e:
        rows = [(r["case"], _short_label(r["params"]), r["impl"], f"{r['vs']['peft']:.2f}" if "peft" in r["vs"] else "",
                 _fmt_vs({k: v for k, v in r["vs"].items() if k != "peft"})) for r in e2e]
        lines += ["End to end (the tiny Llama: " + ("its checkpoint" if any("model" in r["params"] and
                  r["params"]["model"] != "built-in tiny Llama" for r in e2e) else "built-in, random weights") + ")",
                  *_text_table(("case", "params", "impl", "vs PEFT", "vs others"), rows, CONSOLE_WIDTH, squeeze=1), ""]
    micro = defaultdict(list)
    for r in timed:
        if r["case"] not in END_TO_END:
            micro[r["case"]].append(r)
    if micro:
        rows = [(case, len(results),
                 *(_span([r["vs"][b] for r in results if b in r["vs"]]) for b in ("peft", "reference", "bnb")),
                 _short_label(max(results, key=lambda r: r["vs"].get("peft", 0.0))["params"])
                 if any("peft" in r["vs"] for r in results) else "")
                for case, results in micro.items()]
        lines += ["Micro cases, one layer or op: the range over the shapes",
                  *_text_table(("case", "shapes", "vs PEFT", "vs reference", "vs bitsandbytes", "highest vs PEFT at"),
                               rows, CONSOLE_WIDTH, squeeze=5), ""]
    peft = sorted((r["vs"]["peft"], f"{r['case']}{'' if r['impl'] == 'fastpeft' else ' (' + r['impl'] + ')'} "
                                    f"{_short_label(r['params'])}") for r in timed if "peft" in r["vs"])
    if peft:
        above = [f"{where} ({value:.2f})" for value, where in reversed(peft) if round(value, 2) > 1]
        lines += textwrap.wrap(f"fastpeft / PEFT over {len(peft)} comparisons: {peft[0][0]:.2f}-{peft[-1][0]:.2f}, "
                               f"median {statistics.median(v for v, _ in peft):.2f}; above 1 in {len(above)}"
                               + (": " + "; ".join(above) if above else "")
                               + ". On a shared CPU a ratio within a few percent of 1 is a tie.", CONSOLE_WIDTH)
    failed = [r for r in run["results"] if "error" in r]
    skipped = [r for r in run["results"] if "skipped" in r]
    if failed or skipped:
        lines.append(f"{len(failed)} jobs failed, {len(skipped)} skipped: their reasons are in table.txt.")
    return "\n".join(lines)


def files_legend(plots: list) -> str:
    """The closing list of what the run wrote (``plots``: the PNG paths)."""
    lines = ["  results.json  every measurement (per-round samples, ratios, peak memory) with versions and command",
             "  table.txt     every implementation: median and p20-p80 ms, ratios, tokens/s, peak memory, notes",
             "  table.md      the same as Markdown, each row citing results.json"]
    if plots:
        lines += textwrap.wrap(", ".join(Path(p).name for p in plots), CONSOLE_WIDTH,
                               initial_indent=f"  {len(plots)} plots:".ljust(16), subsequent_indent=" " * 16)
    return "\n".join(lines)


def markdown_table(run: dict, source: str) -> str:
    """The measured rows as a Markdown table, each row citing ``source`` (its results file)."""
    clock = "CPU, not kernel performance" if run["device_kind"] != "cuda" else "CUDA events"
    extra = f", {run['threads']} torch threads, clock {run['clock']}" if run.get("threads") is not None else ""
    roofline = any(res.get("roofline") for res in run["results"])
    lines = [f"{run['device']}, {clock}{extra}, commit `{run['git_commit']}`, {run['timestamp']}", "",
             "| case | impl | params | median ms (p20–p80) | time vs | tokens/s | peak mem |"
             + (" roofline |" if roofline else "") + " source |",
             "|---|---|---|---|---|---|---|" + ("---|" if roofline else "") + "---|"]
    for res in run["results"]:
        if "median_ms" not in res:
            continue
        lines.append(
            f"| {res['case']} | {res['impl']} | {res['shape']} | {res['median_ms']:.3f} "
            f"({res['p20_ms']:.3f}–{res['p80_ms']:.3f}) | {_fmt_vs(res.get('vs'))} | "
            f"{_fmt_rate(res.get('tokens_per_s'))} | {_fmt_bytes(res.get('peak_mem_bytes'))} |"
            + (f" {_fmt_roofline(res.get('roofline'))} |" if roofline else "") + f" [{source}]({source}) |")
    skipped = sum("median_ms" not in r for r in run["results"])
    if skipped:
        lines += ["", f"{skipped} jobs skipped or failed: see {source}."]
    return "\n".join(lines)


def write_json(run: dict, out_dir: Path) -> Path:
    path = out_dir / "results.json"
    path.write_text(json.dumps(run, indent=1) + "\n")
    return path


def _tokens_spread(res: dict) -> tuple:
    """tokens/s at the 80th and 20th percentile of time (the slow and the fast end of ``res``' rounds)."""
    tokens = res["tokens_per_s"] * res["median_ms"] * 1e-3
    return tokens / (res["p80_ms"] * 1e-3), tokens / (res["p20_ms"] * 1e-3)


# One colour per implementation in every plot
_COLORS = {"fastpeft": "tab:blue", "fastpeft-serving": "tab:cyan", "peft": "tab:orange", "reference": "tab:gray",
           "hf": "tab:green", "bnb": "tab:purple"}


def _color(impl: str) -> str:
    return _COLORS.get(impl, "tab:red")


def _wrapped(label: str, width: int = 16) -> str:
    """A shape label on several short lines (``k=v`` items kept whole), for an x tick that needs no rotation."""
    lines, line = [], ""
    for item in label.split():
        if line and len(line) + 1 + len(item) > width:
            lines.append(line)
            line = item
        else:
            line = f"{line} {item}".strip()
    return "\n".join(lines + [line])


def write_plots(run: dict, out_dir: Path) -> list:
    """One PNG per case. Cases over a number of adapters: tokens/s against the adapter count, a line per
    implementation. Other cases: a group of bars per shape, a bar per implementation (median ms per call for one
    layer or op, tokens/s for a whole model), p20-p80 as error bars; the axis is linear from 0 unless the values span
    more than 10x.

    Returns the files written; raises ImportError without matplotlib (the caller says so and goes on)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    by_case = defaultdict(lambda: defaultdict(dict))
    for res in run["results"]:
        if "median_ms" in res:
            by_case[res["case"]][res["impl"]][res["shape"]] = res
    where = f"{run['device']}, " + ("CUDA events" if run["device_kind"] == "cuda" else
                                    "CPU RUN: PyTorch code on this CPU, not kernel performance")
    written = []
    for case, impls in by_case.items():
        throughput = case in END_TO_END
        shapes = list(dict.fromkeys(s for series in impls.values() for s in series))
        any_res = next(iter(next(iter(impls.values())).values()))
        over_adapters = throughput and "adapters" in any_res["params"]
        if over_adapters:
            fig, ax = plt.subplots(figsize=(7.5, 4.8))
            counts = set()
            for impl, series in impls.items():
                points = sorted((res["params"]["adapters"], res) for res in series.values())
                xs = [n for n, _ in points]
                counts.update(xs)
                spread = [_tokens_spread(res) for _, res in points]
                ys = [res["tokens_per_s"] for _, res in points]
                ax.errorbar(xs, ys, yerr=[[y - lo for y, (lo, _) in zip(ys, spread)],
                                          [hi - y for y, (_, hi) in zip(ys, spread)]],
                            marker="o", capsize=3, label=impl, color=_color(impl))
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(counts), [str(n) for n in sorted(counts)])
            ax.set_xlabel("adapters in the batch")
            common = {k: v for k, v in any_res["params"].items() if k not in ("adapters", "model", "dtype")}
            subtitle = " ".join(f"{k}={v}" for k, v in common.items())
        else:
            width = 0.8 / len(impls)
            fig, ax = plt.subplots(figsize=(max(7.5, 1.4 * len(shapes) + 2.5), 4.8))
            values = []
            for k, (impl, series) in enumerate(impls.items()):
                xs = [i + (k - (len(impls) - 1) / 2) * width for i, s in enumerate(shapes) if s in series]
                rows = [series[s] for s in shapes if s in series]
                if throughput:
                    ys = [r["tokens_per_s"] for r in rows]
                    spread = [_tokens_spread(r) for r in rows]
                else:
                    ys = [r["median_ms"] for r in rows]
                    spread = [(r["p20_ms"], r["p80_ms"]) for r in rows]
                values += ys
                ax.bar(xs, ys, width, yerr=[[y - lo for y, (lo, _) in zip(ys, spread)],
                                            [hi - y for y, (_, hi) in zip(ys, spread)]],
                       capsize=2, label=impl, color=_color(impl))
            ax.set_xticks(range(len(shapes)), [_wrapped(s) for s in shapes], fontsize=8)
            if values and min(values) > 0 and max(values) / min(values) > 10:
                ax.set_yscale("log")
            subtitle = ""
        ax.set_ylabel("tokens per second (higher is better)" if throughput else "ms per call (lower is better)")
        title = f"{case}{': ' + subtitle if subtitle else ''}, median over rounds (error bars: p20-p80)"
        ax.set_title(textwrap.fill(title, 90) + "\n" + textwrap.fill(where, 90), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{case}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
