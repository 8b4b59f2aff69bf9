"""End to end on a shrunken suite, each job in its own process: records, report, resume, failures."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import results
from harness.runner import run_suite

SMALL = """
name: small
methods: [lora]
backends: [full, {se_attn: {chunk_size: 64, block_size: 16, top_k: 2}}]
pretrain: {context: 64, steps: 3, batch_size: 2, warmup_steps: 1}
finetune: {context: 256, steps: 2, warmup_steps: 1}
metrics:
  perplexity: {contexts: [64, 256], tokens_per_length: 512, max_tokens: 20000}
  efficiency: {lengths: [128], repeats: 2, warmup: 0}
"""


@pytest.fixture
def suite_file(tmp_path, isolated_cache):
    (tmp_path / "s.yaml").write_text(SMALL)
    return tmp_path / "s.yaml"


def test_run_records_every_cell_then_resumes(suite_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    report = run_suite(suite_file, out).report
    recs = results.load(out)
    assert all(r.status == "ok" for r in recs), [r.error for r in recs if r.error]
    progress = re.findall(r"^\[(\d+)/6 jobs, (\d+)/11 cells, \d+ s\] (\S+) done$", capsys.readouterr().out, re.M)
    assert [(int(j), int(c)) for j, c, _ in progress] == [(1, 1), (2, 3), (3, 6), (4, 9), (5, 10), (6, 11)], progress
    assert progress[0][2] == "tiny-hybrid/seed0/pretrain"
    by_metric = {m: [r for r in recs if r.metric == m] for m in ("pretrain", "train", "perplexity", "efficiency")}
    assert [len(v) for v in by_metric.values()] == [1, 2, 6, 2]
    ppl = by_metric["perplexity"]
    assert {r.eval_context: r.values["windows"] for r in ppl} == {64: 8, 256: 2}  # 512 tokens per length
    assert {r.backend for r in ppl} == {"full", "se_attn(chunk_size=64,block_size=16,top_k=2)"}
    assert all(r.kernel == "full via sdpa" for r in ppl)  # evaluation uses full attention by default
    se_train = next(r for r in by_metric["train"] if r.backend.startswith("se_attn"))
    assert "se_attn via" in se_train.kernel and se_train.values["trainable_params"] > 0
    # an attention layer's record names the merge kernel too: a fallback to the slower one must show
    kernels = {r.backend.split("(")[0]: r.kernel for r in by_metric["efficiency"]}
    assert kernels == {"full": "full via sdpa", "se_attn": "merge via cpu_flash, se_attn via blockwise"}, kernels
    assert ppl[0].dataset["embedded"] and "embedded corpus" in report.read_text()

    assert all(r.code["fingerprint"] for r in recs)
    assert all(r.variant for r in recs if r.metric != "efficiency")

    capsys.readouterr()
    run_suite(suite_file, out)  # everything recorded: nothing runs again
    assert "11 already recorded" in capsys.readouterr().out
    assert len(results.load(out)) == len(recs)

    # a record made by other code (say, before a fix to metrics/perplexity.py): measured again
    stale = "tiny-hybrid/seed0/lora/full/ppl@64"
    lines = (out / results.RESULTS_FILE).read_text().splitlines()
    old = [json.loads(line) for line in lines]
    for r in old:
        if r["cell"] == stale:
            r["code"]["fingerprint"] = "older"
    (out / results.RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in old))
    monkeypatch.setenv("HARNESS_FORKSERVER", "0")  # jobs were forked from a warm interpreter; now a fresh one
    run_suite(suite_file, out)
    shown = capsys.readouterr().out
    assert "10 already recorded, 1 stale: measured by other code (measured again)" in shown
    assert "[1/1 jobs, 1/1 cells, " in shown
    new = results.load(out)[len(old):]
    assert [(r.cell, r.values) for r in new] == [(r["cell"], r["values"]) for r in old if r["cell"] == stale]
    assert {len(results.current(results.load(out)))} == {11}


def test_a_killed_fork_server_costs_its_job_one_cell_and_the_rest_goes_on(suite_file, tmp_path, inject_fault, capsys):
    """A job's parent is the fork server (no GPU): killed (by hand, the OOM killer), the run stopped with a
    traceback instead of recording the cell as for a killed job and forking the rest from a new server."""
    from harness.executors import _may_fork

    if not _may_fork():
        pytest.skip("jobs are forked from a server only where no GPU is visible")
    inject_fault("os.kill(os.getppid(), 9); time.sleep(30)")  # the job's parent: the server
    suite_file.write_text(SMALL.replace("lengths: [128]", "lengths: [128, 64]"))
    out = tmp_path / "out"
    outcome = run_suite(suite_file, out, only="attention/*")
    assert (outcome.cells, outcome.failed) == (4, {"error": 2})
    recs = {r.cell: r for r in results.load(out)}
    assert recs["attention/full/efficiency@128"].status == "error"
    assert recs["attention/full/efficiency@64"].status == "error"  # the restarted job killed its new server too
    assert recs["attention/se_attn(chunk_size=64,block_size=16,top_k=2)/efficiency@128"].status == "ok"
    assert "fork server" in capsys.readouterr().err


def test_a_crashed_job_costs_one_cell_and_the_rest_goes_on(suite_file, tmp_path, inject_fault, capsys):
    inject_fault("os._exit(3)")
    suite_file.write_text(SMALL.replace("lengths: [128]", "lengths: [128, 64]"))
    out = tmp_path / "out"
    outcome = run_suite(suite_file, out, only="attention/*")
    assert (outcome.cells, outcome.failed) == (4, {"error": 2})  # the CLI exits 1 and says so
    shown = capsys.readouterr().out
    progress = re.findall(r"^\[\d/2 jobs, \d/4 cells, \d+ s\] attention/(\w+)\S* done(.*)$", shown, re.M)
    assert sorted(progress) == [("full", ": 2 of 2 cells failed"), ("se_attn", "")]
    recs = {r.cell: r for r in results.load(out)}
    assert recs["attention/full/efficiency@128"].status == "error"
    assert "exited with code 3" in recs["attention/full/efficiency@128"].error
    assert recs["attention/full/efficiency@64"].status == "error"  # the restarted job crashed again
    assert recs["attention/se_attn(chunk_size=64,block_size=16,top_k=2)/efficiency@128"].status == "ok"


def test_a_hung_cell_is_killed_and_recorded_as_timeout(suite_file, tmp_path, inject_fault):
    inject_fault("time.sleep(600)")
    suite_file.write_text(SMALL + "run: {timeout: 5}\n")
    out = tmp_path / "out"
    assert run_suite(suite_file, out, only="attention/full/*").failed == {"timeout": 1}
    (rec,) = results.load(out)
    assert rec.status == "timeout" and rec.error == "no record within 5 s"


def test_dry_run_lists_cells_without_running(suite_file, tmp_path, capsys):
    assert run_suite(suite_file, tmp_path / "out", dry_run=True) is None
    out = capsys.readouterr().out
    assert re.search(r"todo +tiny-hybrid/seed0/lora/full/ppl@256\n", out)
    assert re.search(r"todo +attention/full/efficiency@128\n", out)
    assert not (tmp_path / "out").exists()
    run_suite(suite_file, tmp_path / "out", dry_run=True, only="*/lora/full/*")  # jobs with a cell left count
    assert "suite small: 3 cells in 1 jobs, 0 already recorded" in capsys.readouterr().out


def _start_hung_run(suite_file, tmp_path, inject_fault):
    """`harness run` in a subprocess whose job hangs in its first cell; returns (runner, job pid)."""
    pidfile = tmp_path / "job.pid"
    inject_fault(f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(600)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.environ["PYTHONPATH"], str(Path.cwd())])}
    runner = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(suite_file), "--out",
                               str(tmp_path / "out"), "--only", "attention/full/*"], env=env)
    deadline = time.monotonic() + 60
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline and runner.poll() is None, "the job never started"
        time.sleep(0.2)
    return runner, int(pidfile.read_text())


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_sigterm_stops_the_runner_and_its_job(suite_file, tmp_path, inject_fault):
    runner, job = _start_hung_run(suite_file, tmp_path, inject_fault)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == 130
    assert _gone(job)


def test_a_job_ends_when_its_runner_is_killed(suite_file, tmp_path, inject_fault):
    runner, job = _start_hung_run(suite_file, tmp_path, inject_fault)
    runner.kill()
    runner.wait(timeout=30)
    assert _gone(job)  # the job is in its own session: it must notice the runner is gone by itself


@pytest.mark.parametrize("data, callout", [("", True), ("data: {eval: {source: embedded, split: test}}\n", False)])
def test_the_report_says_pg19_was_not_configured_unless_the_embedded_corpus_was_chosen(tmp_path, isolated_cache,
                                                                                       data, callout):
    from harness.plan import documents
    from harness.runner import report_notes
    from harness.suite import load_suite

    (tmp_path / "s.yaml").write_text(SMALL + data)
    suite = load_suite(tmp_path / "s.yaml")
    notes = report_notes(suite, documents(suite, "eval"))
    assert bool(notes) == callout and all(n.startswith("PG-19 not configured") for n in notes)


def test_the_report_repeats_the_suites_warnings(tmp_path, isolated_cache):
    from harness.plan import documents
    from harness.runner import report_notes
    from harness.suite import load_suite

    (tmp_path / "s.yaml").write_text(SMALL.replace("methods: [lora]", "methods: []"))
    suite = load_suite(tmp_path / "s.yaml")
    notes = report_notes(suite, documents(suite, "eval"))
    assert len(notes) == 2 and notes[0].startswith(f"Suite warning: {tmp_path / 's.yaml'}: line ")
    assert "no method, so nothing is fine-tuned" in notes[0] and notes[1].startswith("PG-19 not configured")


def test_several_jobs_at_once_on_a_cpu_are_warned_about():
    from harness.runner import shared_cpu_warning
    from harness.suite import Run

    assert shared_cpu_warning(Run(max_parallel=2), gpus=0).startswith("warning: run.max_parallel 2 runs 2 jobs")
    assert shared_cpu_warning(Run(), gpus=0) is None
    assert shared_cpu_warning(Run(max_parallel=1), gpus=0) is None
    assert shared_cpu_warning(Run(max_parallel=2), gpus=1) is None  # jobs on GPUs
    assert shared_cpu_warning(Run(max_parallel=2, executor="slurm"), gpus=0) is None  # jobs on cluster nodes


def test_durations_read_at_a_glance():
    from harness.runner import duration

    assert [duration(s) for s in (0.4, 59.6, 185, 3599, 7620)] == ["0 s", "1 min 00 s", "3 min 05 s", "59 min 59 s",
                                                                  "2 h 07 min"]


def test_a_fine_tune_that_fails_is_tried_once_per_job(tmp_path, isolated_cache, monkeypatch):
    """A diverged fine-tune fails each of its variant's cells with its error, but trains once, not once per cell."""
    from harness import artefacts
    from harness.errors import UserError
    from harness.job import run_job
    from harness.plan import plan
    from harness.suite import load_suite

    tries = []

    def diverges(*args, **kwargs):
        tries.append(1)
        raise UserError("attention backend 'full' got NaN or inf in q, k, v: the model diverged")

    monkeypatch.setattr(artefacts, "finetuned", diverges)
    (tmp_path / "s.yaml").write_text("name: x\nmethods: [lora]\nbackends: [full]\nfinetune: {context: 128}\n"
                                     "metrics: {perplexity: {contexts: [64, 128]}}\n")
    (job,) = [j for j in plan(load_suite(tmp_path / "s.yaml"), "data") if j.kind == "variant" and j.spec["backend"]]
    run_job({"suite": str(tmp_path / "s.yaml"), "out": str(tmp_path), **job.spec, "kind": job.kind,
             "cells": job.cells})
    recs = results.load(tmp_path)
    assert len(recs) == len(job.cells) == 3 and len(tries) == 1
    assert all(r.status == "error" and "the model diverged" in r.error for r in recs)


