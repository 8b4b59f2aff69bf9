"""Base and head timed in one job, alternately, on the same device: `harness compare --rev BASE`.

The base revision is checked out in a temporary git worktree; one worker process per tree (worker.py, with
that tree on PYTHONPATH) holds the attention call of a cell, warmed up, and times one forward+backward on request.
The coordinator asks them in turn, A B then B A, so drift of the machine (clocks, other load) falls on both sides
alike, until each side has `min_repeats` samples and `min_seconds` of timed work. Then `judge` applies the rules:
a regression needs the median ratio above `time_ratio` AND the rank test at `alpha`.

Defaults and why: 20 samples per side at least (with 5, the smallest p a rank test can reach is about 0.004-0.02,
so any drift passed as significant); alpha 0.002 (16 cells per run at 0.05 would cry wolf in over half the runs);
a median ratio of 1.10 (smaller changes are within what one machine drifts by in a CI job); one untimed call
before each sample (on the 2-core CPU machine the first call after the other worker ran took 11 ms against 7.3 ms
warm, for full attention at 1024: half the samples cold made both sides bimodal, and their medians jumped between
the modes, so a 25% slowdown read anywhere from 1.02 to 1.33).
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import UserError
from harness.timing.stats import mann_whitney, median_ratio_interval

WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[2]  # the checkout this harness runs from: the head side


@dataclass(frozen=True)
class Settings:
    min_repeats: int = 20  # samples per side, at least
    min_seconds: float = 1.0  # timed seconds per side, at least
    max_repeats: int = 400  # per side, at most (a cell of microseconds reaches min_seconds late)
    warmup: int = 2  # untimed calls per side before the first sample (one at least: it names the kernel that ran)
    rewarm: int = 1  # untimed calls per side before each sample (the other side ran in between)
    alpha: float = 0.002  # the rank test's level
    time_ratio: float = 1.10  # the median ratio a regression must exceed

    def __post_init__(self) -> None:
        rules = {"min_repeats": (lambda x: 3 <= x <= self.max_repeats, f"between 3 and {self.max_repeats}"),
                 "min_seconds": (lambda x: x >= 0, ">= 0"), "max_repeats": (lambda x: x >= 3, ">= 3"),
                 "warmup": (lambda x: x >= 1, ">= 1"), "rewarm": (lambda x: x >= 0, ">= 0"),
                 "alpha": (lambda x: 0 < x < 1, "in (0, 1)"),
                 "time_ratio": (lambda x: 1 <= x < math.inf, ">= 1 and finite")}
        flags = {"min_repeats": "--min-repeats", "min_seconds": "--min-seconds", "alpha": "--alpha",
                 "time_ratio": "--time-ratio"}  # those `harness compare` sets: a bad value names its flag
        if bad := [name for name, (ok, _) in rules.items() if not ok(getattr(self, name))]:
            raise UserError("timing settings out of range: " + "; ".join(
                f"{name}{f' ({flags[name]})' if name in flags else ''} = {getattr(self, name)!r}: must be "
                f"{rules[name][1]}" for name in bad))


@dataclass(frozen=True)
class Cell:
    backend: str  # name
    options: dict
    label: str
    length: int
    heads: int
    head_dim: int
    batch: int

    @property
    def id(self) -> str:
        return f"attention/{self.label}/efficiency@{self.length}"


@dataclass
class Timing:
    cell: Cell
    base_s: list[float] = field(default_factory=list)
    head_s: list[float] = field(default_factory=list)
    kernels: tuple[str, str] = ("", "")

    def judge(self, s: Settings) -> Verdict:
        return judge(self.base_s, self.head_s, s)


@dataclass(frozen=True)
class Verdict:
    verdict: str  # regression | improvement | ok
    ratio: float  # median(head) / median(base)
    interval: tuple[float, float]  # 95% bootstrap interval of the ratio
    p: float  # the rank test's one-sided p in the direction of the change


def judge(base: list[float], head: list[float], s: Settings) -> Verdict:
    ratio = statistics.median(head) / statistics.median(base)
    _, p_slower = mann_whitney(base, head)
    _, p_faster = mann_whitney(head, base)
    if ratio > s.time_ratio and p_slower < s.alpha:
        verdict = "regression"
    elif ratio * s.time_ratio < 1 and p_faster < s.alpha:
        verdict = "improvement"
    else:
        verdict = "ok"
    return Verdict(verdict, ratio, median_ratio_interval(base, head), p_slower if ratio >= 1 else p_faster)


def smallest_detectable(base: list[float], head: list[float], s: Settings) -> float | None:
    """The smallest slowdown (0.01 = 1%) that `judge` flags when added to head's samples of an A/A pair."""
    for pct in range(1, 201):
        if judge(base, [x * (1 + pct / 100) for x in head], s).verdict == "regression":
            return pct / 100
    return None


