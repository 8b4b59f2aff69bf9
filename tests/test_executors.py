"""Jobs through submitit (its LocalExecutor here; Slurm's submission checked against a stand-in sbatch): the same
records as the local runner, failures recorded and resumed, concurrent records kept, clear errors."""

import json
import logging
import os
import stat
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import results
from harness.errors import UserError
from harness.executors import Executor, filesystem_type, ledger
from harness.runner import run_suite
from harness.suite import load_suite

SUITE = """
name: exec
methods: []
backends: [full, sliding_window]
pretrain: {context: 64, steps: 3, batch_size: 2, warmup_steps: 1}
metrics:
  perplexity: {contexts: [64], tokens_per_length: 256, max_tokens: 20000}
  efficiency: {lengths: [64], repeats: 2, warmup: 0}
"""


@pytest.fixture
def suite_file(tmp_path, isolated_cache):
    (tmp_path / "s.yaml").write_text(SUITE)
    return tmp_path / "s.yaml"


def test_submitit_local_records_what_the_local_runner_records(suite_file, tmp_path, capsys):
    for executor in ("submitit-local", "local"):
        outcome = run_suite(suite_file, tmp_path / executor, run={"executor": executor})
        assert outcome.failed == {}
    local, sub = ({r.cell: r for r in results.load(tmp_path / e)} for e in ("local", "submitit-local"))
    assert sorted(local) == sorted(sub) and len(local) == 4
    for cell, rec in local.items():
        other = sub[cell]
        assert (rec.status, rec.config_hash, rec.code, rec.variant) == (other.status, other.config_hash,
                                                                          other.code, other.variant), cell
        if rec.metric != "efficiency":  # timings differ run to run; everything else is the same
            assert rec.values == other.values, cell
    jobs = ledger(tmp_path / "submitit-local")
    assert {e["state"] for e in jobs.values()} == {"COMPLETED"} and len(jobs) == 4
    capsys.readouterr()
    run_suite(suite_file, tmp_path / "submitit-local", status=True)
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 4 and all(line.split()[:2] == ["done", "1/1"] for line in shown)
    assert f"submitit-local {jobs['tiny-hybrid/seed0/pretrain']['id']} COMPLETED" in "\n".join(shown)


def test_a_failed_submitit_job_costs_one_cell_and_a_rerun_resumes(suite_file, tmp_path, inject_fault, monkeypatch,
                                                                  capsys):
    suite_file.write_text(SUITE.replace("lengths: [64]", "lengths: [64, 32]"))
    inject_fault("os._exit(3)")
    out = tmp_path / "out"
    outcome = run_suite(suite_file, out, only="attention/*", run={"executor": "submitit-local"})
    assert outcome.failed == {"error": 2}  # both full-attention cells: the job died in each
    recs = {r.cell: r for r in results.load(out)}
    assert recs["attention/full/efficiency@64"].status == "error"
    assert "submitit-local job" in recs["attention/full/efficiency@64"].error
    assert recs["attention/sliding_window/efficiency@64"].status == "ok"
    capsys.readouterr()
    run_suite(suite_file, out, only="attention/*", dry_run=True)  # failed cells say so, and a plain run keeps them
    shown = capsys.readouterr().out
    assert "2 already recorded, 2 failed (kept; --retry-failed measures them again)" in shown, shown
    assert "  failed   attention/full/efficiency@64\n" in shown, shown
    run_suite(suite_file, out, only="attention/*", status=True)
    status = {line.split()[2]: line.split()[:2] for line in capsys.readouterr().out.splitlines()}
    assert status["attention/full"] == ["failed", "0/2"] and status["attention/sliding_window"] == ["done", "2/2"]
    monkeypatch.delenv("PYTHONPATH")  # the fault is fixed
    assert run_suite(suite_file, out, only="attention/*", retry_failed=True,
                     run={"executor": "submitit-local"}).failed == {}
    assert {r.cell for r in results.current(results.load(out)) if r.status == "ok"} == set(recs)


