"""Front door: `nox -s tests`, `nox -s lint`, `nox -s suite-pg19`.

Every session but `tests-latest`, `lock` and `gpu-check` (which installs nothing) installs the
exact versions of constraints.txt, the ones the tests and the README's numbers were run with.
Torch, by machine: on a CPU machine the CPU build pinned there (`torch==2.13.0`, which pip takes
from local disk where available; an unpinned torch would pull a multi-GB CUDA build); on a CUDA
machine the venv sees the system's site-packages so a working CUDA torch is reused, never
replaced. Override with HARNESS_TORCH (a pip requirement, e.g. "torch==2.14.1").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

CUDA = shutil.which("nvidia-smi") is not None

nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests"]
# uv where it is installed (`pip install nox uv`), else virtualenv and pip: a fresh suite venv took 16 s with uv
# against 48 s with pip (2 cores), and the same versions come out of constraints.txt either way. On CUDA machines
# virtualenv and pip as before: that uv would keep the system's CUDA torch seen through --system-site-packages
# (instead of resolving torch itself) has not been tried.
nox.options.default_venv_backend = "virtualenv" if CUDA else "uv|virtualenv"

CONSTRAINTS = Path(__file__).parent / "constraints.txt"
CPU_TORCH = next(line for line in CONSTRAINTS.read_text().splitlines() if line.startswith("torch=="))


# Installs byte-compile what they install (pip's default; uv's with UV_COMPILE_BYTECODE): where
# PYTHONDONTWRITEBYTECODE is set, as on the CI machines, Python never writes the bytecode it compiles, so without
# it every process compiled torch and transformers again on import (`import harness.job` 10.4 s instead of 4.6 s)
# and the tests, whose jobs are processes, took 933 s instead of about 530.


def _uv_env(session: nox.Session) -> dict[str, str]:
    """The environment of an install: for uv, byte-compiling (above) and the find-links locations pip is configured
    with, which uv does not read (where the machine keeps its CPU torch wheel, as on the CI machines)."""
    if session.venv_backend != "uv":
        return {}
    env = {"UV_COMPILE_BYTECODE": "1"}
    config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    links = [value.strip("'\"") for key, _, value in (line.partition("=") for line in config.splitlines())
             if key.endswith(".find-links")]
    if links and "UV_FIND_LINKS" not in os.environ:
        env["UV_FIND_LINKS"] = ",".join(dict.fromkeys(" ".join(links).split()))  # pip: spaces; uv: commas
    return env


def _freeze(session: nox.Session, silent: bool) -> str:
    """`pip freeze` of the session's venv (uv's venvs have no pip)."""
    if session.venv_backend == "uv":  # -q: uv names the venv on stderr, which nox merges into what it returns
        return session.run("uv", "pip", "freeze", "-q", "--exclude-editable", silent=silent)
    return session.run("pip", "freeze", "--exclude-editable", silent=silent)


def install(session: nox.Session, *extras: str, pinned: bool = True) -> None:
    """Torch first (see the module doc), then the package with `extras`: at the versions of constraints.txt,
    or (pinned False) at the newest that pyproject.toml allows. Torch stays as installed either way."""
    env = _uv_env(session)
    torch_req = os.environ.get("HARNESS_TORCH") or (None if CUDA else CPU_TORCH)
    if torch_req:
        session.install(torch_req, env=env)
    else:  # the machine's CUDA torch, seen through --system-site-packages
        version = session.run("python", "-c", "import torch; print(torch.__version__)", silent=True)
        torch_req = f"torch=={version.strip()}"
    pins = [line for line in CONSTRAINTS.read_text().splitlines() if not line.startswith("torch==")] if pinned else []
    constraints = Path(session.create_tmp()) / "constraints.txt"
    constraints.write_text("\n".join([*pins, torch_req]) + "\n")
    eager = [] if session.venv_backend == "uv" else ["--upgrade-strategy", "eager"]  # uv's --upgrade is eager
    upgrade = [] if pinned else ["--upgrade", *eager]
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-c", str(constraints), *upgrade, "-e", spec, env=env)


@nox.session(venv_params=["--system-site-packages"] if CUDA else [])
def tests(session: nox.Session) -> None:
    """Run the test suite (fast, CPU; pass `-- -m gpu` on a CUDA machine)."""
    install(session, "dev")
    session.run("pytest", "-q", *_workers(), *session.posargs)


def _workers() -> list[str]:
    """pytest-xdist's worker count on a CPU machine: one per core, at most 4 (each holds torch and transformers,
    and starts job processes of its own). The tests spend much of their time starting and waiting on job
    processes, so on 2 cores a second worker took the run from 461 s to 301 s. On CUDA the GPU tests run in one
    process. `nox -s tests -- -n 0` runs everything in one."""
    return [] if CUDA else ["-n", str(min(4, os.cpu_count() or 1))]


@nox.session(name="tests-latest", venv_params=["--system-site-packages"] if CUDA else [])
def tests_latest(session: nox.Session) -> None:
    """The test suite on the newest versions pyproject.toml allows (torch as in `tests`): shows an upstream
    change as one failing session before the pins move. Not part of CI's required run."""
    install(session, "dev", pinned=False)
    _freeze(session, silent=False)
    session.run("pytest", "-q", *_workers(), *session.posargs)


