"""Runs a suite: plan its jobs and cells (harness.plan), run each job in its own process, render the report.

Each job runs in a process of its own (harness.job; where, harness.executors: a child process, a submitit job,
a Slurm job), so a crash or an OOM kill costs one cell: the parent records it ("error"/"oom"), and starts the
job again for the cells left. A cell with no new record for `run.timeout` seconds (counted from the job's start,
not its time in a queue) is killed and recorded as "timeout". Resume: a cell is done when its current record
has its settings hash and code fingerprint (`plan.cell_state`); a failed one is kept as its result, and
`--retry-failed` reruns those.
Pretraining jobs finish before any other starts. Several GPUs: jobs run in parallel, one per `run.nproc`
devices; on Slurm, `run.max_parallel` at once (default: MAX_QUEUED).
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness import cache, results
from harness.cells import FINETUNED
from harness.errors import UserError
from harness.executors import ACTIVE, LEDGER, REFUSED, Executor, ledger, live_state, visible_gpus
from harness.models.sources import Checkpoint, check_vocabulary, meta_model, position_limit, resolve
from harness.plan import STALE, Job, cell_state, documents, evaluates, plan, to_measure
from harness.suite import Slurm, Suite, load_suite

if TYPE_CHECKING:
    from harness.data.sources import Documents


@dataclass(frozen=True)
class Outcome:
    """What a run left: the report, the number of cells planned, and how many of them have a failed current
    record, by status."""

    report: Path
    cells: int
    failed: dict[str, int]


@dataclass
class Prepared:
    """A suite planned on this machine: its jobs, the data its cells read (None where not needed, or missing in a
    dry run) and, in a dry run, what was not found."""

    suite: Suite
    jobs: list[Job]
    corpus: Documents | None
    train: Documents | None
    missing: list[str] | None


def prepare(suite_path: str | Path, pg19: str | None = None, run: dict | None = None,
            dry_run: bool = False) -> Prepared:
    """Load and plan a suite, finding the data and checkpoints it needs and checking what would fail every cell
    alike; an error names the suite file. In a dry run, what is missing is said and noted instead of raised."""
    suite = load_suite(suite_path, run)
    _used_by_executor(suite, run or {})
    for warning in suite.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    missing: list[str] | None = [] if dry_run else None  # what a dry run did not find (a run raises)
    try:
        variants = evaluates(suite)  # else only attention layers are timed: no model, no data
        corpus = _present(lambda: _readable(documents(suite, "eval", pg19)), missing, "data.eval") if variants \
            else None
        finetunes = bool(suite.methods and suite.backends) and variants
        train = _present(lambda: _readable(documents(suite, "train", pg19)), missing, "data.train") if finetunes \
            else None
        resolved = {m.name: _present(lambda m=m: resolve(m), missing, "model") for m in suite.models
                    if isinstance(m, Checkpoint) and variants}
        checkpoints = {name: getattr(r, "fingerprint", MISSING) for name, r in resolved.items()}
        jobs = plan(suite, getattr(corpus, "fingerprint", MISSING), getattr(train, "fingerprint", MISSING)
                    if finetunes else None, checkpoints)
        _check_checkpoints(suite, jobs, {name: r for name, r in resolved.items() if r is not None}, finetunes)
    except UserError as e:
        raise e if str(e).startswith(str(suite_path)) else UserError(f"{suite_path}: {suite.located(str(e))}") \
            from None
    return Prepared(suite, jobs, corpus, train, missing)


def _used_by_executor(suite: Suite, run: dict) -> None:
    """Slurm settings given on the command line that this run's executor ignores are an error, not silence
    (submitit-local takes only time_min; local none)."""
    executor = suite.run.executor
    takes = {"slurm": set(Slurm.model_fields), "submitit-local": {"time_min"}}.get(executor, set())
    if ignored := ["--" + k.replace("_", "-") for k in run.get("slurm", {}) if k not in takes]:
        raise UserError(f"{', '.join(ignored)}: Slurm settings, but this run's executor is {executor} (the suite's "
                        "run.executor, or --executor): add --executor slurm, or drop them")


def run_suite(suite_path: str | Path, out: Path | None = None, pg19: str | None = None, dry_run: bool = False,
              only: str | None = None, retry_failed: bool = False, run: dict | None = None,
              status: bool = False) -> Outcome | None:
    """Run (or with `dry_run` list, with `status` show the jobs of) a suite; `run` overrides its `run` block."""
    p = prepare(suite_path, pg19, run, dry_run)
    suite, jobs, corpus, train, missing = p.suite, p.jobs, p.corpus, p.train, p.missing
    out = Path(out or Path("reports") / suite.name)
    data = getattr(corpus, "description", "(missing)") if evaluates(suite) else None  # what cells evaluate on
    for job in jobs:
        job.cells = [c for c in job.cells if only is None or fnmatch.fnmatch(c["id"], only)]
    ids = [c["id"] for j in jobs for c in j.cells]
    if not jobs:
        raise UserError(f"{suite_path}: the suite plans no cell: its metrics measure model variants (models x seeds, "
                        "and methods x backends fine-tuned) or attention backends (backends); check `metrics`, "
                        "`methods` and `backends`")
    if not ids and only is not None:
        raise UserError(f"--only {only!r} matches none of the suite's cells; `harness run {suite_path} --dry-run` "
                        "lists their ids")
    if status:
        _print_status(jobs, out, retry_failed)
        return None
    if dry_run:
        state = _states(jobs, out, retry_failed, suite.name, data)
        for job in jobs:
            for c in job.cells:
                print(f"  {state[c['id']]:<8} {c['id']}")
        if missing:
            raise UserError(f"missing on this machine: {', '.join(missing)} (said above); a run would stop there")
        return None
    cache.check_writable()
    out.mkdir(parents=True, exist_ok=True)
    with results.exclusive(out):
        state = _states(jobs, out, retry_failed, suite.name, data)
        todo = {job.name: [c for c in job.cells if to_measure(state[c["id"]], retry_failed)] for job in jobs}
        common = {"suite": str(Path(suite_path).resolve()), "suite_sha256": suite.sha256, "suite_name": suite.name,
                  "out": str(out.resolve()),
                  "pg19": pg19, "run": suite.run.model_dump()}
        tuned = {j.spec["model"] for j in jobs if j.spec.get("stage") == FINETUNED and todo[j.name]}
        for model in tuned if train is not None else ():
            _tokenize(train, suite.model(model))
        pretrain = [j for j in jobs if j.kind == "pretrain" and todo[j.name]]
        rest = [j for j in jobs if j.kind != "pretrain" and todo[j.name]]
        _check_no_earlier_jobs_active([j.name for j in pretrain + rest], out)
        executor = Executor(suite.run, out)
        if warning := shared_cpu_warning(suite.run, visible_gpus()):
            print(warning, file=sys.stderr)
        progress = Progress(len(pretrain) + len(rest), sum(len(todo[j.name]) for j in pretrain + rest))
        try:
            for phase in (pretrain, rest):
                _run_phase([(j, todo[j.name]) for j in phase], _slots(suite.run, len(phase)), common,
                           suite.run.timeout, out, executor, progress)
        finally:
            executor.close()
        from harness.report import render_report

        report = render_report(results.load(out), out, title=f"Suite {suite.name}", notes=report_notes(suite, corpus))
    recorded = _current_records(out)
    failed = Counter(recorded[i].status for i in ids if i in recorded and recorded[i].status != "ok")
    return Outcome(report, len(ids), dict(failed))


def report_notes(suite, corpus) -> list[str]:
    """The report's callouts: the suite's warnings (harness.suite_warnings), and that the embedded corpus stood in
    for PG-19, where the suite did not choose it."""
    notes = [f"Suite warning: {w}" for w in suite.warnings]
    if corpus is None or not corpus.embedded or suite.data.eval is not None:
        return notes
    return notes + [f"PG-19 not configured: measured on the embedded corpus's held-out books "
                    f"({corpus.description}). Set HARNESS_PG19_DIR or pass --pg19 DIR to evaluate on PG-19."]


MISSING = "missing"  # the fingerprint of what a dry run could not find
MAX_QUEUED = 64  # Slurm jobs at once when run.max_parallel is not set


def _present(find, missing: list | None, what: str):
    """`find()` (data or a checkpoint). In a dry run (`missing`: the list to note it in), what is not on this
    machine is said (what is missing, how to get it) and None returned, so the cells are still listed; a run stops
    there."""
    try:
        return find()
    except UserError as e:
        if missing is None:
            raise
        print(f"missing {what}: {e}")
        missing.append(what)
        return None


def _readable(docs):
    """`docs`, once its first document has been read: a source that cannot be (a jsonl field, an encoding) stops
    the run here, before its jobs, instead of failing each of them alike."""
    next(iter(docs), None)
    return docs


def _check_checkpoints(suite, jobs: list[Job], resolved: dict, finetunes: bool) -> None:
    """A UserError, before any job, for what would fail every cell of a checkpoint alike (read from its model on
    the meta device): inputs longer than learned absolute positions cover (its cells' lengths, or the fine-tuning
    context), a tokenizer with ids the model has no embedding for, a backend or LoRA on a model without
    attention that they can reach."""
    from harness.artefacts import tokenizer
    from harness.attention.hf import uses_attention_interface
    from harness.finetune.methods import attention_targets

    for name, r in resolved.items():
        model = meta_model(r)
        if model is None:
            continue
        limit = position_limit(model)
        lengths = {c["length"] for j in jobs if j.spec.get("model") == name for c in j.cells if c.get("length")}
        over = sorted(n for n in lengths | ({suite.finetune.context} if finetunes else set())
                      if limit is not None and n > limit)
        if over:
            raise UserError(f"models.{name}: {r.model_type} has learned absolute positions for {limit} tokens, and "
                            f"the suite asks it for {', '.join(map(str, over))}; fix: keep metrics' lengths and "
                            f"finetune.context at or below {limit}, or use a model with relative positions (RoPE, "
                            "ALiBi) or none")
        check_vocabulary(r, tokenizer(suite.model(name)), model)  # the tokenizer every job and cell uses (cached)
        if not finetunes:
            continue
        others = [b.label for b in suite.backends if b.name != "full"]
        if others and not uses_attention_interface(model):
            raise UserError(f"models.{name}: {r.model_type} has no attention that goes through transformers' "
                            f"AttentionInterface, so only the `full` backend applies to it; fix: drop "
                            f"{', '.join(others)} from backends, or this model")
        if any(m != "full" for m in suite.methods):
            try:
                attention_targets(model)
            except UserError as e:
                raise UserError(f"models.{name}: {e}") from None


def _tokenize(train, model) -> None:
    """Tokenize the fine-tuning text with `model`'s tokenizer before any job (cached): text that cannot be read
    stops the run here, with its message, instead of failing every fine-tune; and jobs on several devices do not
    tokenize it side by side."""
    from harness.artefacts import tokenizer
    from harness.data.tokens import token_stream

    token_stream(tokenizer(model), train)


def _states(jobs: list[Job], out: Path, retry_failed: bool, name: str, data: str | None) -> dict[str, str]:
    """Each cell's state (plan.cell_state) against the records in `out`, with a one-line summary printed
    (`data`: what the suite's cells evaluate on; None where they evaluate nothing)."""
    recorded = _current_records(out)
    state = {c["id"]: cell_state(c, recorded.get(c["id"])) for j in jobs for c in j.cells}
    counts = Counter(state.values())
    failed = "measured again: --retry-failed" if retry_failed else "kept; --retry-failed measures them again"
    timed = sorted({c["hardware"] for j in jobs for c in j.cells if c.get("hardware")})
    print(f"suite {name}: {len(state)} cells in {sum(1 for j in jobs if j.cells)} jobs, {counts['done']} already "
          "recorded"
          + (f", {counts['failed']} failed ({failed})" if counts["failed"] else "")
          + "".join(f", {counts[s]} {why}" for s, why in STALE.items() if counts[s])
          + (f"; evaluating on {data}" if data else "")
          + "".join(f"; timing on {hw}" for hw in timed) + f"; results in {out}")
    return state


def _current_records(out: Path) -> dict[str, results.Record]:
    if not (out / results.RESULTS_FILE).is_file():
        return {}
    return {r.cell: r for r in results.current(results.load(out))}


def _print_status(jobs: list[Job], out: Path, retry_failed: bool) -> None:
    """Each job with a cell in the plan (`--only` may leave a job none): how many of its cells are done, and its
    latest attempt (OUT/jobs.jsonl) now."""
    recorded, attempts = _current_records(out), ledger(out)
    for job in (j for j in jobs if j.cells):
        states = Counter(cell_state(c, recorded.get(c["id"])) for c in job.cells)
        entry = attempts.get(job.name)
        seen = f"{entry['executor']} {entry['id']} {live_state(entry, out)}" if entry else "never started"
        todo = any(to_measure(state, retry_failed) for state in states)
        mark = "todo" if todo else "failed" if states["failed"] else "done"
        failed = f", {states['failed']} failed" if states["failed"] else ""
        print(f"  {mark:<6} {states['done']:>3}/{len(job.cells):<3} {job.name:<40} {seen}{failed}")


def _check_no_earlier_jobs_active(names: list[str], out: Path) -> None:
    """Refuse to start jobs whose earlier attempt (a runner that was killed, say) is still queued or running:
    both would measure the same cells."""
    attempts = {n: e for n, e in ledger(out).items() if e["executor"] != "local"}  # local ones die with their runner
    states = {n: live_state(attempts[n], out).split()[0] for n in names if n in attempts and "state" not in attempts[n]}

    def jobs(which) -> str:
        return ", ".join(f"{n} ({attempts[n]['executor']} {attempts[n]['id']})" for n, s in states.items() if which(s))

    if active := jobs(lambda state: state in ACTIVE):
        raise UserError(f"jobs of an earlier run into {out} are still queued or running: {active}; wait "
                        "for them (`harness run SUITE --status`) or cancel them (scancel / kill), then rerun")
    if unknown := jobs(lambda state: state == "UNKNOWN"):
        if any(attempts[n]["executor"] == "slurm" for n, s in states.items() if s == "UNKNOWN"):
            why, fix = "neither sacct nor squeue answered", "rerun when Slurm answers (squeue)"
        else:
            why = "their processes are on another machine or container (OUT/jobs.jsonl says which)"
            fix = f"rerun there, or, once sure they are not running, remove {out / LEDGER}"
        raise UserError(f"cannot tell whether jobs of an earlier run into {out} are still queued or running ({why}): "
                        f"{unknown}; {fix}")


def _slots(run, jobs: int) -> list[str | None]:
    """The device (group) of each of the jobs that may run at once: one per `run.nproc` visible GPUs, or
    `run.max_parallel`; on Slurm the allocation brings its own devices, and all of a phase may be queued."""
    if run.executor == "slurm":
        return [None] * (run.max_parallel or min(MAX_QUEUED, max(1, jobs)))
    devices = _devices(run.nproc)
    return [devices[i % len(devices)] for i in range(run.max_parallel or len(devices))]


def shared_cpu_warning(run, gpus: int) -> str | None:
    """A warning where `run.max_parallel` puts several jobs on this machine's CPU at once (no GPU): each job's
    torch uses every core, so they fight over them (on 2 cores, the pg19 suite's two evaluation jobs at once took
    371 s where one after the other took 145)."""
    if run.executor == "slurm" or (run.max_parallel or 1) == 1 or gpus:
        return None
    return (f"warning: run.max_parallel {run.max_parallel} runs {run.max_parallel} jobs at once on this machine's "
            f"CPU ({os.cpu_count()} cores), each with all of torch's threads; they slow each other down (on 2 cores "
            "2 jobs at once took 2.6x as long as one after the other): leave max_parallel unset on a CPU machine")


def _devices(nproc: int = 1) -> list[str | None]:
    """One worker per `nproc` visible CUDA devices (its CUDA_VISIBLE_DEVICES), or a single CPU worker."""
    n = visible_gpus()
    if 0 < n < nproc:
        raise UserError(f"run.nproc: {nproc} processes per fine-tune, but {n} CUDA device(s) are visible; lower "
                        "run.nproc or make more devices visible (CUDA_VISIBLE_DEVICES)")
    workers = n // nproc
    if workers <= 1:
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(n)]
    return [",".join(ids[w * nproc:(w + 1) * nproc]) for w in range(workers)]


