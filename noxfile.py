"""Front door: `nox -s tests`, `nox -s lint`, `nox -s suite-pg19`.

Torch is installed first, by machine: on a CPU machine the CPU build
(`torch==2.13.0`, which pip takes from local disk where available; an unpinned
torch would pull a multi-GB CUDA build); on a CUDA machine the venv sees the
system's site-packages so a working CUDA torch is reused, never downgraded.
Override with HARNESS_TORCH (a pip requirement, e.g. "torch==2.14.1").
"""

from __future__ import annotations

import os
import shutil

import nox

nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests"]

CUDA = shutil.which("nvidia-smi") is not None
CPU_TORCH = "torch==2.13.0"


def install(session: nox.Session, *extras: str) -> None:
    torch_req = os.environ.get("HARNESS_TORCH") or (None if CUDA else CPU_TORCH)
    if torch_req:
        session.install(torch_req)
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec)


@nox.session(venv_params=["--system-site-packages"] if CUDA else [])
def tests(session: nox.Session) -> None:
    """Run the test suite (fast, CPU; pass `-- -m gpu` on a CUDA machine)."""
    install(session, "dev")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "harness", "tests", "noxfile.py")


SUITES = {
    "suite-pg19": "suites/pg19.yaml",
    "suite-ruler": "suites/ruler.yaml",
    "suite-efficiency": "suites/efficiency.yaml",
    "suite-ablation": "suites/ablation.yaml",
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
    """Regression gate: run the efficiency and pg19 suites into reports/regress/ and compare each with a
    baseline (HARNESS_BASELINE, default reports/baselines/). Exit non-zero on a regression."""
    install(session)
    baseline = os.environ.get("HARNESS_BASELINE", "reports/baselines")
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    for suite in ("efficiency", "pg19"):
        head = f"reports/regress/{suite}"
        session.run("harness", "run", f"suites/{suite}.yaml", "--out", head, *session.posargs)
        extra = ["--summary", summary] if summary else []
        session.run("harness", "compare", f"{baseline}/{suite}", head, *extra)
