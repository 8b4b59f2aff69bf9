"""Runs a suite: plan its jobs and cells (harness.plan), run each job in its own process, render the report.

Each job runs in a child process (harness.job), so a crash or an OOM kill costs one cell: the parent records
it ("error"/"oom"), and restarts the job for the cells left. A cell with no new record for `run.timeout`
seconds is killed and recorded as "timeout". Resume: a cell is done when its current record has its settings
hash and code fingerprint (`plan.cell_state`; `--retry-failed` reruns those that failed). Several GPUs: jobs
run in parallel, one per device.
"""

from __future__ import annotations

import fnmatch
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from harness import cache, results
from harness.cells import FINETUNED
from harness.errors import UserError
from harness.models.sources import Checkpoint, resolve
from harness.plan import STALE, Job, cell_state, documents, plan
from harness.suite import load_suite


@dataclass(frozen=True)
class Outcome:
    """What a run left: the report, the number of cells planned, and how many of them have a failed current
    record, by status."""

    report: Path
    cells: int
    failed: dict[str, int]


def run_suite(suite_path: str | Path, out: Path | None = None, pg19: str | None = None, dry_run: bool = False,
              only: str | None = None, retry_failed: bool = False) -> Outcome | None:
    suite = load_suite(suite_path)
    out = Path(out or Path("reports") / suite.name)
    missing: list[str] | None = [] if dry_run else None  # what a dry run did not find (a run raises)
    corpus = _present(lambda: documents(suite, "eval", pg19), missing, "data.eval")
    finetunes = bool(suite.methods and suite.backends)
    train = _present(lambda: documents(suite, "train", pg19), missing, "data.train") if finetunes else None
    checkpoints = {m.name: getattr(_present(lambda m=m: resolve(m), missing, "model"), "fingerprint", MISSING)
                   for m in suite.models if isinstance(m, Checkpoint)}
    jobs = plan(suite, getattr(corpus, "fingerprint", MISSING), getattr(train, "fingerprint", MISSING) if finetunes
                else None, checkpoints)
    for job in jobs:
        job.cells = [c for c in job.cells if only is None or fnmatch.fnmatch(c["id"], only)]
    ids = [c["id"] for j in jobs for c in j.cells]
    if not ids and only is not None:
        raise UserError(f"--only {only!r} matches none of the suite's cells; `harness run {suite_path} --dry-run` "
                        "lists their ids")
    if dry_run:
        state = _states(jobs, out, retry_failed, suite.name, corpus)
        for job in jobs:
            for c in job.cells:
                print(f"  {state[c['id']]:<8} {c['id']}")
        if missing:
            raise UserError(f"missing on this machine: {', '.join(missing)} (said above); a run would stop there")
        return None
    cache.check_writable()
    out.mkdir(parents=True, exist_ok=True)
    with results.exclusive(out):
        state = _states(jobs, out, retry_failed, suite.name, corpus)
        todo = {job.name: [c for c in job.cells if state[c["id"]] != "done"] for job in jobs}
        common = {"suite": str(Path(suite_path).resolve()), "suite_name": suite.name, "out": str(out.resolve()),
                  "pg19": pg19}
        tuned = {j.spec["model"] for j in jobs if j.spec.get("stage") == FINETUNED and todo[j.name]}
        for model in tuned if train is not None else ():
            _tokenize(train, suite.model(model))
        pretrain = [j for j in jobs if j.kind == "pretrain" and todo[j.name]]
        rest = [j for j in jobs if j.kind != "pretrain" and todo[j.name]]
        devices = _devices(suite.run.nproc)
        for phase in (pretrain, rest):
            _run_phase([(j, todo[j.name]) for j in phase], devices, common, suite.run.timeout, out)
        notes = [] if not corpus.embedded else [
            f"PG-19 not configured: measured on the embedded corpus's held-out books ({corpus.description}). "
            "Set HARNESS_PG19_DIR or pass --pg19 DIR to evaluate on PG-19."]
        from harness.report import render_report

        report = render_report(results.load(out), out, title=f"Suite {suite.name}", notes=notes)
    recorded = _current_records(out)
    failed = Counter(recorded[i].status for i in ids if i in recorded and recorded[i].status != "ok")
    return Outcome(report, len(ids), dict(failed))


MISSING = "missing"  # the fingerprint of what a dry run could not find


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


def _tokenize(train, model) -> None:
    """Tokenize the fine-tuning text with `model`'s tokenizer before any job (cached): text that cannot be read
    stops the run here, with its message, instead of failing every fine-tune; and jobs on several devices do not
    tokenize it side by side."""
    from harness.artefacts import tokenizer
    from harness.data.tokens import token_stream

    token_stream(tokenizer(model), train)