def test_status_lists_only_the_jobs_with_cells_only_selects(suite_file, tmp_path, capsys):
    """A job none of whose cells `--only` selects is left out: it showed as done, 0/0, though never started."""
    run_suite(suite_file, tmp_path / "out", status=True, only="attention/*")
    shown = [line.split()[:3] for line in capsys.readouterr().out.splitlines()]
    assert shown == [["todo", "0/1", "attention/full"],
                     ["todo", "0/1", "attention/se_attn(chunk_size=64,block_size=16,top_k=2)"]], shown


class _Attempt:
    """A job attempt that records `statuses` for its first cells, one every `every` seconds once it has left the
    queue (after `queued` seconds), then exits with `code`; or, killed, with -9."""

    poll_every = 0.01

    def __init__(self, out, cells, statuses, code, every=0.0, queued=0.0):
        self.out, self.todo, self.code, self.every = out, list(zip(cells, statuses, strict=False)), code, every
        self.start, self.queued, self.killed = time.monotonic(), queued, False

    def started(self) -> bool:
        return time.monotonic() - self.start >= self.queued

    def poll(self) -> int | None:
        if self.killed:
            return -9
        while self.todo and self.started() and time.monotonic() - self.start - self.queued >= self.every * (
                1 + len(self.done)):
            cell, status = self.todo.pop(0)
            results.append(self.out, results.cell_record("s", cell, status=status))
            self.done.append(cell["id"])
        return None if self.todo or not self.started() else self.code

    def kill(self) -> bool:
        self.killed = True
        return True

    def failure(self) -> tuple[str, str]:
        return "oom", f"exited with code {self.code}, likely out of memory"