@nox.session(venv_params=["--system-site-packages"] if CUDA else [])
def lock(session: nox.Session) -> None:
    """Re-pin constraints.txt to the newest versions pyproject.toml allows (torch keeps its CPU pin: change
    that line by hand). Then run `nox -s tests` and the README's suites, and commit the new pins on their own."""
    install(session, "dev", pinned=False)
    frozen = _freeze(session, silent=True)
    header = [line for line in CONSTRAINTS.read_text().splitlines() if line.startswith("#")]
    pins = [CPU_TORCH if line.startswith("torch==") else line for line in frozen.splitlines()
            if line and not line.startswith("#")]
    CONSTRAINTS.write_text("\n".join(header + pins) + "\n")
    session.log(f"wrote {len(pins)} pins to {CONSTRAINTS.name}; `git diff {CONSTRAINTS.name}` shows what moved")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("-c", str(CONSTRAINTS), "ruff")
    session.run("ruff", "check", "harness", "tests", "benchmarks", "noxfile.py")


SUITES = {
    "suite-pg19": "suites/pg19.yaml",
    "suite-ruler": "suites/ruler.yaml",
    "suite-efficiency": "suites/efficiency.yaml",
    "suite-efficiency-limit": "suites/efficiency-limit.yaml",
    "suite-efficiency-gpu": "suites/efficiency-gpu.yaml",
    "suite-ablation": "suites/ablation.yaml",
    "suite-paper": "suites/paper.yaml",
}
VENV = {"venv_params": ["--system-site-packages"] if CUDA else []}


def _suite_session(path: str):
    def session_fn(session: nox.Session) -> None:
        install(session)
        session.run("harness", "run", path, *session.posargs)

    session_fn.__doc__ = f"harness run {path} (extra arguments after --, e.g. -- --pg19 DIR --out DIR)"
    return session_fn


for _name, _path in SUITES.items():
    nox.session(name=_name, **VENV)(_suite_session(_path))


@nox.session(name="gpu-check", venv_backend="none")
def gpu_check(session: nox.Session) -> None:
    """`harness check gpu` with this machine's Python and packages as they are (GPU machines have no network, so
    nothing is installed): the GPU tests, attention at 32 heads x 128, a fine-tune per backend and method."""
    session.run("python", "-m", "harness.cli", "check", "gpu", *session.posargs,
                env={"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                 os.environ.get("PYTHONPATH")]))})


@nox.session(**VENV)
def report(session: nox.Session) -> None:
    """Render reports: `nox -s report -- reports/pg19 [reports/other ...]` (several: a comparison).

    With no arguments: render the demo report (reports/demo) and check it in headless Chromium
    (needs Debian's chromium) with a screenshot under .nox/report-shots/.
    """
    install(session, "dev")
    if session.posargs:
        session.run("harness", "report", *session.posargs)
        return
    session.run("python", "-m", "harness.report.demo", "reports/demo")
    session.run("pytest", "-q", "-m", "slow", "tests/test_report_render.py", "--basetemp", ".nox/report-shots")


@nox.session(**VENV)
def regress(session: nox.Session) -> None:
    """Regression gate: time the efficiency cells of HARNESS_BASE_REV (default origin/main) and of the working tree
    interleaved in this job, then run the pg19 suite into reports/regress/pg19 and compare it with its stored
    baseline (HARNESS_BASELINE/pg19, HARNESS_BASELINE default reports/baselines; perplexity and RULER are
    deterministic). Exit non-zero on a regression."""
    install(session)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    extra = ["--summary", summary] if summary else []
    session.run("harness", "compare", "--rev", os.environ.get("HARNESS_BASE_REV", "origin/main"), *extra)
    baseline = os.environ.get("HARNESS_BASELINE", "reports/baselines")
    session.run("harness", "run", "suites/pg19.yaml", "--out", "reports/regress/pg19", *session.posargs)
    session.run("harness", "compare", f"{baseline}/pg19", "reports/regress/pg19", *extra)
