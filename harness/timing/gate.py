"""`harness compare --rev BASE` and `--calibrate`: the timing gate's command and its summary."""

from __future__ import annotations

import statistics
from pathlib import Path

from harness.timing.interleave import REPO, Settings, Timing, interleaved, smallest_detectable, suite_cells, worktree


def timing_gate(rev: str | None, suite: str, s: Settings, *, calibrate: bool = False, fail_on_time: bool = False,
                only: str | None = None, summary: str | None = None, inject: str | None = None) -> int:
    """Time the suite's efficiency cells on `rev` and on this checkout, interleaved (or this checkout against
    itself with `calibrate`); print the verdicts; the exit code (1: a timing regression that gates)."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "CPU"
    cells = suite_cells(suite, only)
    print(f"timing {len(cells)} cells of {suite} on {device}: "
          + ("this checkout against itself (A/A)" if calibrate else f"{rev} (base) against this checkout (head)"))
    if calibrate:
        timings = interleaved(REPO, REPO, cells, s, inject)
    else:
        with worktree(rev) as base:
            timings = interleaved(base, REPO, cells, s, inject)
    gates = cuda or fail_on_time
    text = summarise(timings, s, "A/A calibration" if calibrate else f"{rev} → working tree", device, gates,
                     calibrate)
    print(text)
    if summary:
        with open(summary, "a") as f:
            f.write(text)
    regressed = any(t.judge(s).verdict == "regression" for t in timings)
    return 1 if regressed and gates and not calibrate else 0


def summarise(timings: list[Timing], s: Settings, title: str, device: str, gates: bool, calibrate: bool) -> str:
    verdicts = [t.judge(s) for t in timings]
    counts = {k: sum(v.verdict == k for v in verdicts) for k in ("regression", "improvement", "ok")}
    lines = [f"### harness compare: timing, {title} ({device})", "",
             " · ".join(f"{n} {k}" for k, n in counts.items()) + f" · rule: median ratio > {s.time_ratio} and "
             f"Mann-Whitney p < {s.alpha}, {s.min_repeats}+ interleaved samples per side", ""]
    if not gates and not calibrate:
        lines += ["Timed on CPU: reported, not gating (pass --fail-on-time to gate on them).", ""]
    if calibrate:
        flagged = counts["regression"] + counts["improvement"]
        found = [d for t in timings if (d := smallest_detectable(t.base_s, t.head_s, s)) is not None]
        lines += [f"False positives: {flagged} of {len(timings)} cells ({100 * flagged / len(timings):.1f}%).",
                  "Smallest slowdown the gate detects here: " + (
                      f"median {100 * statistics.median(found):.0f}%, worst {100 * max(found):.0f}% over cells"
                      if found else "none up to 200%") + ".", ""]
    lines += ["| cell | base ms | head ms | ratio [95% CI] | p | verdict |", "|---|---:|---:|---:|---:|---|"]
    for t, v in zip(timings, verdicts, strict=True):
        lines.append(f"| `{t.cell.id}` | {1e3 * statistics.median(t.base_s):.3g} | "
                     f"{1e3 * statistics.median(t.head_s):.3g} | {v.ratio:.3f} [{v.interval[0]:.3f}, "
                     f"{v.interval[1]:.3f}] | {v.p:.2g} | {v.verdict} |")
    return "\n".join(lines) + "\n"


def default_suite() -> str:
    return str(Path(REPO) / "suites" / "efficiency.yaml")