class _Executor:
    """Starts no process: attempt i records `attempts[i][0]` for its first cells and exits with `attempts[i][1]`."""

    def __init__(self, out, attempts, **timing):
        self.out, self.attempts, self.timing, self.cells, self.states = out, list(attempts), timing, [], []

    def start(self, name, spec, device):
        statuses, code = self.attempts.pop(0)
        self.cells.append([c["length"] for c in spec["cells"]])
        attempt = _Attempt(self.out, spec["cells"], statuses, code, **self.timing)
        attempt.done = []
        return attempt

    def ended(self, name, attempt, state):
        self.states.append(state)


def _cells(lengths, backend="full"):
    from harness.cells import Cell

    return [{**Cell("efficiency", length=n, backend=backend).as_dict(), "hash": "h", "code": "c"} for n in lengths]


def _supervised(out, attempts, lengths=(128, 256, 512), timeout=60.0, **timing):
    """(cells failed, the executor, {length: status of its current record}) of one backend job of efficiency cells
    at `lengths`."""
    from harness.plan import Job
    from harness.runner import _supervise

    cells = _cells(lengths)
    ex = _Executor(out, attempts, **timing)
    failed = _supervise(Job("backend", "attention/full", {}), cells, None, {"suite_name": "s"}, timeout, out, ex)
    return failed, ex, {r.eval_context: r.status for r in results.current(results.load(out))}