def test_a_submitit_local_job_killed_as_by_the_oom_killer_is_recorded_as_oom(suite_file, tmp_path, inject_fault):
    inject_fault("os.kill(os.getpid(), 9)")  # what the kernel's OOM killer sends the largest process
    out = tmp_path / "out"
    assert run_suite(suite_file, out, only="attention/full/*", run={"executor": "submitit-local"}).failed == {"oom": 1}
    (rec,) = results.load(out)
    assert rec.error.endswith("job process exited with code -9 (killed: likely out of memory)"), rec.error


def test_what_a_submitit_task_raised_is_its_last_traceback_line(tmp_path):
    """It was the last line of submitit's wrapper text: the path of the task's stdout log."""
    import operator

    import submitit

    from harness.executors import SubmititAttempt

    job = submitit.LocalExecutor(folder=tmp_path / "%j").submit(operator.truediv, 1, 0)
    attempt = SubmititAttempt(job, "submitit-local")
    while attempt.poll() is None:
        time.sleep(0.2)
    status, error = attempt.failure()
    assert status == "error" and error.endswith(" ended FINISHED: ZeroDivisionError: division by zero"), error


def test_jobs_at_once_all_keep_their_records(suite_file, tmp_path):
    many = "backends: [full, sliding_window, s2_attn, {se_attn: {chunk_size: 32, block_size: 16, top_k: 1}}]"
    suite_file.write_text(SUITE.replace("backends: [full, sliding_window]", many))
    out = tmp_path / "out"
    run_suite(suite_file, out, only="attention/*", run={"executor": "submitit-local", "max_parallel": 4})
    recs = results.load(out)
    assert sorted(r.cell.split("/")[1][:7] for r in recs) == ["full", "s2_attn", "se_attn", "sliding"]
    assert all(r.status == "ok" for r in recs)


