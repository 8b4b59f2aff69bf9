"""How far the timing gate can be trusted on this machine: false-positive and detection rates over repeated runs.

    python benchmarks/gate.py [--runs 10] [--only '*efficiency@[124]*'] [--out reports/gate-bench]

Before (stored baseline, `harness compare A B` of two separate `harness run`s of the efficiency suite):
consecutive runs r0..rN of unchanged code, A/A pairs (r_i, r_i+1); then N runs with the full backend slowed down
(benchmarks/slow_attention.py as a suite plugin), each against r_i. After (`harness compare --rev`/`--calibrate`, both
sides timed interleaved in one job): N A/A compares of the working tree against itself, and N with the slowed-down
full backend on the head side only. A false positive is a timing verdict other than "ok" in an A/A compare; a
detection is a run whose full-backend cells are all flagged as regressions and no other cell is flagged.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from harness import results
from harness.report.compare import Thresholds, compare
from harness.timing.interleave import REPO, Settings, interleaved, suite_cells

SUITE = REPO / "suites" / "efficiency.yaml"
SLOW = "benchmarks.slow_attention"


def _rates(runs: list[dict[str, str]], aa: bool) -> str:
    cells = sum(len(r) for r in runs)
    if aa:
        flagged = sum(v != "ok" for r in runs for v in r.values())
        return f"{flagged} of {cells} cells flagged ({100 * flagged / cells:.1f}%) over {len(runs)} runs"
    hits = sum(all((v == "regression") == ("/full/" in c) for c, v in r.items()) for r in runs)
    full = [v for r in runs for c, v in r.items() if "/full/" in c]
    others = [v for r in runs for c, v in r.items() if "/full/" not in c]
    return (f"{hits} of {len(runs)} runs detect exactly the slowed backend; full cells flagged "
            f"{sum(v == 'regression' for v in full)}/{len(full)}, other cells flagged "
            f"{sum(v != 'ok' for v in others)}/{len(others)}")


def before(runs: int, only: str, out: Path) -> tuple[list, list, float]:
    def run(name: str, suite: Path) -> Path:
        d = out / name
        subprocess.run([sys.executable, "-m", "harness.cli", "run", str(suite), "--out", str(d), "--only", only],
                       check=True, cwd=REPO, capture_output=True)
        return d

    def verdicts(a: Path, b: Path) -> dict[str, str]:
        return {f.cell: f.verdict for f in compare(results.load(a), results.load(b), Thresholds())
                if f.metric.startswith("time")}

    slow_suite = out / "efficiency-slow.yaml"
    slow_suite.write_text(SUITE.read_text().replace("name: efficiency", f"name: efficiency\nplugins: [{SLOW}]"))
    t0 = time.perf_counter()
    plain = [run(f"r{i}", SUITE) for i in range(runs + 1)]
    wall = (time.perf_counter() - t0) / (runs + 1)
    aa = [verdicts(plain[i], plain[i + 1]) for i in range(runs)]
    slowed = [verdicts(plain[i], run(f"s{i}", slow_suite)) for i in range(runs)]
    return aa, slowed, wall


def after(runs: int, only: str, aa: bool = True) -> tuple[list, list, float]:
    cells, s = suite_cells(SUITE, only), Settings()

    def once(inject: str | None) -> dict[str, str]:
        return {t.cell.id: t.judge(s).verdict for t in interleaved(REPO, REPO, cells, s, inject, progress=lambda _: 0)}

    t0 = time.perf_counter()
    same = [once(None) for _ in range(runs if aa else 0)]
    slowed = [once(SLOW) for _ in range(runs)]
    return same, slowed, (time.perf_counter() - t0) / (len(same) + runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--only", default="*", help="glob over the efficiency cell ids")
    p.add_argument("--out", default="reports/gate-bench", help="where the before-method runs go")
    p.add_argument("--skip-before", action="store_true")
    p.add_argument("--skip-aa", action="store_true", help="after: only the runs with the slowed-down backend")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"cells: {[c.id for c in suite_cells(SUITE, args.only)]}", flush=True)
    if not args.skip_before:
        aa, slowed, wall = before(args.runs, args.only, out)
        print(f"before (stored baseline): A/A {_rates(aa, True)}; 25% slower full: {_rates(slowed, False)}; "
              f"{wall:.0f} s per suite run", flush=True)
    aa, slowed, wall = after(args.runs, args.only, aa=not args.skip_aa)
    print("after (interleaved): " + (f"A/A {_rates(aa, True)}; " if aa else "")
          + f"25% slower full: {_rates(slowed, False)}; {wall:.0f} s per compare", flush=True)


if __name__ == "__main__":
    main()
