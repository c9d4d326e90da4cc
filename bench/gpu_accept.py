"""The GPU acceptance run: correctness on the GPU first, then the timings that matter most, in one command that
fits the lent GPU machine (one command of at most 10 minutes, at most 8 result files). ``bench/GPU.md`` says
how to run it there and how to read what it writes.

``python3 -m bench.gpu_accept --out DIR [--budget-s 420] [--no-bnb] [--dry-run]`` (from the repository root):

1. bitsandbytes: used where importable; else a wheel at ``bench/wheels/bitsandbytes-*.whl`` (or ``--bnb-wheel``)
   is installed with ``pip install --no-index --no-deps --target`` into a temporary folder put on the children's
   ``PYTHONPATH``; without either (or with ``--no-bnb``, which hides an installed one from the children) every
   comparison with bitsandbytes is a skip, listed in the summary, never a failure.
2. The correctness pass (``bench/gpu_checks.py``), its own budget (``--checks-budget-s``, at most 180 s), split over
   ``--shards`` processes run side by side (Triton compiles each kernel specialisation once per process: side by
   side they share the machine's cores). Then the coverage checks, over every shard's log.
3. The timing groups (``bench/gpu_timings.py``), one process each, in priority order; the rest of the budget is
   shared among the groups not yet run in proportion to their shares, so time one group leaves goes to the next,
   and a group past its budget (plus a grace) is killed. A process per group also keeps a CUDA error of one group
   (which ruins that process's CUDA context) out of the others.

Every check and every timed subgroup is appended to its JSON-lines file as it finishes; ``summary.md`` and
``results.json`` are rewritten after each phase and group; at the end, or on SIGTERM / SIGINT (the children
stopped, what they wrote kept), the plots are packed into one archive. ``DIR`` then holds six files:
``summary.md``, ``results.json``, ``correctness.jsonl``, ``timings.jsonl``, ``run.log`` (the children's output),
``plots.tar.gz``. Exit status 0 only when every check ran and passed (skips aside), no timed implementation raised
and nothing stopped the run (:func:`accepted`).

``--dry-run`` runs the same driver on CPU with tiny shapes (the checks' kernels in Triton's interpreter; timings
of the PyTorch reference path, meaningless as numbers): the test suite runs it so the driver cannot rot.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
WHEEL_GLOB = "bench/wheels/bitsandbytes-*.whl"
# Set for the children to make bitsandbytes unimportable there (``--no-bnb``): see hide_bitsandbytes_if_asked
WITHOUT_BNB_ENV = "FASTPEFT_ACCEPT_WITHOUT_BNB"
FILES = ("summary.md", "results.json", "correctness.jsonl", "timings.jsonl", "run.log", "plots.tar.gz")
CHECKS_BUDGET_MAX_S = 180.0


def hide_bitsandbytes_if_asked() -> None:
    """In a child started with :data:`WITHOUT_BNB_ENV` set: bitsandbytes unimportable, as if not installed
    (``import`` raises ImportError, ``importlib.util.find_spec`` returns None, which is what transformers and PEFT
    test). Called before anything imports it."""
    if os.environ.get(WITHOUT_BNB_ENV) == "1":
        sys.modules["bitsandbytes"] = None


def append_line(path, record: dict) -> None:
    """Append ``record`` as one JSON line stamped with the time it was written, under an exclusive lock (shards
    of the correctness pass share their log)."""
    line = json.dumps({**record, "written": time.time()}, default=str) + "\n"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line)
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)


def read_lines(path: Path) -> list:
    """The JSON lines of ``path`` (none if absent); a line cut short by a kill is left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


