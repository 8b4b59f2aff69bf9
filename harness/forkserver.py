"""Job processes forked from a warm interpreter, on machines without a GPU.

A fresh `python -m harness.job` spends about 3.4 s on 2 cores importing torch and transformers before it does
anything, and a suite starts a job per variant (the ablation: 56). The fork server is one process that imports
harness.job once and forks a child per job: the child starts in milliseconds with those modules loaded, in a
session of its own, with the environment the runner gives it, and runs the job as `python -m harness.job SPEC`.

Only where no GPU is visible: a process forked after CUDA was initialised cannot use CUDA, and importing
transformers may initialise it. With a GPU every job is a fresh interpreter (harness.executors.LocalAttempt).

A server runs the code it imported when it started: when a source file of harness changes during a run (an edit,
a `git pull`), the runner starts a new server for the jobs that follow (`ForkServer.stale`), whose records are
fingerprinted with the new code; jobs of the old one finish with theirs.

The runner talks to the server over two pipes, one JSON object per line: it writes {"spec": PATH, "env": {...}};
the server answers {"pid": N} at once and {"exit": N, "code": C} when that child ends (C as subprocess's
returncode: -9 for SIGKILL). The server ends when the runner closes its end (it is done, or it died); children
left then see their parent go and end too (harness.finetune.distributed.exit_with_parent).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path


class ForkServer:
    """The runner's side: `start` a job, `exit_code` of a started one (None while it runs)."""

    def __init__(self):
        self._code = _code_stamp()  # before the server imports: an edit after this makes it stale, never hides
        requests, self._requests = os.pipe()
        self._replies, replies = os.pipe()
        self._proc = subprocess.Popen([sys.executable, "-m", "harness.forkserver", str(requests), str(replies)],
                                      pass_fds=(requests, replies), start_new_session=True)
        os.close(requests)
        os.close(replies)
        self._lock = threading.Lock()  # several runner threads start and poll jobs
        self._lines = _Lines(self._replies)
        self._exits: dict[int, int] = {}
        self.ended: int | None = None  # the server's exit code, once it died (killed: by hand, the OOM killer)

    def start(self, spec_file: str, env: dict[str, str]) -> int:
        """Fork a job for `spec_file` with environment `env`; its pid (the first waits for the server's imports)."""
        with self._lock:
            try:
                _send(self._requests, {"spec": spec_file, "env": env})
            except BrokenPipeError:  # the server is gone
                self.ended = self._proc.wait()
            while (reply := self._next(timeout=None)) is not None:
                if "pid" in reply:  # a pid is reused: an earlier child's exit with it is not this one's
                    self._exits.pop(reply["pid"], None)
                    return reply["pid"]
            raise RuntimeError(f"the job fork server (pid {self._proc.pid}) ended with code {self.ended}; its "
                               "output is above")

    def stale(self) -> bool:
        """Whether harness's sources changed since the server started (it would fork jobs running older code)."""
        return _code_stamp() != self._code

    def exit_code(self, pid: int) -> int | None:
        """The exit code of child `pid`, None while it runs. Where the server died, its children end too
        (harness.job's exit_with_parent, within a second) without an exit notice: once `pid` is gone, its code is
        taken as 1, what exit_with_parent exits with, so that the runner records the cell and goes on."""
        with self._lock:
            while pid not in self._exits and self._next(timeout=0) is not None:
                pass
            if pid in self._exits or self.ended is None:
                return self._exits.get(pid)
            try:
                os.kill(pid, 0)
                return None
            except ProcessLookupError:
                return self._exits.setdefault(pid, 1)

    def close(self) -> None:
        """End the server (children still running end with it)."""
        os.close(self._requests)
        self._proc.wait()
        os.close(self._replies)

    def _next(self, timeout: float | None) -> dict | None:
        """The server's next message (exit notices are kept), or None when there is none within `timeout` or the
        server has ended (`ended` says with what code)."""
        if self.ended is not None:
            return None
        line = self._lines.read(timeout)
        if line is None:
            return None
        if line == b"":
            self.ended = self._proc.wait()
            print(f"warning: the job fork server (pid {self._proc.pid}) ended with code {self.ended}; its jobs end "
                  "with it and are recorded as failed, and a new server forks the jobs that follow", file=sys.stderr)
            return None
        reply = json.loads(line)
        if "exit" in reply:
            self._exits[reply["exit"]] = reply["code"]
        return reply


class _Lines:
    """Lines from a pipe's file descriptor; b"" once it is closed."""

    def __init__(self, fd: int):
        self._fd, self._buffer = fd, b""

    def read(self, timeout: float | None) -> bytes | None:
        while b"\n" not in self._buffer:
            if not select.select([self._fd], [], [], timeout)[0]:
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                return b""
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line


def serve(requests: int, replies: int) -> str | None:
    """Fork a child per request until the runner closes `requests`. Returns only in a child: its spec file."""
    import harness.job  # noqa: F401 - the point of the server: imported once, inherited by every child

    lines, children = _Lines(requests), set()
    while True:
        line = lines.read(timeout=0.2)
        for pid, code in _ended(children):
            _send(replies, {"exit": pid, "code": code})
        if line is None:
            continue
        if line == b"":
            return None
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.close(requests)
            os.close(replies)
            os.setsid()
            os.environ.clear()
            os.environ.update(request["env"])
            return request["spec"]
        children.add(pid)
        _send(replies, {"pid": pid})


def _code_stamp() -> list[tuple[str, int, int]]:
    """(path, size, modification time) of every source file of the harness package: a few ms to take."""
    root = Path(__file__).parent
    return [(str(f), (st := f.stat()).st_size, st.st_mtime_ns) for f in sorted(root.rglob("*.py"))]


def _send(fd: int, message: dict) -> None:
    """One message, as a line of JSON."""
    os.write(fd, (json.dumps(message) + "\n").encode())


def _ended(children: set[int]) -> list[tuple[int, int]]:
    """(pid, returncode) of the children that ended since the last call (reaped and dropped from `children`)."""
    ended = []
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            children.discard(pid)
            ended.append((pid, os.waitstatus_to_exitcode(status)))
    return ended


if __name__ == "__main__":
    spec = serve(int(sys.argv[1]), int(sys.argv[2]))
    if spec is not None:
        from harness.job import main

        sys.argv = [sys.modules["harness.job"].__file__, spec]
        main(spec)