def _states(jobs: list[Job], out: Path, retry_failed: bool, name: str, corpus) -> dict[str, str]:
    """Each cell's state (plan.cell_state) against the records in `out`, with a one-line summary printed."""
    recorded = _current_records(out)
    state = {c["id"]: cell_state(c, recorded.get(c["id"]), retry_failed) for j in jobs for c in j.cells}
    counts = Counter(state.values())
    print(f"suite {name}: {len(state)} cells in {len(jobs)} jobs, {counts['done']} already recorded"
          + "".join(f", {counts[s]} {why}" for s, why in STALE.items() if counts[s])
          + f"; evaluating on {getattr(corpus, 'description', '(missing)')}; results in {out}")
    return state


def _current_records(out: Path) -> dict[str, results.Record]:
    if not (out / results.RESULTS_FILE).is_file():
        return {}
    return {r.cell: r for r in results.current(results.load(out))}


def _devices(nproc: int = 1) -> list[str | None]:
    """One worker per `nproc` visible CUDA devices (its CUDA_VISIBLE_DEVICES), or a single CPU worker."""
    try:
        import torch

        n = torch.cuda.device_count()
    except ImportError:
        n = 0
    if 0 < n < nproc:
        raise UserError(f"run.nproc: {nproc} processes per fine-tune, but {n} CUDA device(s) are visible; lower "
                        "run.nproc or make more devices visible (CUDA_VISIBLE_DEVICES)")
    workers = n // nproc
    if workers <= 1:
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(n)]
    return [",".join(ids[w * nproc:(w + 1) * nproc]) for w in range(workers)]


def _run_phase(jobs: list[tuple[Job, list[dict]]], devices: list[str | None], common: dict, timeout: float,
               out: Path) -> None:
    """Run (job, cells) pairs, one device each at a time; Ctrl-C or SIGTERM stops every child job."""
    if len(devices) == 1:  # in this thread, so that KeyboardInterrupt reaches _supervise directly
        for job, cells in jobs:
            _supervise(job, cells, devices[0], common, timeout, out)
        return
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        futures = [pool.submit(_supervise, job, cells, devices[i % len(devices)], common, timeout, out, stop)
                   for i, (job, cells) in enumerate(jobs)]
        try:
            for f in futures:
                f.result()
        except BaseException:
            stop.set()  # the workers kill their children and return; the pool's exit then waits for them
            for f in futures:
                f.cancel()
            raise


def _supervise(job: Job, cells: list[dict], device: str | None, common: dict, timeout: float, out: Path,
               stop: threading.Event | None = None) -> None:
    """Run `job` for `cells` in child processes until every cell has a record (or `stop` is set)."""
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": device} if device is not None else {})}
    remaining = list(cells)
    path = out / results.RESULTS_FILE
    start = path.stat().st_size if path.is_file() else 0  # only records written from now on count
    while remaining:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({**common, **job.spec, "kind": job.kind, "cells": remaining}, f)
        proc = subprocess.Popen([sys.executable, "-m", "harness.job", f.name], env=env, start_new_session=True)
        status, last_count, last_change = None, 0, time.monotonic()
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
                count = len(_done_ids(path, start) & {c["id"] for c in remaining})
                if count != last_count:
                    last_count, last_change = count, time.monotonic()
                elif time.monotonic() - last_change > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    status = "timeout"
        except BaseException:  # Ctrl-C: stop the child too; finished cells are already recorded
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            os.unlink(f.name)
        done = _done_ids(path, start)
        remaining = [c for c in remaining if c["id"] not in done]
        if remaining and (status or proc.returncode != 0):
            cell = remaining.pop(0)
            killed = proc.returncode in (-signal.SIGKILL, 137) and status is None
            status = status or ("oom" if killed else "error")
            error = (f"no record within {timeout:.0f} s" if status == "timeout" else
                     f"job process exited with code {proc.returncode}"
                     + (" (killed: likely out of memory)" if killed else ""))
            results.append(out, results.cell_record(common["suite_name"], cell, status=status, error=error))
            print(f"  {cell['id']}: {status} ({error})", flush=True)
        elif remaining:
            raise RuntimeError(f"job {job.name} exited cleanly without recording {remaining[0]['id']}")


def _done_ids(path: Path, start: int) -> set[str]:
    """Cell ids of the records appended to `path` after byte offset `start`."""
    return {rec.get("cell") for _, rec in results.read_lines(path, start) if rec} if path.is_file() else set()
