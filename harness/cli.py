"""`harness run | validate | report | compare | export | check | list | cache | bench`: the command-line front door.

Errors the user can fix (UserError) print one line and exit 2; Ctrl-C (or SIGTERM) exits 130
after saying that finished work is kept; a bug (any other exception) prints its traceback and exits 3, so that
a CI gate tells it from a regression (exit 1).
"""

from __future__ import annotations

import argparse
import fnmatch
import signal
import sys
from dataclasses import replace
from pathlib import Path

from harness import arguments as arg
from harness.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a suite, then render its report")
    run.add_argument("suite", help="suite YAML file, e.g. suites/pg19.yaml")
    run.add_argument("--out", type=arg.directory, help="results/report directory (default reports/<suite name>)")
    run.add_argument("--pg19", type=arg.existing_directory,
                     help="PG-19 root directory (overrides the suite and $HARNESS_PG19_DIR)")
    run.add_argument("--dry-run", action="store_true", help="list the cells and what is already done")
    run.add_argument("--only", metavar="PATTERN", help="run only cells whose id matches this glob, e.g. '*ppl@2048'")
    run.add_argument("--retry-failed", action="store_true", help="rerun cells recorded as oom/timeout/error")
    run.add_argument("--status", action="store_true", help="list the suite's jobs: cells done, latest attempt's state")
    scale = run.add_argument_group("where jobs run (override the suite's `run` block)")
    scale.add_argument("--executor", choices=["local", "submitit-local", "slurm"])
    scale.add_argument("--max-parallel", type=arg.positive_int, help="jobs at once")
    scale.add_argument("--nproc", type=arg.positive_int, help="processes per fine-tune and evaluation (torchrun)")
    scale.add_argument("--strategy", choices=["ddp", "fsdp"], help="how a multi-process fine-tune shards")
    scale.add_argument("--partition", help="Slurm partition")
    scale.add_argument("--account", help="Slurm account")
    scale.add_argument("--gpus-per-node", type=arg.non_negative_int, help="Slurm GPUs per job")
    scale.add_argument("--cpus-per-task", type=arg.positive_int, help="Slurm CPUs per job")
    scale.add_argument("--time-min", type=arg.positive_int, help="Slurm time limit per job, minutes")
    val = sub.add_parser("validate", help="check a suite file, and that it can run here (data, checkpoints, lengths)")
    val.add_argument("suite", help="suite YAML file, e.g. suites/ablation.yaml")
    rep = sub.add_parser("report", help="render the HTML report of results directories (several: a comparison)")
    rep.add_argument("dirs", nargs="+", help="results directories; the first is the base of a comparison")
    rep.add_argument("--out", type=arg.directory,
                     help="where to write index.html (default: the only directory, or reports/compare)")
    cmp = sub.add_parser("compare", help="regression gate: HEAD results against BASE (or timing against a git "
                                         "revision with --rev), exit 1 on regression")
    cmp.add_argument("dirs", nargs="*", metavar="BASE HEAD", help="two results directories (not with --rev)")
    cmp.add_argument("--ppl-rtol", type=float, help="allowed relative perplexity rise (default 0.005; not with --rev)")
    cmp.add_argument("--time-ratio", type=float, default=1.10, help="allowed median time ratio (default 1.10)")
    cmp.add_argument("--memory-ratio", type=float, help="allowed peak memory ratio (default 1.05; not with --rev)")
    cmp.add_argument("--alpha", type=float, help="significance level (default 0.05; with --rev/--calibrate 0.002)")
    cmp.add_argument("--summary", type=arg.new_file_in_existing_directory,
                     help="also append the markdown summary to this file (e.g. $GITHUB_STEP_SUMMARY)")
    cmp.add_argument("--rev", help="time the suite's efficiency cells on this git revision and on the working tree, "
                                   "interleaved in one job")
    cmp.add_argument("--calibrate", action="store_true",
                     help="time the working tree against itself: false-positive rate and smallest detectable slowdown")
    cmp.add_argument("--suite", help="with --rev/--calibrate: the suite whose efficiency cells are timed "
                                     "(default suites/efficiency.yaml)")
    cmp.add_argument("--only", metavar="PATTERN", help="only cells whose id matches (a glob)")
    cmp.add_argument("--min-repeats", type=arg.positive_int,
                     help="with --rev/--calibrate: samples per side, at least (default 20)")
    cmp.add_argument("--min-seconds", type=float,
                     help="with --rev/--calibrate: timed seconds per side, at least (default 1.0)")
    cmp.add_argument("--fail-on-time", action="store_true",
                     help="let timings measured on CPU fail the gate (CUDA ones do)")
    cmp.add_argument("--inject", help=argparse.SUPPRESS)  # tests: a module imported into head's timing worker
    exp = sub.add_parser("export", help="write a fine-tuned variant of a run as base + PEFT adapter (or merged)")
    exp.add_argument("run_dir", type=Path, help="the run's results directory")
    exp.add_argument("variant", help="the variant's id, e.g. tiny-hybrid/seed0/lora/full, or its first segments "
                                    "where only one variant begins so")
    exp.add_argument("out_dir", type=arg.directory, help="a new directory")
    exp.add_argument("--merge", action="store_true", help="fold the adapter in: one model directory")
    check = sub.add_parser("check", help="`check gpu`: the GPU tests, attention at 32 heads x 128 and a fine-tune "
                                         "per backend and method, on a CUDA machine (harness.gpu_check)")
    check.add_argument("what", choices=["gpu"])
    check.add_argument("--out", type=arg.directory, default=Path("reports/gpu-check"),
                       help="where the results and gpu-check.{json,md} go (default reports/gpu-check)")
    sub.add_parser("list", help="list model presets, named checkpoints, methods, attention backends (with "
                                  "options), metrics, RULER tasks and suites")
    cache_p = sub.add_parser("cache", help="inspect or clean the artefact cache")
    cache_p.add_argument("action", choices=["ls", "rm"])
    cache_p.add_argument("keys", nargs="*", help="keys (or key prefixes): with ls, the entries to list (default all); "
                                                 "with rm, those to remove")
    cache_p.add_argument("--all", action="store_true",
                         help="with rm: remove every entry, and every training checkpoint no build is using")
    bench = sub.add_parser("bench", help="micro-benchmarks")
    bench.add_argument("what", choices=["attention"])
    bench.add_argument("--backends", type=arg.backend_names, default="full,sliding_window,s2_attn,se_attn",
                       help="comma-separated backend names (default options)")
    bench.add_argument("--lengths", type=arg.positive_ints, default="1024,4096",
                       help="comma-separated lengths (default 1024,4096)")
    bench.add_argument("--heads", type=arg.positive_int, default=4, help="attention heads (default 4)")
    bench.add_argument("--head-dim", type=arg.positive_int, default=32, help="dimension per head (default 32)")
    bench.add_argument("--repeats", type=arg.positive_int, default=5, help="timed runs (default 5)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` ends a run like Ctrl-C: child jobs stopped, work kept
    try:
        return _dispatch(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished cells and artefacts are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - a bug: its traceback, and an exit code no verdict uses
        import traceback

        traceback.print_exc()
        print("error: the harness failed unexpectedly (a bug; the traceback is above)", file=sys.stderr)
        return 3


def _run_overrides(args: argparse.Namespace) -> dict:
    """The `run` settings given on the command line (harness.suite.load_suite merges them)."""
    top = {k: getattr(args, k) for k in ("executor", "max_parallel", "nproc", "strategy")}
    slurm = {k: getattr(args, k) for k in ("partition", "account", "gpus_per_node", "cpus_per_task", "time_min")}
    out = {k: v for k, v in top.items() if v is not None}
    if slurm := {k: v for k, v in slurm.items() if v is not None}:
        out["slurm"] = slurm
    return out


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "validate":
        from harness.runner import prepare

        p = prepare(args.suite, dry_run=True)  # what `run` checks before its jobs: data, checkpoints, lengths
        if p.missing:
            raise UserError(f"{args.suite}: missing on this machine: {', '.join(p.missing)} (said above); the "
                            "suite is valid, but a run here would stop there")
        cells = sum(len(j.cells) for j in p.jobs)
        print(f"{args.suite}: ok (suite {p.suite.name!r}: {cells} cells in {len(p.jobs)} jobs)")
    elif args.command == "run":
        from harness.runner import run_suite

        if args.status and args.dry_run:
            raise UserError("run: --status lists the jobs and their latest attempts, --dry-run the cells and what is "
                            "done; give one of them")
        outcome = run_suite(args.suite, args.out, pg19=args.pg19, dry_run=args.dry_run, only=args.only,
                            retry_failed=args.retry_failed, run=_run_overrides(args), status=args.status)
        if outcome:
            print(f"report: {outcome.report.resolve()}")
        if outcome and outcome.failed:
            n = sum(outcome.failed.values())
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(outcome.failed.items()))
            print(f"error: {n} of {outcome.cells} cells failed ({kinds}); their errors are in the report's "
                  f"\"Failed cells\" section and in {outcome.report.parent / 'results.jsonl'}; after a fix, rerun "
                  "with --retry-failed", file=sys.stderr)
            return 1
    elif args.command == "check":
        from harness.gpu_check import check_gpu

        return check_gpu(Path(args.out))
    elif args.command == "report":
        from harness import results
        from harness.report import render_report

        if len(args.dirs) == 1:
            out, runs, records = args.out or args.dirs[0], None, results.load(args.dirs[0])
        else:
            runs = [Path(d).name or str(d) for d in args.dirs]
            if len(set(runs)) != len(runs):
                runs = [str(d) for d in args.dirs]
            loaded = [results.load(d) for d in args.dirs]
            if empty := [d for d, recs in zip(args.dirs, loaded, strict=True) if not recs]:
                raise UserError(f"{empty[0]}/{results.RESULTS_FILE} holds no records: a run with nothing measured "
                                "cannot be compared (the first directory is the base); leave it out")
            records = [replace(r, run=run) for recs, run in zip(loaded, runs, strict=True) for r in recs]
            out = args.out or "reports/compare"
        path = render_report(records, out, title=f"Results: {', '.join(args.dirs)}", runs=runs)
        print(f"report: {Path(path).resolve()}")
    elif args.command == "compare" and (args.rev or args.calibrate):
        from harness.timing.gate import default_suite, timing_gate
        from harness.timing.interleave import Settings

        if args.dirs or (args.rev and args.calibrate):
            raise UserError("compare: --rev REV times against a revision, --calibrate against itself; neither takes "
                            "results directories, and they do not go together")
        if stored := [f for f, v in (("--ppl-rtol", args.ppl_rtol), ("--memory-ratio", args.memory_ratio))
                      if v is not None]:
            raise UserError(f"compare: {', '.join(stored)} judge stored records (BASE HEAD); --rev and --calibrate "
                            "time attention only: drop them")
        given = {"min_repeats": args.min_repeats, "min_seconds": args.min_seconds, "alpha": args.alpha}
        s = Settings(time_ratio=args.time_ratio, **{k: v for k, v in given.items() if v is not None})  # else its own
        return timing_gate(args.rev, args.suite or default_suite(), s, calibrate=args.calibrate,
                           fail_on_time=args.fail_on_time, only=args.only, summary=args.summary, inject=args.inject)
    elif args.command == "compare":
        from harness import results
        from harness.report.compare import Thresholds, compare, failed, markdown

        if len(args.dirs) != 2:
            raise UserError(f"compare: give two results directories, BASE HEAD (got {len(args.dirs)}), or --rev REV")
        if timing := [f for f, v in (("--suite", args.suite), ("--min-repeats", args.min_repeats),
                                     ("--min-seconds", args.min_seconds)) if v is not None]:
            raise UserError(f"compare: {', '.join(timing)} go with --rev or --calibrate, which time the suite anew; "
                            "BASE HEAD compares the records the two directories hold: drop them")
        given = {"ppl_rtol": args.ppl_rtol, "memory_ratio": args.memory_ratio, "alpha": args.alpha}
        th = Thresholds(time_ratio=args.time_ratio, **{k: v for k, v in given.items() if v is not None})
        base, head = args.dirs
        findings = compare(*(_matching(results.load(d), args.only) for d in (base, head)), th)
        if args.only and not findings:
            raise UserError(f"compare: --only {args.only!r} matches no cell of {base} or {head}")
        if not any(f.verdict != "skipped" for f in findings):
            raise UserError(f"compare: nothing was compared ({len(findings)} skipped): {base} has no ok record "
                            f"of a cell that {head} measured with the same settings; a gate that compares "
                            "nothing cannot pass")
        text = markdown(findings, base, head, args.fail_on_time)
        print(text)
        if args.summary:
            with open(args.summary, "a") as f:
                f.write(text)
        return 1 if failed(findings, args.fail_on_time) else 0
    elif args.command == "export":
        from harness.export import export

        out = export(args.run_dir, args.variant, Path(args.out_dir), merge=args.merge)
        print(f"exported {args.variant} to {out}" + (" (base/ and adapter/)" if (out / "adapter").is_dir() else
                                                     " (one model directory)"))
    elif args.command == "list":
        from harness.attention import available
        from harness.data.ruler import PAPER_TASKS, TASKS
        from harness.finetune.methods import METHODS
        from harness.models.presets import PRETRAINABLE
        from harness.models.sources import NAMED

        print("model presets (the harness pretrains them):", ", ".join(PRETRAINABLE))
        print("named checkpoints:", ", ".join(f"{k} ({v['path']})" for k, v in NAMED.items()))
        print("methods:", ", ".join(METHODS))
        print("attention backends:")
        for name, b in available().items():
            opts = ", ".join(f"{k}={v['default']}" for k, v in b["options"].items())
            print(f"  {name}: {b['description']} [{opts}]")
        from harness.metrics.base import builtin

        print("metrics:", ", ".join(name for name, m in builtin().items() if m.config is not None),
              "(keys of a suite's `metrics:`; a metric of your own through `plugins:`)")
        opt_in = [t for t in TASKS if t not in PAPER_TASKS]
        print("ruler tasks:", ", ".join(PAPER_TASKS), "(`all`); opt-in, with their data in `qa_files`:",
              ", ".join(opt_in))
        suites = sorted(Path("suites").glob("*.yaml"))  # relative, as `harness run` takes them, from the checkout
        print("suites:", ", ".join(map(str, suites)) if suites else
              "none in suites/*.yaml here; the shipped ones are in the checkout's suites/ (run from there)")
    elif args.command == "cache":
        _cache(args)
    elif args.command == "bench":
        from harness.attention.bench import bench_attention, format_rows

        rows = bench_attention([(b, {}) for b in args.backends], args.lengths, heads=args.heads,
                               head_dim=args.head_dim, repeats=args.repeats)
        print(format_rows(rows))
    return 0


def _matching(records: list, only: str | None) -> list:
    return [r for r in records if only is None or fnmatch.fnmatch(r.cell, only)]


def _cache(args: argparse.Namespace) -> None:
    from harness import cache

    if args.all and args.action == "ls":
        raise UserError("cache ls: --all is for `cache rm`; `cache ls` lists every entry, `cache ls KEY` the "
                        "entries of that key (or prefix)")
    if args.all and args.keys:
        raise UserError("cache rm: name keys (or prefixes) to remove, or pass --all for every entry, not both")
    if any(not k.strip() for k in args.keys):
        raise UserError(f"cache {args.action}: an empty key would match every entry; name keys (or prefixes)"
                        + (", or pass --all" if args.action == "rm" else ""))

    def chosen(entries: list[dict]) -> list[dict]:
        return [e for e in entries if not args.keys or any(e["key"].startswith(k) for k in args.keys)]

    entries, work = chosen(cache.entries()), chosen(cache.work_dirs())
    if args.action == "ls":
        print(f"cache: {cache.cache_root()}")
        for e in entries:
            print(f"  {e['kind']:<11} {e['key']}  {e['size_mib']:8.1f} MiB  {e['created']}  {e['what']}")
        for u in chosen(cache.unfinished()):
            state = {True: "building", False: "killed; the next build of this key here removes it",
                     None: "on another host: remove it by hand if that build is not running"}[u["alive"]]
            print(f"  {u['kind']:<11} {u['key']}  {u['size_mib']:8.1f} MiB  unfinished build (pid {u['pid']} on "
                  f"{u['host']}, {state}): {u['path']}")
        for w in work:
            state = "a build is using it" if w["busy"] else "the next build of this key resumes from it"
            print(f"  {w['kind']:<11} {w['key']}  {w['size_mib']:8.1f} MiB  training checkpoint ({state}): "
                  f"{w['path']}")
        return
    if not args.all and not args.keys:
        raise UserError("cache rm: name keys (or prefixes) to remove, or --all")
    if not entries and not work:
        raise UserError(f"cache rm: no entry matches {' '.join(args.keys)}; see `harness cache ls`")
    for e in entries:
        if cache.remove(e):
            print(f"removed {e['kind']}/{e['key']}")
        else:
            print(f"kept {e['kind']}/{e['key']}: a build of it is running (it rebuilds a damaged entry)")
    for w in work:
        if cache.remove(w):
            print(f"removed {w['kind']}/{w['key']}'s training checkpoint ({w['size_mib']:.1f} MiB)")
        else:
            print(f"kept {w['kind']}/{w['key']}'s training checkpoint: a build is using it")


if __name__ == "__main__":
    sys.exit(main())
