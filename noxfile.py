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


@nox.session(name="suite-pg19", venv_params=["--system-site-packages"] if CUDA else [])
def suite_pg19(session: nox.Session) -> None:
    """Pretrain (cached) the embedded model, fine-tune at 8x with LoRA, report perplexity vs context.

    Extra arguments go to `harness run`, e.g. `nox -s suite-pg19 -- --pg19 ../shared/data/pg19`.
    """
    install(session)
    session.run("harness", "run", "suites/pg19.yaml", *session.posargs)


@nox.session(venv_params=["--system-site-packages"] if CUDA else [])
def report(session: nox.Session) -> None:
    """Re-render the report of a results directory: `nox -s report -- reports/pg19`."""
    install(session)
    session.run("harness", "report", *(session.posargs or ["reports/pg19"]))
