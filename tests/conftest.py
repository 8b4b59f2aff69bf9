"""Shared fixtures, and one intra-op thread per process."""

import os
from pathlib import Path

# The tests run tiny models, where a second intra-op thread only adds contention: on 2 cores a RULER cell took
# 1.7 s with one thread and 112 s with two beside other work. One thread here, and (through the
# environment) in every job, fork server and torchrun rank the tests start. A value already set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin imported torch before this file


@pytest.fixture
def drop_cache():
    """Make a model lose its cache between decoding steps, as the hybrid did under transformers 5.24 (the cache
    came under a name its forward did not read): every step then starts from an empty cache."""
    from harness.models.cache_args import CACHE_NAMES

    def drop(model):
        forward = model.forward
        model.forward = lambda *a, **kw: forward(*a, **{k: v for k, v in kw.items() if k not in CACHE_NAMES})
        return model

    return drop


FAULT = """
import os, sys, time
if {"harness.job", "harness.forkserver"} & set(sys.orig_argv):  # job processes only: submitit's import nothing
    import harness.attention.bench as bench
    real = bench.bench_attention
    def faulty(backends, lengths, **kw):
        if backends[0][0] == "full":
            {action}
        return real(backends, lengths, **kw)
    bench.bench_attention = faulty
"""


@pytest.fixture
def inject_fault(tmp_path, monkeypatch):
    """`inject_fault(action)`: job processes started from now on run `action` (Python) when they time the full
    attention backend. Fault injection from outside the code: a child imports sitecustomize.py from PYTHONPATH at
    start-up."""

    def inject(action: str) -> None:
        (tmp_path / "fault").mkdir(exist_ok=True)
        (tmp_path / "fault" / "sitecustomize.py").write_text(FAULT.replace("{action}", action))
        # ahead of the rest, not instead of it: the job must import this checkout's harness, not an installed one
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "fault"), *filter(None, [
            os.environ.get("PYTHONPATH"), str(Path(__file__).parent.parent)])]))

    return inject


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """An empty artefact cache under tmp_path, and no PG-19 root from the environment: suites run on the embedded
    corpus."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARNESS_PG19_DIR", raising=False)
    return tmp_path / "cache"
