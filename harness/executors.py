"""Where a suite's jobs run (`run.executor`): each attempt at a job is a child process on this machine (`local`),
a job of submitit's LocalExecutor (`submitit-local`: tests and single boxes), or one Slurm job through submitit
(`slurm`). The runner (harness.runner) supervises attempts alike: it polls them, counts the records they write,
kills one that stops writing, and starts another for the cells left.

Every attempt is noted in OUT/jobs.jsonl (`harness run SUITE --status` reads it), so a rerun never submits a job
again while an earlier submission of it is still queued or running.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness.cache import cache_root, this_host
from harness.errors import UserError
from harness.forkserver import ForkServer

LEDGER = "jobs.jsonl"
#: A job attempt that cannot start (its suite file was edited since the runner planned it, say) writes its error
#: to OUT/REFUSED.format(its spec's "attempt") for the runner to stop with: charged to its cells, it would fail
#: every one.
REFUSED = ".refused-{}"
ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING")
# Filesystems of one node: a cache or results directory there is not seen by jobs on other nodes.
NODE_LOCAL = ("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "ramfs")


class LocalAttempt:
    """One job attempt as a child process on this machine: forked from the runner's warm fork server
    (harness.forkserver) where it has one, else a fresh `python -m harness.job SPEC.json`."""

    poll_every = 0.5  # seconds between the runner's looks at it

    def __init__(self, spec: dict, device: str | None, server: ForkServer | None):
        self._spec_file = _spec_file(spec)
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": device} if device is not None else {})}
        if server is None:
            proc = subprocess.Popen(_job_command(self._spec_file), env=env, start_new_session=True)
            self._pid, self._exit_code = proc.pid, proc.poll
        else:
            self._pid = server.start(self._spec_file, env)
            self._exit_code = lambda: server.exit_code(self._pid)
        self.id, self.code = str(self._pid), None

    def poll(self) -> int | None:
        if self.code is None and (code := self._exit_code()) is not None:
            self.code = code
            os.unlink(self._spec_file)
        return self.code

    def started(self) -> bool:
        return True

    def kill(self) -> bool:
        """SIGKILL to the job's session (its own children too), then wait for it to end; True (it did)."""
        for kill in (os.killpg, os.kill):  # a just-forked child may not lead its session yet
            try:
                kill(self._pid, signal.SIGKILL)
                break
            except ProcessLookupError:
                pass
        while self.poll() is None:
            time.sleep(0.05)
        return True

    def failure(self) -> tuple[str, str]:
        """(status, error) of an attempt that ended with cells left."""
        return exit_failure(self.code)


def exit_failure(code: int) -> tuple[str, str]:
    """(status, error) of a job process that ended with exit `code`: SIGKILL is what the OOM killer sends."""
    killed = code in (-9, 137)
    return "oom" if killed else "error", f"job process exited with code {code}" + (
        " (killed: likely out of memory)" if killed else "")


def run_submitted(spec: dict) -> int:
    """A submitit task: the job as a child process (`python -m harness.job SPEC`), as a local attempt runs it, so
    that its exit code reaches the runner (submitit's own task would die with the job, SIGKILLed by the OOM
    killer, and say nothing). The child ends with this task (harness.job's exit_with_parent), and this task,
    with the child, when its own parent goes (submitit's controller, whose pid is the job id a user kills;
    slurmstepd): an orphan measuring on would record cells the runner has already recorded lost."""
    spec_file = _spec_file(spec)
    parent, child = os.getppid(), subprocess.Popen(_job_command(spec_file))
    try:
        while (code := child.poll()) is None:
            if os.getppid() != parent:  # orphaned: the job goes (below), and this task ends
                return 1
            time.sleep(0.5)
        return code
    finally:
        if child.poll() is None:  # interrupted (a cancelled job): the job goes with this task
            child.kill()
        os.unlink(spec_file)