class Stopped(Exception):
    """SIGTERM or SIGINT arrived: stop the children, write what there is."""


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def bitsandbytes_for_children(args, workdir: str, pythonpath: str) -> tuple:
    """``(environment for the children, what the summary says about bitsandbytes)``; ``pythonpath``: the children's
    ``PYTHONPATH`` so far (a wheel's install folder goes first)."""
    if args.no_bnb:
        return {WITHOUT_BNB_ENV: "1"}, "hidden from the run (--no-bnb): its comparisons are skipped"
    if importlib.util.find_spec("bitsandbytes") is not None:
        from importlib.metadata import version

        return {}, f"installed ({version('bitsandbytes')})"
    wheels = [args.bnb_wheel] if args.bnb_wheel else sorted(glob.glob(str(ROOT / WHEEL_GLOB)))
    if not wheels:
        return {}, f"not installed and no wheel at {WHEEL_GLOB} (bench/GPU.md): its comparisons are skipped"
    target = os.path.join(workdir, "bitsandbytes")
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", "--target", target,
               wheels[-1]]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {}, f"installing {wheels[-1]} failed ({exc}): its comparisons are skipped"
    if done.returncode != 0:
        return {}, f"installing {wheels[-1]} failed ({done.stderr.strip()[-300:]}): its comparisons are skipped"
    status = f"installed from {os.path.relpath(wheels[-1], ROOT)} into a temporary folder"
    return {"PYTHONPATH": os.pathsep.join(p for p in (target, pythonpath) if p)}, status