def test_records_appended_at_once_by_many_processes_are_all_whole(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(tmp_path, i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    lines = (tmp_path / results.RESULTS_FILE).read_text().splitlines()
    assert len(lines) == 4 * 200 and all(json.loads(line)["suite"] == "s" for line in lines)
    assert len({json.loads(line)["cell"] for line in lines}) == 800


def _append_many(out: Path, writer: int) -> None:
    for i in range(200):
        results.append(out, results.Record(suite="s", cell=f"w{writer}/c{i}", metric="x", values={"pad": "x" * 3000}))


def test_an_earlier_submission_still_running_is_not_submitted_again(suite_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    entry = {"job": "attention/full", "id": str(os.getpid()), "executor": "submitit-local", "cells": 1,
             "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}  # alive, and started before it: this process
    (out / "jobs.jsonl").write_text(json.dumps(entry) + "\n")
    with pytest.raises(UserError, match=r"still queued or running: attention/full \(submitit-local \d+\)"):
        run_suite(suite_file, out, only="attention/*", run={"executor": "submitit-local"})


def slurm_tools(tmp_path, monkeypatch, **scripts):
    """Stand-ins for Slurm's commands on PATH: {name: shell body}."""
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def fake_sbatch(tmp_path, monkeypatch, answer="echo 'Submitted batch job 4242'"):
    """An sbatch that keeps the script it is given (tmp_path/submitted.sh) and answers `answer`; an srun, which
    submitit looks for (the job script would call it)."""
    slurm_tools(tmp_path, monkeypatch, sbatch=f'cp "$1" {tmp_path / "submitted.sh"}\n{answer}', srun="")


def slurm_run(suite_file):
    settings = {"executor": "slurm", "slurm": {"partition": "gpu", "gpus_per_node": 8, "cpus_per_task": 16,
                                               "time_min": 240, "account": "lab", "additional": {"qos": "high"}}}
    return load_suite(suite_file, settings).run


def test_a_slurm_job_is_submitted_with_the_suites_settings(suite_file, tmp_path, monkeypatch):
    fake_sbatch(tmp_path, monkeypatch)
    out = tmp_path / "out"
    attempt = Executor(slurm_run(suite_file), out).start("attention/full", {"cells": [{"id": "c"}]}, None)
    assert attempt.id == "4242"
    script = (tmp_path / "submitted.sh").read_text()
    for option in ("--partition=gpu", "--gpus-per-node=8", "--cpus-per-task=16", "--time=240", "--account=lab",
                   "--qos=high", "--job-name=harness-attention/full"):
        assert f"#SBATCH {option}\n" in script, option
    assert ledger(out)["attention/full"]["id"] == "4242"


def test_slurm_refusing_a_partition_is_one_clear_error(suite_file, tmp_path, monkeypatch):
    fake_sbatch(tmp_path, monkeypatch, "echo 'sbatch: error: invalid partition specified: gpu' >&2; exit 1")
    with pytest.raises(UserError, match="job attention/full: slurm refused the submission: sbatch: error: invalid "
                                        "partition specified: gpu"):
        Executor(slurm_run(suite_file), tmp_path / "out").start("attention/full", {"cells": [{"id": "c"}]}, None)


def test_slurm_without_its_tools_or_a_shared_cache_says_so(suite_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    with pytest.raises(UserError, match="no `sbatch`, `srun` on PATH; run harness from a Slurm login node"):
        Executor(slurm_run(suite_file), tmp_path / "out")
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(UserError, match=r"needs submitit: pip install 'harness\[cluster\]'"):
        Executor(slurm_run(suite_file), tmp_path / "out")
    monkeypatch.delitem(sys.modules, "submitit")
    fake_sbatch(tmp_path, monkeypatch)
    monkeypatch.setattr("harness.executors.filesystem_type", lambda path: "nfs4" if path.name == "out" else "tmpfs")
    Executor(slurm_run(suite_file), tmp_path / "out")
    err = capsys.readouterr().err
    assert "the artefact cache" in err and "node-local filesystem (tmpfs)" in err and "HARNESS_CACHE" in err
    assert "results directory" not in err and "gpus_per_node" not in err  # that one is shared; GPUs asked for
    for slurm, warned in (({}, True), ({"gpus_per_node": 0}, False), ({"additional": {"gres": "gpu:h100:4"}}, False),
                          ({"additional": {"gpus-per-task": 1}}, False)):  # sbatch's spelling, which submitit passes
        Executor(load_suite(suite_file, {"executor": "slurm", "slurm": slurm}).run, tmp_path / "out")
        assert ("warning: run.slurm.gpus_per_node is not set" in capsys.readouterr().err) == warned, slurm
    Executor(load_suite(suite_file, {"executor": "slurm", "nproc": 4, "slurm": {"gpus_per_node": 4}}).run,
             tmp_path / "out")
    assert "warning: run.nproc 4 processes per job on run.slurm.cpus_per_task 1 CPU(s) (Slurm default)" in \
        capsys.readouterr().err


def test_filesystem_type_reads_the_mount_table():
    assert filesystem_type(Path("/proc")) == "proc"


def test_jobs_started_after_harness_is_edited_fork_from_a_new_server(suite_file, tmp_path, monkeypatch):
    # a server runs the code it imported: after an edit, its children would run old code under new fingerprints
    from harness import executors, forkserver

    class Server(forkserver.ForkServer):  # the real staleness check, without a server process
        def __init__(self):
            self._code, self.closed, self.ended = forkserver._code_stamp(), False, None

        def close(self):
            self.closed = True

    monkeypatch.setattr(executors, "ForkServer", Server)
    monkeypatch.setattr(executors, "_may_fork", lambda: True)
    monkeypatch.setattr(executors, "LocalAttempt", lambda spec, device, forks: type("A", (), {"id": 0, "forks": forks}))
    ex = Executor(load_suite(suite_file).run, tmp_path)
    try:
        first = ex.start("a", {"cells": []}, None).forks
        assert ex.start("b", {"cells": []}, None).forks is first and not first.stale()
        (path, size, mtime), *rest = forkserver._code_stamp()
        monkeypatch.setattr(forkserver, "_code_stamp", lambda: [(path, size, mtime + 1), *rest])  # one file touched
        assert first.stale()
        second = ex.start("c", {"cells": []}, None).forks
        assert second is not first and not second.stale() and ex._retired == [first] and not first.closed
    finally:
        ex.close()
    assert first.closed and second.closed  # the retired one at the end, with the jobs it forked


def test_a_job_whose_submitit_controller_is_killed_does_not_measure_on_unseen(suite_file, tmp_path, inject_fault):
    """The job id a user kills is submitit's controller: the task it started must end with it, not record the
    cells the runner has already recorded lost and submitted again."""
    # the job process's parent is the task (harness.executors.run_submitted); the task's, the controller
    inject_fault("import signal; controller = int(open(f'/proc/{os.getppid()}/stat').read().rsplit(')', 1)[1]"
                 ".split()[1]); os.kill(controller, signal.SIGKILL); time.sleep(3)")
    out = tmp_path / "out"
    run_suite(suite_file, out, only="attention/full/*", run={"executor": "submitit-local"})
    time.sleep(4)  # an orphan would have recorded by now
    assert [(r.cell, r.status) for r in results.load(out)] == [("attention/full/efficiency@64", "error")]


@pytest.mark.parametrize("squeue,refused", [
    ("echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1", "cannot tell whether"),
    ("echo RUNNING", "still queued or running"),
    ("echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1", None),  # long gone
])
def test_when_sacct_cannot_say_squeue_decides_and_no_answer_refuses(tmp_path, monkeypatch, squeue, refused):
    """submitit reads a failing sacct as UNKNOWN, which passed as not running: the rerun submitted the job again."""
    from harness.runner import _check_no_earlier_jobs_active

    slurm_tools(tmp_path, monkeypatch, sacct="echo 'sacct: error: Problem talking to the database' >&2; exit 1",
                squeue=squeue)
    out = tmp_path / "out"
    out.mkdir()
    (out / "jobs.jsonl").write_text(json.dumps({"job": "attention/full", "id": "4242", "executor": "slurm",
                                                "cells": 1, "submitted": "2026-01-01T00:00:00"}) + "\n")
    if refused is None:
        _check_no_earlier_jobs_active(["attention/full"], out)
    else:
        with pytest.raises(UserError, match=refused):
            _check_no_earlier_jobs_active(["attention/full"], out)


def test_a_slurm_job_sacct_knows_is_in_the_state_sacct_gives(tmp_path, monkeypatch):
    """squeue is asked only where sacct cannot say: a finished job it no longer lists is COMPLETED, not GONE."""
    from harness.executors import live_state

    slurm_tools(tmp_path, monkeypatch, sacct="printf 'JobID|State|NodeList\\n4242|COMPLETED|node1\\n'",
                squeue="echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1")
    entry = {"job": "attention/full", "id": "4242", "executor": "slurm", "cells": 1}
    assert live_state(entry, tmp_path) == "COMPLETED"


def test_jobs_submitted_at_once_each_keep_their_own_parameters(suite_file, tmp_path):
    """The runner starts jobs from several threads; submitit's parameters are its executor's, so a job submitted
    while another thread set its own devices would run on those."""
    import threading

    ex = Executor(load_suite(suite_file, {"executor": "submitit-local"}).run, tmp_path / "out")

    class Submitit:
        def update_parameters(self, **params):
            self.params = params

        def submit(self, fn, spec):
            time.sleep(0.2)  # another thread's update_parameters, unless they take turns
            return SimpleNamespace(job_id=f"{spec['device']}:{self.params['visible_gpus'][0]}")

    ex._submitit = Submitit()
    ids = []
    threads = [threading.Thread(target=lambda d=d: ids.append(ex.start(f"j{d}", {"cells": [], "device": d},
                                                                            str(d)).id)) for d in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ids) == ["1:1", "2:2"]


def test_a_cancellation_slurm_refuses_is_not_taken_for_done(tmp_path, monkeypatch, capsys):
    """A failed scancel was noted CANCELLED, and a rerun submitted the still-running job's cells again."""
    import submitit

    from harness.executors import SubmititAttempt

    slurm_tools(tmp_path, monkeypatch, scancel="echo 'scancel: error: Access/permission denied' >&2; exit 1")
    attempt = SubmititAttempt(submitit.SlurmJob(tmp_path / "%j", "4242"), "slurm")
    assert attempt.kill() is False
    assert "could not cancel slurm job 4242" in capsys.readouterr().err


@pytest.mark.parametrize("executor", ["local", "submitit-local"])
def test_a_suite_edited_during_a_run_stops_it_without_charging_its_cells(suite_file, tmp_path, monkeypatch,
                                                                        executor):
    """A job refuses a suite file that changed since the runner planned it: the run stops with that error, and
    its cells stay to measure (each was recorded failed, and a plain rerun then kept them all as results)."""
    from harness import executors

    start = executors.Executor.start

    def edit_then_start(self, name, spec, device):
        suite_file.write_text(suite_file.read_text() + "# edited\n")
        return start(self, name, spec, device)

    monkeypatch.setattr(executors.Executor, "start", edit_then_start)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"job attention/full could not start: .*s\.yaml changed since `harness run`"):
        run_suite(suite_file, out, only="attention/full/*", run={"executor": executor})
    assert not (out / results.RESULTS_FILE).exists() and not list(out.glob(".refused-*"))


def test_submitit_warnings_print_once():
    """submitit's logging config prints a warning on stdout and stderr: `--status` showed each sacct error twice."""
    from harness.executors import _submitit

    _submitit("slurm")

    def printed_by(level):
        record = logging.LogRecord("submitit", level, __file__, 0, "message", None, None)
        return [h.get_name() for h in logging.getLogger("submitit").handlers
                if level >= h.level and h.filter(record)]

    assert printed_by(logging.WARNING) == ["submitit_err"]
    assert printed_by(logging.INFO) == ["submitit_out"]


def test_a_stalled_submitit_local_job_is_ended_without_a_traceback(suite_file, tmp_path, inject_fault, capfd):
    """submitit's cancel interrupts its controller, which printed a KeyboardInterrupt traceback on the runner's
    terminal; the controller is killed instead, and its task ends the job (run_submitted)."""
    inject_fault("time.sleep(60)")
    out = tmp_path / "out"
    assert run_suite(suite_file, out, only="attention/full/*",
                     run={"executor": "submitit-local", "timeout": 3}).failed == {"timeout": 1}
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


@pytest.mark.parametrize("code, status", [(-9, "oom"), (137, "oom"), (1, "error"), (-15, "error")])
def test_a_job_process_killed_by_sigkill_counts_as_out_of_memory(code, status):
    """-9 where the runner waits on the process itself, 137 (128 + 9) where a shell or submitit reports it."""
    from harness.executors import exit_failure

    got, error = exit_failure(code)
    assert got == status and f"exited with code {code}" in error
    assert ("likely out of memory" in error) == (status == "oom")


def test_the_ledger_keeps_each_jobs_latest_attempt_and_its_own_end_only(tmp_path):
    """An older attempt's end must not mark the newer one, still running, ended: a rerun would submit it again."""
    def note(**entry):  # as the runner notes attempts
        results.locked_append(tmp_path / "jobs.jsonl", json.dumps({"job": "attention/full", "executor": "slurm",
                                                                   **entry}) + "\n")

    note(id="1", cells=2, submitted="2026-01-01T00:00:00")
    note(id="2", cells=1, submitted="2026-01-01T01:00:00")
    note(id="1", state="TIMEOUT", ended="2026-01-01T02:00:00")  # the first attempt's end, noted late
    with open(tmp_path / "jobs.jsonl", "a") as f:
        f.write('{"job": "attention/full", "id": "2", "sta')  # a runner killed mid-note
    assert ledger(tmp_path) == {"attention/full": {"job": "attention/full", "executor": "slurm", "id": "2",
                                                   "cells": 1, "submitted": "2026-01-01T01:00:00"}}
    note(id="2", state="COMPLETED", ended="2026-01-01T03:00:00")
    assert ledger(tmp_path)["attention/full"]["state"] == "COMPLETED"


def test_a_local_attempt_is_running_while_its_process_is_alive(tmp_path, monkeypatch):
    import subprocess

    from harness.executors import live_state

    entry = {"job": "attention/full", "executor": "local", "cells": 1}
    assert live_state({**entry, "id": str(os.getpid())}, tmp_path) == "RUNNING"
    assert live_state({**entry, "id": str(os.getpid()), "state": "COMPLETED"}, tmp_path) == "COMPLETED"

    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")  # another user's process: alive

    with monkeypatch.context() as m:
        m.setattr(os, "kill", kill)
        assert live_state({**entry, "id": "1"}, tmp_path) == "RUNNING"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True)
    assert live_state({**entry, "id": done.stdout.strip()}, tmp_path).startswith("GONE")


def test_an_attempt_on_another_machine_is_unknown_not_judged_by_this_ones_process_ids(suite_file, tmp_path):
    """A rerun from another container or node sharing OUT looked its process id up among its own processes: gone
    (and run twice) where that id is free here, running for ever where it is taken."""
    from types import SimpleNamespace

    from harness.cache import this_host
    from harness.executors import ledger, live_state
    from harness.runner import _check_no_earlier_jobs_active

    out = tmp_path / "out"
    ex = Executor(load_suite(suite_file, {"executor": "submitit-local"}).run, out)
    ex._submitit = SimpleNamespace(update_parameters=lambda **p: None, submit=lambda fn, spec: SimpleNamespace(
        job_id=str(os.getpid())))
    ex.start("attention/full", {"cells": []}, None)
    entry = ledger(out)["attention/full"]
    assert entry["host"] == this_host() and live_state(entry, out) == "RUNNING"
    elsewhere = {**entry, "host": "node7.pidns1"}
    assert live_state(elsewhere, out) == "UNKNOWN (its process is on node7.pidns1, which this machine cannot see)"
    (out / "jobs.jsonl").write_text(json.dumps({**elsewhere, "id": "999999999"}) + "\n")  # no such pid here
    with pytest.raises(UserError, match=r"cannot tell .* \(their processes are on another machine or container .*"
                                        r"attention/full \(submitit-local 999999999\); rerun there, or, once sure"):
        _check_no_earlier_jobs_active(["attention/full"], out)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="process start times come from /proc")
def test_a_process_started_after_the_attempt_is_not_the_attempts(tmp_path):
    """After a reboot (or pids wrapping round) a submitit-local controller's pid may belong to another process: a
    rerun waiting for it would never start, and its message would have the user kill that process."""
    import time

    from harness.executors import live_state

    entry = {"job": "attention/full", "executor": "submitit-local", "cells": 1, "id": str(os.getpid())}
    assert live_state({**entry, "submitted": "2000-01-01T00:00:00"}, tmp_path).startswith("GONE (its process id")
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    assert live_state({**entry, "submitted": now}, tmp_path) == "RUNNING"  # this process started before now
    assert live_state({**entry, "submitted": "not a time"}, tmp_path) == "RUNNING"  # cannot tell: as before


class _Job:
    """What SubmititAttempt reads of a submitit job: its state, whether it is done, its files, its outcome."""

    def __init__(self, tmp_path, state, result=None, exception=None, stderr=""):
        self.job_id, self.state, self._result, self._exception = "7", state, result, exception
        self.paths = SimpleNamespace(result_pickle=tmp_path / "7_result.pkl", stderr=tmp_path / "7.err")
        if result is not None or exception is not None:
            self.paths.result_pickle.write_bytes(b"")
        self.paths.stderr.write_text(stderr)

    def done(self):
        return self.state not in ("PENDING", "RUNNING")

    def exception(self):
        return self._exception

    def result(self):
        return self._result


@pytest.mark.parametrize("state, started", [("PENDING", False), ("CONFIGURING", False), ("REQUEUED", False),
                                            ("RUNNING", True), ("COMPLETED", True)])
def test_a_submitit_attempt_has_started_once_slurm_runs_it(tmp_path, state, started):
    """The runner's timeout counts from the start: a job waiting in the queue is not timed out."""
    from harness.executors import SubmititAttempt

    assert SubmititAttempt(_Job(tmp_path, state), "slurm").started() is started


@pytest.mark.parametrize("job, status, said", [
    (dict(state="OUT_OF_MEMORY", stderr="slurmstepd: error: Detected 1 oom_kill event"), "oom", "oom_kill event"),
    (dict(state="FAILED", result=137), "oom", "likely out of memory"),  # the job process SIGKILLed, said by its task
    (dict(state="FAILED", result=1), "error", "exited with code 1"),
    (dict(state="TIMEOUT", stderr="CANCELLED DUE TO TIME LIMIT"), "timeout", "TIME LIMIT"),
    (dict(state="FAILED", stderr=""), "error", "died without a result or a message"),
    (dict(state="FAILED", stderr="Traceback (most recent call last):\n  File \"x.py\"\nMemoryError"), "error",
     "FAILED: MemoryError"),  # the last line says what
])
def test_how_a_submitit_job_ended_is_its_records_status(tmp_path, job, status, said):
    from harness.executors import SubmititAttempt

    attempt = SubmititAttempt(_Job(tmp_path, **job), "slurm")
    assert attempt.poll() == 1
    got, error = attempt.failure()
    assert got == status and error.startswith(f"slurm job 7 ended {job['state']}: ") and said in error


def test_a_completed_submitit_job_whose_result_is_not_there_yet_is_not_taken_for_dead(tmp_path):
    """Only a job Slurm says COMPLETED may wait for its result file on a slow shared filesystem (submitit's
    `result` waits); any other without one died."""
    from harness.executors import SubmititAttempt

    job = _Job(tmp_path, "COMPLETED", stderr="")
    job.result = lambda: 0  # what submitit returns once the file has arrived
    assert SubmititAttempt(job, "slurm").poll() == 0


def test_a_local_attempt_removes_its_spec_file_once_its_process_has_ended(tmp_path):
    from harness.executors import LocalAttempt

    attempt = LocalAttempt({"suite": str(tmp_path / "none.yaml")}, None, None)  # the job fails at once
    spec = attempt._spec_file
    while attempt.poll() is None:
        time.sleep(0.05)
    assert attempt.code != 0 and not os.path.exists(spec)


def test_a_local_attempt_sees_only_its_own_devices(monkeypatch):
    """Each local job is given its GPU(s) through CUDA_VISIBLE_DEVICES, forked or started afresh; without a device
    it keeps the runner's."""
    from harness import executors

    seen = []

    class Server:
        def start(self, spec_file, env):
            seen.append(env.get("CUDA_VISIBLE_DEVICES"))
            return 1

    def popen(cmd, env, **kw):
        seen.append(env.get("CUDA_VISIBLE_DEVICES"))
        return SimpleNamespace(pid=1, poll=lambda: None)

    monkeypatch.setattr(executors.subprocess, "Popen", popen)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    for device, server in (("3", None), ("1,2", Server()), (None, None)):
        os.unlink(executors.LocalAttempt({"cells": []}, device, server)._spec_file)
    assert seen == ["3", "1,2", "0,1,2,3"]


def test_a_submitit_local_job_gets_its_devices_and_the_suites_time_limit(suite_file, tmp_path, monkeypatch):
    """submitit's LocalExecutor would otherwise show each job every GPU, and kill it after its default 2 minutes."""
    run = load_suite(suite_file, {"executor": "submitit-local", "slurm": {"time_min": 30}}).run
    ex = Executor(run, tmp_path / "out")
    submitted = []
    monkeypatch.setattr(ex._submitit, "submit",
                        lambda fn, spec: submitted.append(dict(ex._submitit.parameters)) or SimpleNamespace(job_id=7))
    for device in ("1,3", None):
        ex.start("attention/full", {"cells": [{"id": "c"}]}, device)
    assert [(p["visible_gpus"], p["timeout_min"]) for p in submitted] == [((1, 3), 30), ((), 30)]


def test_slurm_warns_of_a_node_local_results_directory_and_of_too_few_cpus_only(suite_file, tmp_path, monkeypatch,
                                                                                  capsys):
    fake_sbatch(tmp_path, monkeypatch)
    monkeypatch.setattr("harness.executors.filesystem_type", lambda path: "ext4" if path.name == "out" else "nfs4")
    Executor(load_suite(suite_file, {"executor": "slurm", "nproc": 2,
                                     "slurm": {"gpus_per_node": 2, "cpus_per_task": 2}}).run, tmp_path / "out")
    err = capsys.readouterr().err
    assert f"warning: the results directory {tmp_path / 'out'} is on a node-local filesystem (ext4)" in err
    assert "(--out)" in err and "HARNESS_CACHE" not in err and "artefact cache" not in err
    assert "run.nproc" not in err  # as many CPUs as processes



def test_a_paths_filesystem_is_that_of_the_last_mount_at_its_closest_mount_point(monkeypatch):
    """A mount hides an earlier one at the same point (an automounted local disk: autofs, then xfs), and a mount
    point is a whole path component (/scratch is not above /scratch2)."""
    real = Path.read_text
    mounts = ("/dev/sda1 / ext4 rw 0 0\nsystemd-1 /scratch autofs rw 0 0\n/dev/sdb1 /scratch xfs rw 0 0\n"
              "server:/home /home nfs4 rw 0 0\n/dev/sdc1 /data\\040disk ext3 rw 0 0\n")
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **kw: mounts if str(self) == "/proc/mounts"
                        else real(self, *a, **kw))
    assert filesystem_type(Path("/scratch/me/cache")) == "xfs"
    assert filesystem_type(Path("/scratch2/cache")) == "ext4"
    assert filesystem_type(Path("/home/me")) == "nfs4"
    assert filesystem_type(Path("/data disk/cache")) == "ext3"  # the table writes a space as \040


def test_killing_a_local_attempt_ends_the_processes_its_job_started(tmp_path, monkeypatch):
    """A job's own children (torchrun's ranks, say) go with it: left running, they would record cells the runner
    has already recorded lost."""
    from harness import executors

    pidfile = tmp_path / "child.pid"
    job = (f"import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
           f"time.sleep(60)']); open({str(pidfile)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    monkeypatch.setattr(executors, "_job_command", lambda spec_file: [sys.executable, "-c", job])
    attempt = executors.LocalAttempt({"cells": []}, None, None)
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "the job never started its child"
        time.sleep(0.05)
    child = int(pidfile.read_text())
    assert attempt.kill()

    def ended() -> bool:  # gone, or a zombie that nothing reaps here
        try:
            return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    deadline = time.monotonic() + 5
    while not ended():
        assert time.monotonic() < deadline, "the job's child outlived it"
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file() or not hasattr(__import__("time"), "tzset"),
                    reason="process start times come from /proc; TZ is switched with time.tzset")
def test_a_runner_in_another_time_zone_does_not_take_a_running_job_for_gone(tmp_path, monkeypatch):
    """The ledger's `submitted` is the writing runner's local time: read by a runner whose TZ is east of it (a
    login shell's zone against a container's UTC), a job still running read as started after its submission,
    GONE, and the rerun measured its cells again, beside it."""
    import time

    from harness.executors import live_state

    entry = {"job": "attention/full", "executor": "submitit-local", "cells": 1, "id": str(os.getpid())}
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    legacy = {**entry, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
    exact = {**legacy, "submitted_unix": time.time()}
    try:
        monkeypatch.setenv("TZ", "Europe/Berlin")
        time.tzset()
        assert live_state(legacy, tmp_path) == "RUNNING"
        assert live_state(exact, tmp_path) == "RUNNING"
        assert live_state({**exact, "submitted_unix": time.time() - 3 * 86400}, tmp_path).startswith("GONE")
        assert live_state({**legacy, "submitted": "2000-01-01T00:00:00"}, tmp_path).startswith("GONE")
    finally:
        monkeypatch.undo()
        time.tzset()
