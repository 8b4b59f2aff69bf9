"""Content-addressed cache of artefacts (tokenizers, pretrained models, adapters).

An artefact's key is a hash of everything that determines it (config, data hash,
code version, seed), never a name alone. Artefacts are written to a temporary
directory and renamed into place, so an interrupted run never leaves a half-written
artefact that a later run would trust.

Location: ``$HARNESS_CACHE``, else ``$XDG_CACHE_HOME/harness``, else ``~/.cache/harness``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

META = "meta.json"
SCRATCH = ".tmp-"  # + key-host-pid: a build in progress, renamed into place when it succeeds
# + key: checkpoints of a training into the entry, removed when it ends (written out in harness.pretraining, whose
# source is in the pretrained model's cache key: a test checks they agree)
WORK = ".work-"


def cache_root() -> Path:
    if env := os.environ.get("HARNESS_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "harness"


def check_writable() -> None:
    """Raise a UserError naming the cache directory if artefacts cannot be written there."""
    from harness.errors import UserError

    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        raise UserError(f"the artefact cache {root} is not writable ({e.strerror}); set HARNESS_CACHE to a "
                        "writable directory") from None


def fingerprint(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (dict key order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def remembered_sha256(path: str | Path) -> str:
    """SHA-256 of a file, remembered in the cache per (path, size, modification time)."""
    path = Path(path)
    st = path.resolve().stat()
    key = fingerprint(str(path.resolve()), st.st_size, st.st_mtime_ns)
    memo = cache_root() / "file-hashes" / key
    if memo.is_file():
        return memo.read_text()
    digest = file_sha256(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}")
    tmp.write_text(digest)
    os.replace(tmp, memo)
    return digest


def code_version(*modules: ModuleType) -> str:
    """Hash of the source files of the given modules (or packages: every .py under them)."""
    return source_version(*(f for m in modules for f in module_files(Path(m.__file__))))


def module_files(path: Path) -> list[Path]:
    """A module's source file; for a package's `__init__.py`, every .py under the package."""
    return sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]


def source_version(*files: Path) -> str:
    """Hash of source files: their names and contents, in order."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def lookup(kind: str, key: str) -> Path | None:
    """The directory of a finished artefact, or None if it was never completed. An artefact whose files differ
    from what its build recorded (truncated, overwritten, missing) is not served, with a warning, so that it gets
    rebuilt instead of failing every cell that loads it. Only that build removes it, under the key's lock
    (`ensure`): jobs that check it meanwhile never have it removed, or rebuilt, under their feet."""
    path = cache_root() / kind / key
    if not (path / META).is_file():
        return None
    problem = _damage(path)
    if problem is None:
        return path
    if (path, problem) not in _WARNED:  # `ensure` looks twice, around its lock
        _WARNED.add((path, problem))
        print(f"warning: cache entry {kind}/{key} is damaged ({problem}); it will be rebuilt", file=sys.stderr)
    return None