def _spec_file(spec: dict) -> str:
    """A job attempt's spec as a temporary JSON file (its path), for `python -m harness.job`."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    return f.name


def _job_command(spec_file: str) -> list[str]:
    return [sys.executable, "-m", "harness.job", spec_file]


class SubmititAttempt:
    """One job attempt submitted through submitit (its LocalExecutor, or Slurm)."""

    poll_every = 2.0  # its state comes from Slurm's accounting, which submitit asks at most every few seconds

    def __init__(self, job, executor: str):
        self._job, self.executor, self.id = job, executor, str(job.job_id)
        self._outcome: tuple[str | None, int | None] | None = None  # (error or None, job exit code) once done

    def poll(self) -> int | None:
        if not self._job.done():
            return None
        return 0 if self._error() is None else 1

    def started(self) -> bool:
        return self._job.state not in ("PENDING", "UNKNOWN", "REQUEUED", "CONFIGURING")

    def kill(self) -> bool:
        """Cancel the job (scancel); False, with a warning, where that failed: the job may still run. A local one
        by killing its controller, whose task then ends its job (run_submitted): submitit's cancel interrupts the
        controller, which prints a KeyboardInterrupt traceback on the runner's terminal."""
        try:
            if self.executor == "submitit-local":
                if not self._job.done():  # polls it: until reaped there, its pid is still this controller's
                    os.kill(int(self.id), signal.SIGKILL)
            else:
                self._job.cancel(check=True)
            return True
        except Exception as e:  # noqa: BLE001 - scancel refused (permissions, Slurm down): say so, go on
            print(f"warning: could not cancel {self.executor} job {self.id} ({_sbatch_error(e)}); it may still be "
                  "queued or running: cancel it yourself (scancel), or a rerun will wait for it", file=sys.stderr)
            return False

    def failure(self) -> tuple[str, str]:
        state, error = self._job.state, self._error()
        code = self._outcome[1]  # where the job process ended, its exit code says how
        status = ("oom" if state == "OUT_OF_MEMORY" else exit_failure(code)[0] if code is not None
                  else "timeout" if state == "TIMEOUT" else "error")
        return status, f"{self.executor} job {self.id} ended {state}: {(error or 'no error')[:300]}"

    def _error(self) -> str | None:
        """None if the job process exited 0; else how it ended (read once): its exit code (run_submitted), or
        the last line of what the task raised or wrote to stderr. A task that died without a result (killed,
        os._exit) is told by the missing result file at once: submitit itself would wait for the file in case a
        shared filesystem is slow, which only a job Slurm says COMPLETED can need."""
        if self._outcome is None:
            job = self._job
            if not job.paths.result_pickle.exists() and job.state != "COMPLETED":
                err = job.paths.stderr.read_text(errors="replace").strip() if job.paths.stderr.exists() else ""
                self._outcome = ((err.splitlines() or ["died without a result or a message"])[-1], None)
            elif (exc := job.exception()) is not None:
                self._outcome = (_raised(exc), None)
            else:
                code = job.result()
                self._outcome = (None if code == 0 else exit_failure(code)[1], code)
        return self._outcome[0]


