"""PG-19 (Rae et al., 2019) from a local copy in the official layout.

Layout: ``ROOT/{train,validation,test}/{book_id}.txt`` (UTF-8 Gutenberg text with CRLF line
endings, normalised here to ``\\n``). ``ROOT`` comes from the ``root`` argument, else the
``HARNESS_PG19_DIR`` environment variable. If ``ROOT/{split}_ids.txt`` lists the official ids
of a split, a partial copy is reported in ``Corpus.source`` (e.g. "99 of 100 books").
An optional official ``ROOT/metadata.csv`` (``id,title,year,url`` rows) supplies titles.

The fingerprint hashes every loaded file's name, size and full SHA-256. Hashing is done on
the bytes already read for loading, so it costs ~0.1 s for the 36 MB test split (measured);
no size+mtime shortcut is needed.

Suites read PG-19 through :mod:`harness.data.sources` (``source: pg19``), which streams the books one at a
time from :func:`split_files`; :func:`load_pg19` holds a split in memory. The hub's ``deepmind/pg19`` is a
loading script, which ``datasets`` >= 4 no longer runs: download the official copy (``gsutil -m cp -r
gs://deepmind-gutenberg DIR``) or read a copy in a plain format with ``source: hf``.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

from harness.cache import fingerprint
from harness.data.corpus import Corpus, Document
from harness.errors import UserError

ENV = "HARNESS_PG19_DIR"
SPLITS = ("train", "validation", "test")
_FIX = (f"point {ENV}, `harness run --pg19 DIR` or a suite's data.pg19 at a folder holding "
        "{train,validation,test}/*.txt")


def _sort_key(path: Path) -> tuple:
    stem = path.stem
    return (0, int(stem), stem) if stem.isdigit() else (1, 0, stem)


def _titles(root: Path) -> dict[str, str]:
    meta = root / "metadata.csv"
    if not meta.is_file():
        return {}
    titles = {}
    with open(meta, encoding="utf-8", newline="") as f:
        for row in csv.reader(f):
            if len(row) >= 2 and row[0] and row[0] != "_id":
                titles[row[0]] = row[1]
    return titles


def _resolve_root(root: str | os.PathLike | None) -> Path:
    if root is None or str(root) == "":
        root = os.environ.get(ENV)
        if not root:
            raise UserError(f"PG-19 location not set: {ENV} is empty and no directory was given; fix: {_FIX}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"PG-19 directory {path} does not exist; fix: {_FIX}")
    return path


def split_files(root: str | os.PathLike | None, split: str) -> tuple[Path, list[Path], str]:
    """(split folder, its books sorted by numeric id, a description that says how complete the copy is)."""
    base = _resolve_root(root)
    folder = base / split
    if not folder.is_dir():
        present = sorted(p.name for p in base.iterdir() if p.is_dir() and any(p.glob("*.txt")))
        raise UserError(
            f"PG-19 split folder {folder} not found (splits present: {', '.join(present) or 'none'}); "
            f"fix: choose one of those splits or point {ENV} at a copy that has {split}/"
        )
    files = sorted(folder.glob("*.txt"), key=_sort_key)
    if not files:
        raise UserError(f"PG-19 split folder {folder} has no .txt books; fix: {_FIX}")
    source = f"PG-19 {split} split from {base}: {len(files)} books"
    ids_file = base / f"{split}_ids.txt"
    if not ids_file.is_file():
        ids_file = folder / f"{split}_ids.txt"
    if ids_file.is_file():
        official = [line.strip() for line in ids_file.read_text(encoding="utf-8").split() if line.strip()]
        have = {p.stem for p in files}
        missing = [i for i in official if i not in have]
        source += f" (copy has {len(official) - len(missing)} of {len(official)} official books"
        source += f"; missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})" if missing else ")"
    return folder, files, source


def load_pg19(root: str | os.PathLike | None = None, split: str = "test", max_documents: int | None = None) -> Corpus:
    """Load one PG-19 split into memory (books sorted by numeric id; the first ``max_documents`` if given)."""
    base = _resolve_root(root)
    _, files, source = split_files(base, split)
    if max_documents is not None:
        if max_documents < 1:
            raise UserError(f"max_documents={max_documents} must be at least 1")
        files = files[:max_documents]
        source += f", first {max_documents} by id"

    titles = _titles(base)
    docs, hashes = [], []
    for path in files:
        data = path.read_bytes()
        hashes.append((path.name, len(data), hashlib.sha256(data).hexdigest()))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"PG-19 book {path} is not UTF-8 ({e}); fix: replace it with the official file") from None
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        docs.append(Document(id=path.stem, title=titles.get(path.stem, path.stem), text=text))

    return Corpus(
        name="pg19",
        splits={split: docs},
        source=source,
        fingerprint=fingerprint("pg19", split, hashes),
        embedded=False,
        meta={"root": str(base), "files": len(docs), "bytes": sum(h[1] for h in hashes)},
    )