def test_a_dead_job_costs_the_cell_it_was_on_and_restarts_for_the_rest(tmp_path):
    failed, ex, recorded = _supervised(tmp_path, [(["ok"], 137), (["ok"], 0)])
    assert ex.cells == [[128, 256, 512], [512]] and ex.states == ["FAILED", "COMPLETED"]
    assert recorded == {128: "ok", 256: "oom", 512: "ok"} and failed == 1  # an OOM is a failed cell


def test_a_job_that_exits_cleanly_with_cells_left_is_an_error_not_a_restart(tmp_path):
    with pytest.raises(RuntimeError, match="exited cleanly without recording attention/full/efficiency@128"):
        _supervised(tmp_path, [([], 0)], lengths=(128,))


def test_only_records_written_during_the_job_count(tmp_path):
    """A cell measured again (stale, changed) has an earlier record: the job's death still costs it."""
    _supervised(tmp_path, [(["ok"], 0)], lengths=(128,))
    failed, ex, recorded = _supervised(tmp_path, [([], 1), ([], 1)], lengths=(128, 256))
    assert recorded == {128: "oom", 256: "oom"} and failed == 2 and ex.states == ["FAILED", "FAILED"]


def test_the_timeout_is_per_cell_and_counts_from_the_start_not_the_queue(tmp_path):
    """A job that records a cell every 0.1 s runs on past a 0.25 s timeout; one queued for 0.4 s is not killed."""
    failed, ex, recorded = _supervised(tmp_path, [(["ok"] * 5, 0)], lengths=(64, 128, 256, 512, 999), timeout=0.25,
                                       every=0.1, queued=0.4)
    assert failed == 0 and ex.states == ["COMPLETED"] and set(recorded.values()) == {"ok"}
    failed, ex, recorded = _supervised(tmp_path / "hung", [(["ok"], 0), (["ok"], 0)], lengths=(64, 128), timeout=0.1,
                                       every=60.0)
    assert ex.states == ["TIMEOUT", "TIMEOUT"] and recorded == {64: "timeout", 128: "timeout"} and failed == 2


def test_a_timed_out_job_that_cannot_be_cancelled_is_tried_again_a_timeout_later_not_every_poll(tmp_path):
    """scancel refused (kill() warns, returns False): a warning every poll (10 ms here, 2 s on Slurm) helps no one."""
    from harness.plan import Job
    from harness.runner import _supervise

    class Stubborn(_Attempt):
        kills: list[float] = []

        def kill(self) -> bool:
            self.kills.append(time.monotonic())
            self.killed = len(self.kills) > 1
            return self.killed

    class Ex(_Executor):
        def start(self, name, spec, device):
            self.attempts.pop(0)
            attempt = Stubborn(self.out, spec["cells"], ["ok"], 0, every=60.0)
            attempt.done = []
            return attempt

    ex = Ex(tmp_path, [None])
    assert _supervise(Job("backend", "attention/full", {}), _cells((64,)), None, {"suite_name": "s"}, 0.1, tmp_path,
                      ex) == 1
    assert len(Stubborn.kills) == 2 and Stubborn.kills[1] - Stubborn.kills[0] >= 0.1 and ex.states == ["TIMEOUT"]