class Run:
    """One acceptance run: its folder, budget, children and what they wrote."""

    def __init__(self, args, argv: list):
        self.args, self.argv = args, argv
        self.out = Path(args.out)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.reserve = min(15.0, 0.05 * args.budget_s)  # kept for the plots and the last summary
        self.grace = args.grace_s  # past a child's own budget before it is killed (its check or subgroup finishing)
        self.children: list = []
        self.stopped: Optional[str] = None
        self.groups: dict = {}  # timing group -> what became of it
        self.checks_note = ""
        self.meta: dict = {}
        self.bnb = ""
        self.env = dict(os.environ, FASTPEFT_STRICT="1", TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error",
                        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
        if args.dry_run:  # the checks' kernels in Triton's interpreter, the timings on the CPU reference path
            self.env["TRITON_INTERPRET"] = "1"

    def path(self, name: str) -> Path:
        return self.out / name

    def log(self, message: str) -> None:
        line = f"[gpu_accept {time.monotonic() - self.start:6.1f} s] {message}"
        print(line, flush=True)
        with open(self.path("run.log"), "a") as f:
            f.write(line + "\n")

    # -------------------------------------------------------------------------------------------- children

    def spawn(self, module: str, options: list, extra_env: Optional[dict] = None) -> subprocess.Popen:
        log = open(self.path("run.log"), "a")
        child = subprocess.Popen([sys.executable, "-m", module, *options], cwd=ROOT, stdout=log,
                                 stderr=subprocess.STDOUT, env={**self.env, **(extra_env or {})},
                                 start_new_session=True)
        log.close()
        self.children.append(child)
        return child

    def wait(self, children: list, kill_at: float) -> list:
        """Each child's exit status, None for one killed at ``kill_at`` (monotonic)."""
        statuses = []
        for child in children:
            try:
                statuses.append(child.wait(timeout=max(0.0, kill_at - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill(child)
                statuses.append(None)
            self.children.remove(child)
        return statuses

    @staticmethod
    def kill(child: subprocess.Popen) -> None:
        """SIGTERM to the child's process group, SIGKILL 5 s later if it is still there."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                return
            try:
                child.wait(timeout=5)
                return
            except subprocess.TimeoutExpired:
                continue

    # ---------------------------------------------------------------------------------------------- phases

    def checks(self) -> None:
        budget = min(self.args.checks_budget_s, self.deadline - self.reserve - time.monotonic())
        if budget <= 1:
            self.checks_note = "not run: the run's budget was spent"
            return
        shards = self.args.shards
        self.log(f"correctness pass: {shards} shard(s), {budget:.0f} s")
        options = ["--log", str(self.path("correctness.jsonl")), "--budget-s", f"{budget:.1f}"]
        options += ["--dry-run"] if self.args.dry_run else []
        extra = {"FASTPEFT_BACKEND": "triton"} if self.args.dry_run else {}
        children = [self.spawn("bench.gpu_checks", [*options, "--shard", f"{i}/{shards}"], extra)
                    for i in range(shards)]
        statuses = self.wait(children, time.monotonic() + budget + self.grace)
        killed = [f"{i}/{shards}" for i, status in enumerate(statuses) if status is None]
        self.checks_note = (f"cut short: shard(s) {', '.join(killed)} killed at the budget, the checks they had not "
                            "logged missing from the counts" if killed else "")
        from bench.gpu_checks import coverage

        records = read_lines(self.path("correctness.jsonl"))
        if any(r.get("triton") for r in records):  # launches are asserted on the Triton backend only
            for record in coverage(records):
                append_line(self.path("correctness.jsonl"), record)

    def timings(self) -> None:
        from bench.gpu_timings import GROUPS

        timings = self.path("timings.jsonl")
        roofline = None
        budget = min(30.0, self.deadline - self.reserve - time.monotonic())  # a 1 GiB copy and an 8192^3 matmul
        if budget > 1:
            append_line(timings, {"kind": "group-start", "group": "roofline"})
            child = self.spawn("bench.gpu_timings", ["--group", "roofline", "--out", str(timings), "--budget-s",
                                                     f"{budget:.1f}"] + (["--dry-run"] if self.args.dry_run else []))
            self.wait([child], time.monotonic() + budget + self.grace)
            roofline = next((r["roofline"] for r in read_lines(timings) if r.get("kind") == "roofline"), None)
        names = [name for name in GROUPS if name in self.args.groups]
        for n, name in enumerate(names):
            left = self.deadline - self.reserve - time.monotonic()
            shares = [GROUPS[later][0] for later in names[n:]]
            budget = left * shares[0] / sum(shares)
            if budget < (1 if self.args.dry_run else 5):
                self.groups[name] = "skipped: the run's budget was spent"
                append_line(timings, {"kind": "group-skipped", "group": name, "reason": self.groups[name]})
                continue
            self.log(f"timing group {name}: {budget:.0f} s")
            append_line(timings, {"kind": "group-start", "group": name, "budget_s": budget})
            options = ["--group", name, "--out", str(timings), "--budget-s", f"{budget:.1f}"]
            options += ["--roofline", json.dumps(roofline)] if roofline else []
            options += ["--dry-run"] if self.args.dry_run else []
            (status,) = self.wait([self.spawn("bench.gpu_timings", options)], time.monotonic() + budget + self.grace)
            self.groups[name] = {None: f"killed {self.grace:.0f} s past its budget of {budget:.0f} s", 0: "done"}.get(
                status, f"exit status {status}")
            append_line(timings, {"kind": "group-end", "group": name, "status": self.groups[name]})
            self.write_summary()

    # ---------------------------------------------------------------------------------------------- results

    def collected(self) -> dict:
        """Everything written so far, as ``results.json`` holds it."""
        checks = read_lines(self.path("correctness.jsonl"))
        timings = read_lines(self.path("timings.jsonl"))
        roofline = next((r["roofline"] for r in timings if r.get("kind") == "roofline"), None)
        return {**self.meta, "roofline": roofline, "bitsandbytes": self.bnb,
                "budget_s": self.args.budget_s, "elapsed_s": round(time.monotonic() - self.start, 1),
                "stopped": self.stopped, "checks_note": self.checks_note, "groups": self.groups,
                "correctness": checks,
                "results": [r for r in timings if r.get("kind") == "result"],
                "headlines": [r for r in timings if r.get("kind") == "headline"]}

    def write_summary(self) -> dict:
        from bench.gpu_summary import summary_markdown

        data = self.collected()
        _replace(self.path("results.json"), json.dumps(data, indent=1, default=str) + "\n")
        _replace(self.path("summary.md"), summary_markdown(data))
        return data

    def pack_plots(self, data: dict) -> None:
        from fastpeft.bench.report import write_plots

        with tempfile.TemporaryDirectory() as folder:
            try:
                plots = write_plots(data, Path(folder))
            except ImportError:
                plots = []
                self.log("no plots: matplotlib is not installed")
            with tarfile.open(self.path("plots.tar.gz"), "w:gz") as archive:
                for plot in plots:
                    archive.add(plot, arcname=plot.name)

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        strays = sorted(p.name for p in self.out.iterdir() if p.name not in FILES)
        if strays:
            raise SystemExit(f"gpu_accept: {self.out} holds other files ({', '.join(strays)}): give an empty folder")
        for name in FILES:
            self.path(name).unlink(missing_ok=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stop)
        with tempfile.TemporaryDirectory() as workdir:
            try:
                self.meta = _metadata(self.args, self.argv)
                env, self.bnb = bitsandbytes_for_children(self.args, workdir, self.env["PYTHONPATH"])
                self.env.update(env)
                self.log(f"{self.meta['device']}; bitsandbytes {self.bnb}; budget {self.args.budget_s:.0f} s")
                self.write_summary()
                self.checks()
                self.write_summary()
                self.timings()
            except Stopped as exc:
                self.stopped = f"{exc} after {time.monotonic() - self.start:.0f} s"
                self.log(f"stopped by {self.stopped}")
                for child in list(self.children):
                    self.kill(child)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the last files are written whatever comes now
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            data = self.write_summary()
            self.pack_plots(data)
        written = ", ".join(sorted(p.name for p in self.out.iterdir()))
        self.log(f"done in {time.monotonic() - self.start:.0f} s: {written}")
        return 0 if accepted(data) else 1


def accepted(data: dict) -> bool:
    """True when every check ran and none failed or errored, no timed implementation raised, and the run was not
    stopped: a pass cut short by its budget accepts nothing."""
    checks = data["correctness"]
    complete = checks and not data["checks_note"] and all(r.get("status") != "not-run" for r in checks)
    failed = any(r.get("status") in ("fail", "error") for r in checks)
    return bool(complete) and not failed and not any("error" in r for r in data["results"]) and not data["stopped"]


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it: a kill never leaves half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _metadata(args, argv: list) -> dict:
    """Device, versions, commit and command (``fastpeft.bench.report.metadata``), without starting CUDA here."""
    import torch

    from fastpeft.bench.report import metadata

    device = torch.device("cpu" if args.dry_run else "cuda")
    # described as a CPU run with the timing groups' clock (each group's rounds are in its own rows), then the
    # device corrected below
    described = types.SimpleNamespace(device=torch.device("cpu"), clock="wall", repeats=None)
    meta = metadata(described, ["python3", "-m", "bench.gpu_accept", *argv], None)
    if device.type == "cuda":
        # the name from nvidia-smi: torch.cuda would hold a CUDA context in this process for the whole run
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=30)
            meta["device"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 else "CUDA GPU"
        except (OSError, subprocess.TimeoutExpired, IndexError):
            meta["device"] = "CUDA GPU"
        meta["device_kind"] = "cuda"
        meta["clock"] = "cuda-events"
    return meta


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m bench.gpu_accept", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="result folder (empty or absent; at most 8 files land there)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds for the checks and the timings together (default 420)")
    parser.add_argument("--checks-budget-s", type=float, default=None,
                        help=f"seconds for the correctness pass (default: 3/7 of the budget, at most "
                             f"{CHECKS_BUDGET_MAX_S:.0f})")
    parser.add_argument("--shards", type=int, default=None,
                        help="processes the correctness pass is split over (default 5: two each of its ten units of "
                             "checks; 1 with --dry-run)")
    parser.add_argument("--groups", type=lambda text: [g for g in text.split(",") if g],
                        help="only these timing groups, comma-separated (default: all, in priority order)")
    parser.add_argument("--grace-s", type=float, default=20.0,
                        help="seconds a child may run past its budget (finishing its check or subgroup) before it "
                             "is killed (default 20)")
    parser.add_argument("--bnb-wheel", help=f"a bitsandbytes wheel to install (default: {WHEEL_GLOB})")
    parser.add_argument("--no-bnb", action="store_true",
                        help="hide bitsandbytes from the run even where installed (its comparisons are skipped)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: tests the driver, measures nothing")
    return parser


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.budget_s <= 0:
        raise SystemExit(f"gpu_accept: --budget-s must be positive, got {args.budget_s}")
    if args.checks_budget_s is None:
        args.checks_budget_s = min(CHECKS_BUDGET_MAX_S, args.budget_s * 3 / 7)
    if args.shards is None:
        args.shards = 1 if args.dry_run else 5
    if args.shards < 1:
        raise SystemExit(f"gpu_accept: --shards must be at least 1, got {args.shards}")
    from bench.gpu_timings import GROUPS

    unknown = sorted(set(args.groups or ()) - set(GROUPS))
    if unknown:
        raise SystemExit(f"gpu_accept: unknown timing groups {unknown}; the groups: {', '.join(GROUPS)}")
    args.groups = args.groups or list(GROUPS)
    return Run(args, argv).run()


if __name__ == "__main__":
    sys.exit(main())
