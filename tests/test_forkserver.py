"""The fork server's protocol, with a stand-in for harness.job (no torch to import): a child runs its spec file as
Python."""

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from harness import forkserver

JOB = """
import sys, types
if "harness.forkserver" in sys.orig_argv:  # the server only: a harness.job whose main runs the spec as Python
    job = types.ModuleType("harness.job")
    job.__file__ = __file__
    job.main = lambda spec: exec(open(spec).read())
    sys.modules["harness.job"] = job
"""


@pytest.fixture
def server(tmp_path, monkeypatch):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(JOB)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), str(Path(__file__).parent.parent)]))
    server = forkserver.ForkServer()
    yield server
    with contextlib.suppress(OSError):  # closed by the test already
        server.close()


def _spec(tmp_path: Path, code: str) -> str:
    (tmp_path / "spec.py").write_text("import json, os, sys, time\n" + code)
    return str(tmp_path / "spec.py")


def _exit(server, pid: int) -> int:
    deadline = time.monotonic() + 10
    while (code := server.exit_code(pid)) is None:
        assert time.monotonic() < deadline, "no exit notice"
        time.sleep(0.02)
    return code


def test_a_child_runs_in_a_session_of_its_own_with_exactly_the_environment_given(server, tmp_path):
    seen = tmp_path / "seen.json"
    spec = _spec(tmp_path, f"open({str(seen)!r}, 'w').write(json.dumps([dict(os.environ), os.getsid(0)]))\n"
                           "sys.exit(3)\n")
    pid = server.start(spec, {"ONLY": "this"})
    assert _exit(server, pid) == 3
    env, sid = json.loads(seen.read_text())
    assert env == {"ONLY": "this"} and sid == pid  # the runner's environment, none of the server's


def test_a_killed_child_exits_with_the_signal_and_a_dead_servers_child_exits_with_1_once_gone(server, tmp_path):
    spec = _spec(tmp_path, "time.sleep(30)\n")
    pid = server.start(spec, {})
    assert server.exit_code(pid) is None
    os.kill(pid, signal.SIGKILL)
    assert _exit(server, pid) == -signal.SIGKILL
    pid = server.start(spec, {})
    try:
        server._proc.kill()  # the server dies while its child runs: the child must not hold its pipe open
        server._proc.wait()
        deadline = time.monotonic() + 3  # the child, just forked, may not have closed its copy yet
        while server.ended is None and time.monotonic() < deadline:
            assert server.exit_code(pid) is None  # its child runs on (a job ends with exit_with_parent)
            time.sleep(0.02)
        assert server.ended == -signal.SIGKILL and server.exit_code(pid) is None
    finally:
        os.kill(pid, signal.SIGKILL)
    assert _exit(server, pid) == 1  # gone without a notice: what exit_with_parent exits with
    with pytest.raises(RuntimeError, match="fork server .* ended with code -9"):
        server.start(spec, {})


def test_the_server_ends_when_the_runner_closes_its_end(server):
    server.close()
    assert server._proc.returncode == 0


def test_an_exit_notice_of_an_earlier_child_never_stands_for_a_new_one_with_its_pid():
    """Pids are reused: the notice of a child that ended must not end a later child that got its pid."""
    server = forkserver.ForkServer.__new__(forkserver.ForkServer)  # the runner's side alone, fed by a pipe
    requests, server._requests = os.pipe()
    server._replies, replies = os.pipe()
    server._lock, server._exits, server._lines = forkserver.threading.Lock(), {}, forkserver._Lines(server._replies)
    server.ended = None
    try:
        for message in ({"pid": 7}, {"exit": 7, "code": 0}, {"pid": 7}):
            forkserver._send(replies, message)
        assert server.start("a", {}) == 7 and server.exit_code(7) == 0
        assert server.start("b", {}) == 7 and server.exit_code(7) is None
    finally:
        for fd in (requests, server._requests, server._replies, replies):
            os.close(fd)