def _manifest(directory: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file of an artefact (its meta.json apart)."""
    return {str(f.relative_to(directory)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
            for f in sorted(directory.rglob("*")) if f.is_file() and f.name != META}


def _damage(path: Path) -> str | None:
    """What is wrong with a finished artefact, or None. Entries from before manifests were recorded are trusted."""
    try:
        return _check(path)
    except FileNotFoundError as e:  # the rebuild of a damaged entry removes it while this process checks it
        return f"{Path(e.filename).name} went while it was checked"


def _check(path: Path) -> str | None:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{META} unreadable: {e}"
    if not isinstance(meta, dict):
        return f"{META} is not a JSON object"
    files = meta.get("files") or {}
    missing = next((name for name in files if not (path / name).is_file()), None)
    if missing:
        return f"{missing} is missing"
    stats = (str(path), *((name, (path / name).stat().st_size, (path / name).stat().st_mtime_ns) for name in files))
    if stats in _VERIFIED:  # hashed once per process
        return None
    for name, want in files.items():
        size = (path / name).stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, its build wrote {want['size']}"
        if file_sha256(path / name) != want["sha256"]:
            return f"{name} differs from what its build wrote (sha256)"
    _VERIFIED.add(stats)
    return None


_VERIFIED: set[tuple] = set()
_WARNED: set[tuple] = set()


def ensure(kind: str, key: str, make: Callable[[], None]) -> Path:
    """The artefact `kind/key`, made by `make()` (which writes it with `build`) if it is not there yet. Makers of
    one key take turns on a lock (flock, which holds across nodes where the filesystem supports it), so that two
    jobs never build the same artefact: the second finds the first's."""
    import fcntl

    if (path := lookup(kind, key)) is not None:
        return path
    lock = _lock_file(kind, key)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        except OSError as e:
            from harness.errors import UserError

            raise UserError(f"{lock}: cannot lock it ({e.strerror}): the cache's filesystem takes no file locks "
                            "(Lustre mounted without flock, say); set HARNESS_CACHE to a directory on one that "
                            "does") from None
        if (path := lookup(kind, key)) is None:
            make()
            path = lookup(kind, key)
    if path is None:
        raise RuntimeError(f"building cache entry {kind}/{key} finished without writing it")
    return path


@contextmanager
def build(kind: str, key: str, meta: dict | None = None) -> Iterator[Path]:
    """Yield a scratch directory; on success it becomes the artefact ``kind/key`` atomically."""
    final = cache_root() / kind / key
    for dead in (s for s in unfinished(kind, key) if s["alive"] is False):
        shutil.rmtree(dead["path"], ignore_errors=True)  # a build killed before it could clean up (SIGKILL, OOM)
    tmp = final.with_name(f"{SCRATCH}{key}-{this_host()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process with this pid
    tmp.mkdir(parents=True)
    try:
        yield tmp
        record = {"kind": kind, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {}),
                  "files": _manifest(tmp)}
        (tmp / META).write_text(json.dumps(record, indent=2, default=str))
        if final.is_dir() and (not (final / META).is_file() or _damage(final)):
            # what a removal (or copy) cut off left, or a damaged entry: never served. Its meta.json goes first,
            # so that a removal cut off in its turn leaves a directory that is never served either
            (final / META).unlink(missing_ok=True)
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError as e:  # another process finished first (ENOTEMPTY, EEXIST): keep theirs
            if not (final / META).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"note: cache entry {kind}/{key} was built by another process meanwhile ({e.strerror}); "
                  "keeping that one", file=sys.stderr)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unfinished(kind: str = "*", key: str = "*") -> list[dict]:
    """Scratch directories of builds in progress or killed: path, kind, host, pid, size and whether the build is
    alive (None when it ran on another host, where this process cannot tell)."""
    host = this_host()
    out = []
    for path in sorted(cache_root().glob(f"{kind}/{SCRATCH}{key}-*")):
        name, _, pid = path.name.removeprefix(SCRATCH).rpartition("-")
        built, _, on = name.partition("-")  # keys are hex fingerprints; host names may hold dashes
        if not path.is_dir() or not pid.isdigit() or not on:
            continue
        out.append({"path": path, "kind": path.parent.name, "key": built, "host": on, "pid": int(pid),
                    "alive": _alive(int(pid)) if on == host else None, "size_mib": _size_mib(path)})
    return out


def work_dirs(kind: str = "*") -> list[dict]:
    """Checkpoints of trainings into the cache that were interrupted (the next build of the key resumes from them)
    or run now: path, kind, key, size, and whether a build of the key holds its lock (`busy`)."""
    out = []
    for path in sorted(cache_root().glob(f"{kind}/{WORK}*")):
        if path.is_dir():
            key = path.name.removeprefix(WORK)
            out.append({"path": path, "kind": path.parent.name, "key": key, "size_mib": _size_mib(path),
                        "busy": _building(path.parent.name, key)})
    return out


def _building(kind: str, key: str) -> bool:
    """Whether a maker of `kind/key` holds its lock now (`ensure`)."""
    if not _lock_file(kind, key).is_file():
        return False
    with _unless_building(kind, key) as free:
        return not free


@contextmanager
def _unless_building(kind: str, key: str) -> Iterator[bool]:
    """Takes the lock of `kind/key` for the block unless a maker holds it (`ensure`): yields whether it did."""
    import fcntl

    with open(_lock_file(kind, key), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
        except BlockingIOError:
            yield False
            return
        yield True


def remove(item: dict) -> bool:
    """Remove a finished artefact or a training checkpoint (an item of `entries()` or `work_dirs()`) under its
    key's lock, so never while a build of the key writes or resumes from it: False, removing nothing, if one
    does. An artefact's meta.json goes first: a removal cut off leaves a directory that is never served."""
    with _unless_building(item["kind"], item["key"]) as free:
        if free:
            (item["path"] / META).unlink(missing_ok=True)
            shutil.rmtree(item["path"])
        return free


def _lock_file(kind: str, key: str) -> Path:
    """The file whose flock makers of `kind/key` take turns on (`ensure`)."""
    return cache_root() / kind / f".lock-{key}"


def _size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def this_host() -> str:
    """This machine, and its pid namespace where there is one: containers that share a host name and a cache
    cannot see each other's processes."""
    try:
        return f"{socket.gethostname()}.pidns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def entries() -> list[dict]:
    """Every finished artefact: kind, key, size, creation time and a one-line description."""
    out = []
    for meta_file in sorted(cache_root().glob(f"*/*/{META}")):
        path = meta_file.parent
        if path.name.startswith(SCRATCH):  # a build killed between writing its meta and the rename: unfinished()
            continue
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
        if not isinstance(meta, dict) or not meta:
            meta = {"what": f"(damaged {META}: `harness cache rm {path.name}`)"}
        what = meta.get("what") or " ".join(f"{k}={meta[k]}" for k in ("preset", "corpus", "split", "vocab_size")
                                            if k in meta)
        out.append({"kind": path.parent.name, "key": path.name, "path": path, "size_mib": _size_mib(path),
                    "created": meta.get("created", ""), "what": what})
    return out
