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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

META = "meta.json"


def cache_root() -> Path:
    if env := os.environ.get("HARNESS_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "harness"


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
    """The directory of a finished artefact, or None if it was never completed."""
    path = cache_root() / kind / key
    return path if (path / META).is_file() else None


@contextmanager
def build(kind: str, key: str, meta: dict | None = None) -> Iterator[Path]:
    """Yield a scratch directory; on success it becomes the artefact ``kind/key`` atomically."""
    final = cache_root() / kind / key
    tmp = final.with_name(f".tmp-{key}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        record = {"kind": kind, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {})}
        (tmp / META).write_text(json.dumps(record, indent=2, default=str))
        if final.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def entries() -> list[dict]:
    """Every finished artefact: kind, key, size, creation time and a one-line description."""
    out = []
    for meta_file in sorted(cache_root().glob(f"*/*/{META}")):
        meta, path = json.loads(meta_file.read_text()), meta_file.parent
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        what = " ".join(f"{k}={meta[k]}" for k in ("preset", "corpus", "split", "vocab_size") if k in meta)
        out.append({"kind": path.parent.name, "key": path.name, "path": path, "size_mib": size / 2**20,
                    "created": meta.get("created", ""), "what": what})
    return out