class Progress:
    """How far a run is: a line as each job ends, with the jobs and cells done of those to run, and the time."""

    def __init__(self, jobs: int, cells: int):
        self.jobs, self.cells, self._done = jobs, cells, [0, 0]
        self._start, self._lock = time.monotonic(), threading.Lock()

    def job_done(self, name: str, cells: int, failed: int) -> None:
        with self._lock:
            self._done = [self._done[0] + 1, self._done[1] + cells]
            print(f"[{self._done[0]}/{self.jobs} jobs, {self._done[1]}/{self.cells} cells, "
                  f"{duration(time.monotonic() - self._start)}] {name} done"
                  + (f": {failed} of {cells} cells failed" if failed else ""), flush=True)


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 2 h 07 min."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    return f"{s // 60} min {s % 60:02d} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60:02d} min"


def _run_phase(jobs: list[tuple[Job, list[dict]]], slots: list[str | None], common: dict, timeout: float,
               out: Path, executor: Executor, progress: Progress) -> None:
    """Run (job, cells) pairs, as many at once as there are `slots` (each a device group, or None); Ctrl-C or
    SIGTERM stops every job."""
    if len(slots) == 1:  # in this thread, so that KeyboardInterrupt reaches _supervise directly
        for job, cells in jobs:
            progress.job_done(job.name, len(cells), _supervise(job, cells, slots[0], common, timeout, out, executor))
        return
    stop, free = threading.Event(), list(slots)
    lock = threading.Lock()

    def one(job, cells):
        with lock:
            slot = free.pop(0)
        try:
            progress.job_done(job.name, len(cells), _supervise(job, cells, slot, common, timeout, out, executor, stop))
        finally:
            with lock:
                free.append(slot)

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        futures = [pool.submit(one, job, cells) for job, cells in jobs]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)  # a failure (a refused submission) stops the run at once
            for f in futures:
                if f.done():
                    f.result()
        except BaseException:
            stop.set()  # the workers kill their jobs and return
            for f in futures:
                f.cancel()
            with _signals_held():  # a second Ctrl-C must not leave a job running: wait for every worker
                wait(futures)
            raise


@contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM held back until the block ends (in the main thread, where Python runs signal
    handlers), then delivered as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    before = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
              for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])


def _supervise(job: Job, cells: list[dict], device: str | None, common: dict, timeout: float, out: Path,
               executor: Executor, stop: threading.Event | None = None) -> int:
    """Run `job` for `cells`, attempt after attempt, until every cell has a record (or `stop` is set); return how
    many of them failed."""
    remaining = list(cells)
    path = out / results.RESULTS_FILE
    start = path.stat().st_size if path.is_file() else 0  # only records written from now on count
    while remaining:
        attempt, timed_out = None, False
        try:
            spec = {**common, **job.spec, "kind": job.kind, "cells": remaining, "attempt": uuid.uuid4().hex}
            refused = out / REFUSED.format(spec["attempt"])
            with _signals_held():  # sbatch queues the job even as we are interrupted: have it to cancel
                attempt = executor.start(job.name, spec, device)
            last_count, last_change = 0, time.monotonic()
            while attempt.poll() is None:
                time.sleep(attempt.poll_every)
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
                count = len(_recorded(path, start).keys() & {c["id"] for c in remaining})
                if count != last_count or not attempt.started():  # time in a queue is not the job's
                    last_count, last_change = count, time.monotonic()
                elif time.monotonic() - last_change > timeout:
                    attempt.kill()  # where cancelling failed (it warned), it tries again a timeout later
                    timed_out, last_change = True, time.monotonic()
        except BaseException:  # Ctrl-C: stop the job too; finished cells are already recorded
            if attempt is not None and attempt.kill():  # else it may run on: no end state, a rerun waits for it
                executor.ended(job.name, attempt, "CANCELLED")
            raise
        if refused.is_file():  # the job could not start: the run stops with its error, its cells are not charged
            executor.ended(job.name, attempt, "FAILED")
            message = refused.read_text()
            refused.unlink()
            raise UserError(f"job {job.name} could not start: {message}")
        done = _recorded(path, start)
        remaining = [c for c in remaining if c["id"] not in done]
        failed = bool(remaining) and (timed_out or attempt.poll() != 0)
        executor.ended(job.name, attempt, "TIMEOUT" if timed_out else "FAILED" if failed else "COMPLETED")
        if failed:
            cell = remaining.pop(0)
            status, error = ("timeout", f"no record within {timeout:.0f} s") if timed_out else attempt.failure()
            results.append(out, results.cell_record(common["suite_name"], cell, status=status, error=error))
            print(f"\n  {cell['id']}: {status} ({error})", flush=True)  # the job may have left a progress bar open
        elif remaining:
            raise RuntimeError(f"job {job.name} exited cleanly without recording {remaining[0]['id']}")
    recorded = _recorded(path, start)
    return sum(recorded.get(c["id"]) != "ok" for c in cells)


def _recorded(path: Path, start: int) -> dict[str, str]:
    """{cell id: status} of the records appended to `path` after byte offset `start`."""
    return {rec.get("cell"): rec.get("status") for _, rec in results.read_lines(path, start) if rec} \
        if path.is_file() else {}