def test_a_job_that_cannot_start_stops_a_run_of_jobs_at_once(tmp_path):
    from harness.errors import UserError
    from harness.plan import Job
    from harness.runner import Progress, _run_phase

    class Refusing(_Executor):
        def start(self, name, spec, device):
            if name == "attention/b":
                raise UserError("sbatch: error: invalid partition specified: gpu")
            return super().start(name, spec, device)

    jobs = [(Job("backend", f"attention/{b}", {}), _cells([64], b)) for b in "ab"]
    with pytest.raises(UserError, match="invalid partition"):
        _run_phase(jobs, [None, None], {"suite_name": "s"}, 60, tmp_path, Refusing(tmp_path, [(["ok"], 0)]),
                   Progress(2, 2))


def test_progress_counts_the_jobs_and_cells_done(capsys):
    from harness.runner import Progress

    progress = Progress(2, 5)
    progress.job_done("a", 3, 0)
    progress.job_done("b", 2, 1)
    assert capsys.readouterr().out.splitlines() == ["[1/2 jobs, 3/5 cells, 0 s] a done",
                                                    "[2/2 jobs, 5/5 cells, 0 s] b done: 1 of 2 cells failed"]


def test_jobs_at_once_are_one_per_device_group_or_max_parallel_and_on_slurm_at_most_64(monkeypatch):
    from harness import runner
    from harness.suite import Run

    monkeypatch.setattr(runner, "visible_gpus", lambda: 0)
    assert runner._slots(Run(), 5) == [None] and runner._slots(Run(max_parallel=3), 5) == [None] * 3
    slurm = Run(executor="slurm")
    assert [len(runner._slots(slurm, n)) for n in (0, 3, 100)] == [1, 3, 64]
    assert len(runner._slots(Run(executor="slurm", max_parallel=100), 3)) == 100
    monkeypatch.setattr(runner, "visible_gpus", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert runner._slots(Run(nproc=2), 5) == ["4,5", "6,7"]
    assert runner._slots(Run(max_parallel=3), 5) == ["4", "5", "6"]


def test_a_local_job_of_an_earlier_run_is_not_waited_for(tmp_path):
    """Local jobs die with their runner: a live process under a noted pid is another one (the pid reused)."""
    from harness.runner import _check_no_earlier_jobs_active

    (tmp_path / "jobs.jsonl").write_text(json.dumps({"job": "attention/full", "id": str(os.getpid()), "cells": 1,
                                                     "executor": "local", "submitted": "2026-01-01T00:00:00"}) + "\n")
    _check_no_earlier_jobs_active(["attention/full"], tmp_path)



def test_learned_positions_cover_each_checkpoints_own_lengths_up_to_their_count(monkeypatch):
    """Lengths are checked per model, at most `limit` tokens pass, and a fine-tune's context counts too."""
    from types import SimpleNamespace

    from harness import artefacts, runner
    from harness.errors import UserError
    from harness.plan import Job

    monkeypatch.setattr(runner, "meta_model", lambda r: r)
    monkeypatch.setattr(runner, "position_limit", lambda model: model.limit)
    monkeypatch.setattr(runner, "check_vocabulary", lambda *args: None)
    monkeypatch.setattr(artefacts, "tokenizer", lambda entry: None)
    suite = SimpleNamespace(finetune=SimpleNamespace(context=64), model=lambda name: name, backends=[], methods=[])
    jobs = [Job("variant", m, {"model": m}, [{"length": n}]) for m, n in (("a", 48), ("b", 96))]
    resolved = {m: SimpleNamespace(model_type="gpt2", limit=n) for m, n in (("a", 48), ("b", 96))}
    runner._check_checkpoints(suite, jobs, resolved, finetunes=False)
    with pytest.raises(UserError, match="models.a: gpt2 has learned absolute positions for 48 tokens, and the suite "
                                        "asks it for 64;"):
        runner._check_checkpoints(suite, jobs, resolved, finetunes=True)