def _raised(exc: Exception) -> str:
    """The last line of the traceback a submitit task raised (FailedJobError quotes it between dashed lines,
    then names the log files), else of the exception's text."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    dashes = [i for i, line in enumerate(lines) if set(line.strip()) == {"-"}]
    trace = lines[dashes[0] + 1:dashes[1]] if len(dashes) >= 2 else lines
    return (trace or [type(exc).__name__])[-1].strip()


class Executor:
    """Starts attempts at jobs (`start`) and keeps OUT/jobs.jsonl."""

    def __init__(self, run, out: Path):
        self.kind, self.out = run.executor, out
        self._lock = threading.Lock()
        self._submitit = None
        if self.kind != "local":
            self._submitit = _submitit_executor(run, out)
        self._forks: ForkServer | None = None
        self._retired: list[ForkServer] = []  # stale servers, kept until the end for the jobs they forked

    def close(self) -> None:
        """End the fork servers, if any were started."""
        for server in [*self._retired, *([self._forks] if self._forks else [])]:
            server.close()
        self._forks, self._retired = None, []

    def start(self, name: str, spec: dict, device: str | None):
        if self._submitit is None:
            with self._lock:
                if self._forks is not None and (self._forks.stale() or self._forks.ended is not None):
                    # harness was edited: fork new code; or the server died (killed): a new one
                    self._retired.append(self._forks)
                    self._forks = None
                if self._forks is None and _may_fork():
                    self._forks = ForkServer()
            attempt = LocalAttempt(spec, device, self._forks)
        else:
            params = {"job_name": f"harness-{name}"} if self.kind == "slurm" else {
                "visible_gpus": tuple(int(d) for d in device.split(",")) if device is not None else ()}
            with self._lock:  # the parameters are the executor's: one submission at a time
                self._submitit.update_parameters(**params)
                try:
                    job = self._submitit.submit(run_submitted, spec)
                except Exception as e:  # noqa: BLE001 - sbatch refusing (a bad partition, say) is the user's to fix
                    raise UserError(f"job {name}: {self.kind} refused the submission: {_sbatch_error(e)}") from None
            attempt = SubmititAttempt(job, self.kind)
        where = {} if self.kind == "slurm" else {"host": this_host()}  # whose process ids `id` is one of
        self._note({"job": name, "id": attempt.id, "executor": self.kind, "cells": len(spec["cells"]),
                    "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "submitted_unix": round(time.time(), 3),
                    **where})
        return attempt

    def ended(self, name: str, attempt, state: str) -> None:
        self._note({"job": name, "id": attempt.id, "executor": self.kind, "state": state,
                    "ended": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def _note(self, entry: dict) -> None:
        from harness.results import locked_append

        locked_append(self.out / LEDGER, json.dumps(entry) + "\n")


def _submitit(executor: str):
    """submitit, its warnings printed once: its logging config sends them to stdout (handler "submitit_out") as
    well as stderr."""
    try:
        import submitit
    except ImportError:
        raise UserError(f"run.executor {executor} needs submitit: pip install 'harness[cluster]'") from None
    for handler in logging.getLogger("submitit").handlers:
        if handler.get_name() == "submitit_out" and not handler.filters:
            handler.addFilter(lambda record: record.levelno < logging.WARNING)
    return submitit


def _submitit_executor(run, out: Path):
    submitit = _submitit(run.executor)
    folder = out / "submitit" / "%j"
    if run.executor == "submitit-local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=run.slurm.time_min)
        return ex
    if missing := [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]:
        raise UserError(f"run.executor slurm: no `{'`, `'.join(missing)}` on PATH; run harness from a Slurm login "
                        "node (or use executor: submitit-local on one machine)")
    for what, path in (("the artefact cache", cache_root()), ("the results directory", out)):
        if (kind := filesystem_type(path)) in NODE_LOCAL:
            print(f"warning: {what} {path} is on a node-local filesystem ({kind}): jobs on other nodes will not see "
                  "it; put it on a shared filesystem" + (" (set HARNESS_CACHE)" if "cache" in what else " (--out)"),
                  file=sys.stderr)
    s = run.slurm
    if s.gpus_per_node is None and not GPU_REQUESTS & {k.replace("-", "_") for k in s.additional}:
        print("warning: run.slurm.gpus_per_node is not set: each job asks Slurm for no GPU and runs on its node's "
              "CPU, unless the partition hands out GPUs by default; set it (--gpus-per-node N, at least run.nproc), "
              "or to 0 for a study on CPU nodes", file=sys.stderr)
    if run.nproc > (s.cpus_per_task or 1):
        print(f"warning: run.nproc {run.nproc} processes per job on run.slurm.cpus_per_task {s.cpus_per_task or 1} "
              f"CPU(s){' (Slurm default)' if s.cpus_per_task is None else ''}: they take turns on them; set "
              f"cpus_per_task (--cpus-per-task) to at least {run.nproc}", file=sys.stderr)
    ex = submitit.SlurmExecutor(folder=folder)
    ex.update_parameters(partition=s.partition, gpus_per_node=s.gpus_per_node, cpus_per_task=s.cpus_per_task,
                         time=s.time_min, account=s.account, additional_parameters=dict(s.additional) or None)
    return ex


#: sbatch options that ask for GPUs, in `run.slurm.additional` (submitit passes a key's "_" as "-", and "-" as is).
GPU_REQUESTS = {"gres", "gpus", "gpus_per_node", "gpus_per_task", "gpus_per_socket", "tres_per_task"}


def _may_fork() -> bool:
    """Whether local jobs are forked from a fork server: where torch sees no CUDA device (harness.forkserver
    says why), unless HARNESS_FORKSERVER=0 asks for a fresh interpreter per job."""
    return os.environ.get("HARNESS_FORKSERVER") != "0" and visible_gpus() == 0


def visible_gpus() -> int:
    """The CUDA devices this process sees (0 where torch is missing)."""
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def _sbatch_error(e: Exception) -> str:
    """sbatch's own message out of submitit's exception (it quotes the command's output)."""
    text = str(e)
    lines = [line.strip() for line in text.splitlines() if "error" in line.lower()]
    return (lines[-1] if lines else text.strip().splitlines()[-1] if text.strip() else type(e).__name__)[:500]


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem `path` is on: the last mount at the longest mount point above it in /proc/mounts
    (a later mount hides an earlier one there: autofs, then the disk it mounts)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target, best = str(Path(path).resolve()), (None, "")
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), parts[1])  # "/my\040disk": "/my disk"
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[1]):
            best = (parts[2], point)
    return best[0]