def suite_cells(suite_path: str | Path, only: str | None = None) -> list[Cell]:
    """The efficiency cells of a suite (its backends x `metrics.efficiency` lengths)."""
    from harness.suite import load_suite

    suite = load_suite(suite_path)
    eff = getattr(suite.metrics, "efficiency", None)
    if eff is None:
        raise UserError(f"{suite_path}: no metrics.efficiency block: timing compares efficiency cells")
    cells = [Cell(b.name, b.options, b.label, n, eff.heads, eff.head_dim, eff.batch)
             for b in suite.backends for n in eff.lengths]
    cells = [c for c in cells if only is None or fnmatch.fnmatch(c.id, only)]
    if not cells:
        raise UserError(f"--only {only!r} matches none of {suite_path}'s efficiency cells")
    return cells


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A temporary checkout of `rev` of this repository."""
    git = ["git", "-C", str(REPO)]
    if subprocess.run([*git, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], capture_output=True).returncode:
        raise UserError(f"--rev {rev}: not a commit of {REPO} (a branch, tag or sha; fetch it first)")
    with tempfile.TemporaryDirectory(prefix="harness-base-") as tmp:
        path = Path(tmp) / "tree"
        added = subprocess.run([*git, "worktree", "add", "--detach", "--quiet", str(path), rev], capture_output=True,
                               text=True)
        if added.returncode:
            raise UserError(f"--rev {rev}: git could not check it out into {path}: {added.stderr.strip()[-500:]}")
        try:
            yield path
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(path)], capture_output=True)


class Worker:
    """A worker process timing attention with the code of `tree`."""

    def __init__(self, tree: Path, inject: str | None = None):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], cwd=tree, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        if inject:
            self.ask({"inject": inject})

    def ask(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"timing worker exited with code {self.proc.wait()} (its error is above)")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def interleaved(base_tree: Path, head_tree: Path, cells: list[Cell], s: Settings, inject: str | None = None,
                progress=print) -> list[Timing]:
    """Time every cell on base and head alternately (A B, B A, ...); `inject` is imported into head's worker."""
    import torch

    from harness.attention import Backend
    from harness.attention.bench import draw_choices

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    base, head = Worker(base_tree), Worker(head_tree, inject)
    out = []
    try:
        for cell in cells:
            setup = {"backend": cell.backend, "options": cell.options,
                     "draws": draw_choices(Backend(cell.backend, **cell.options)), "length": cell.length,
                     "heads": cell.heads, "head_dim": cell.head_dim, "batch": cell.batch, "dtype": dtype,
                     "device": device, "warmup": s.warmup, "seed": 0}
            t = Timing(cell, kernels=(base.ask({"setup": setup})["kernel"], head.ask({"setup": setup})["kernel"]))
            sides = [(base, t.base_s), (head, t.head_s)]
            while len(t.base_s) < s.max_repeats and (
                    min(len(t.base_s), len(t.head_s)) < s.min_repeats
                    or min(sum(t.base_s), sum(t.head_s)) < s.min_seconds):
                for worker, samples in sides:
                    samples += worker.ask({"time": 1, "rewarm": s.rewarm})["seconds"]
                sides.reverse()  # A B then B A: drift within a pair falls on both sides
            out.append(t)
            v = t.judge(s)
            progress(f"  {cell.id}: base {1e3 * statistics.median(t.base_s):.3g} ms, head "
                     f"{1e3 * statistics.median(t.head_s):.3g} ms ({len(t.base_s)} samples each), ratio "
                     f"{v.ratio:.3f} [{v.interval[0]:.3f}, {v.interval[1]:.3f}], p={v.p:.2g}: {v.verdict}")
    finally:
        base.close()
        head.close()
    return out
