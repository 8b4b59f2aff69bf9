"""`harness run | validate | report | list`: the command-line front door.

Errors the user can fix (UserError) print one line and exit 2; Ctrl-C exits 130
after saying that finished work is kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a suite, then render its report")
    run.add_argument("suite", help="suite YAML file, e.g. suites/pg19.yaml")
    run.add_argument("--out", help="results/report directory (default reports/<suite name>)")
    run.add_argument("--pg19", help="PG-19 root directory (overrides the suite and $HARNESS_PG19_DIR)")
    run.add_argument("--dry-run", action="store_true", help="list the cells and what is already done")
    val = sub.add_parser("validate", help="check a suite file")
    val.add_argument("suite")
    rep = sub.add_parser("report", help="render the HTML report of a results directory")
    rep.add_argument("dir")
    cmp = sub.add_parser("compare", help="regression gate: compare HEAD results against BASE, exit 1 on regression")
    cmp.add_argument("base")
    cmp.add_argument("head")
    cmp.add_argument("--ppl-rtol", type=float, default=0.005, help="allowed relative perplexity rise")
    cmp.add_argument("--time-ratio", type=float, default=1.10, help="allowed median time ratio")
    cmp.add_argument("--memory-ratio", type=float, default=1.05, help="allowed peak memory ratio")
    cmp.add_argument("--alpha", type=float, default=0.05, help="significance level of the statistical tests")
    cmp.add_argument("--summary", help="also write the markdown summary to this file (e.g. $GITHUB_STEP_SUMMARY)")
    sub.add_parser("list", help="list model presets, methods, backends and suites")
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished cells and artefacts are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from harness.suite import load_suite

    if args.command == "validate":
        suite = load_suite(args.suite)
        print(f"{args.suite}: ok (suite {suite.name!r})")
    elif args.command == "run":
        from harness.runner import run_suite

        suite = load_suite(args.suite)
        out = Path(args.out or Path("reports") / suite.name)
        report = run_suite(suite, out, pg19=args.pg19, dry_run=args.dry_run)
        if report:
            print(f"report: {report.resolve()}")
    elif args.command == "report":
        from harness import results
        from harness.report import render_report

        path = render_report(results.load(args.dir), args.dir, title=f"Results in {args.dir}")
        print(f"report: {Path(path).resolve()}")
    elif args.command == "compare":
        from harness import results
        from harness.report.compare import Thresholds, compare, markdown

        th = Thresholds(ppl_rtol=args.ppl_rtol, time_ratio=args.time_ratio, memory_ratio=args.memory_ratio,
                        alpha=args.alpha)
        findings = compare(results.load(args.base), results.load(args.head), th)
        text = markdown(findings, args.base, args.head)
        print(text)
        if args.summary:
            with open(args.summary, "a") as f:
                f.write(text)
        return 1 if any(f.verdict == "regression" for f in findings) else 0
    elif args.command == "list":
        from harness.finetune.methods import METHODS
        from harness.models import PRESETS

        print("model presets:", ", ".join(PRESETS))
        print("methods:", ", ".join(METHODS))
        print("backends: full")
        print("suites:", ", ".join(str(p) for p in sorted(Path("suites").glob("*.yaml"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