def ledger(out: Path) -> dict[str, dict]:
    """Each job's latest attempt in OUT/jobs.jsonl: {job: {id, executor, cells, submitted, state?, ended?}}."""
    path = out / LEDGER
    latest: dict[str, dict] = {}
    if not path.is_file():
        return latest
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "submitted" in entry:
            latest[entry["job"]] = entry
        elif entry.get("job") in latest and latest[entry["job"]]["id"] == entry.get("id"):
            latest[entry["job"]].update(entry)
    return latest


def live_state(entry: dict, out: Path) -> str:
    """The state of a ledger entry's attempt now: its final state if the runner saw it end, else asked of the
    executor (Slurm's accounting, or whether the process is alive)."""
    if "state" in entry:
        return entry["state"]
    if entry["executor"] == "slurm":
        try:
            state = _submitit("slurm").SlurmJob(out / "submitit" / "%j", entry["id"]).state
        except Exception as e:  # noqa: BLE001 - no sacct here: ask squeue below
            state = f"UNKNOWN ({type(e).__name__})"
        if not state.startswith("UNKNOWN"):
            return state
        queued = _squeue_state(entry["id"])  # submitit says UNKNOWN where sacct fails or lacks the job
        return state if queued is None else queued or "GONE (Slurm no longer lists it)"
    if entry.get("host", this_host()) != this_host():  # another machine's, or container's, process id
        return f"UNKNOWN (its process is on {entry['host']}, which this machine cannot see)"
    try:
        os.kill(int(entry["id"]), 0)
    except (ProcessLookupError, ValueError):
        return "GONE (its runner stopped before it ended)"
    except PermissionError:
        pass
    if _started_after(int(entry["id"]), entry.get("submitted"), entry.get("submitted_unix")):
        return "GONE (its process id now belongs to a process started after it: a reboot, or ids wrapped round)"
    return "RUNNING"


# UTC+14 to UTC-12, and the second the stamp was cut
SUBMITTED_ZONE_SLACK_S = 26 * 3600 + 2


def _started_after(pid: int, submitted: str | None, submitted_unix: float | None = None) -> bool:
    """Whether process `pid` started after the job's submission, so that it is not the job's: False where this
    system cannot tell (no /proc). `submitted_unix` (seconds since the epoch) is exact. A ledger written before it
    was recorded has only `submitted`, a local time of the runner that wrote it, whose zone (TZ, a container's,
    DST's repeated hour) a later runner cannot know: it reads as up to SUBMITTED_ZONE_SLACK_S off, so that a job
    still running is never taken for gone (and run twice)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        started = boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: ticks since boot
        if isinstance(submitted_unix, (int, float)) and not isinstance(submitted_unix, bool):
            return started > submitted_unix + 2  # + btime's whole seconds and the ticks' rounding
        return started > time.mktime(time.strptime(submitted, "%Y-%m-%dT%H:%M:%S")) + SUBMITTED_ZONE_SLACK_S
    except (OSError, ValueError, TypeError, IndexError, StopIteration, OverflowError):
        return False


def _squeue_state(job_id: str) -> str | None:
    """The job's state as squeue lists it; "" where Slurm no longer lists it; None where squeue cannot say."""
    try:
        run = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if run.returncode == 0:
        return run.stdout.strip().splitlines()[0] if run.stdout.strip() else ""
    return "" if "invalid job id" in run.stderr.lower() else None
