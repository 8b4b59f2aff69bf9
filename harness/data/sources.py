"""Where a suite's text comes from: a `Source` (the suite's `data.train` / `data.eval` entry) opened as
`Documents`, a fingerprinted sequence of documents read lazily, one at a time.

    embedded   the KJV corpus shipped with the package (harness.data.embedded); split train|validation|test
    pg19       PG-19 in its official layout, ROOT/{split}/*.txt (harness.data.pg19); path: ROOT
    text       a directory (every *.txt under it) or a glob; one document per file, in natural path order
    jsonl      a file (or a glob) of JSON objects, one per line; `field` holds the text
    hf         datasets.load_dataset(path, name, split=..., data_files=...): a dataset in the HF cache, or local
               files (path: json, data_files: FILE); `field` holds the text

Every source's text is read as UTF-8 with line ends normalised to "\\n", so the same documents give the same
token stream whichever source they come through. Fingerprints: embedded, its corpus hash and split; file
sources, every file's path, size and modification time (an edit that keeps both is not seen: touch the file);
hf, the dataset's own fingerprint. Caches of token streams key on them (harness.data.tokens).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.cache import fingerprint
from harness.data.corpus import Corpus, Document
from harness.errors import UserError

Kind = Literal["embedded", "pg19", "text", "jsonl", "hf"]
SPLIT = ("embedded", "pg19", "hf")  # the sources that have splits
_ONLY = {"path": ("pg19", "text", "jsonl", "hf"), "field": ("jsonl", "hf"), "name": ("hf",), "data_files": ("hf",)}


class Source(BaseModel):
    """One text source of a suite (`data.train`, `data.eval`)."""

    model_config = ConfigDict(extra="forbid")

    source: Kind = "embedded"
    split: str | None = None  # embedded, pg19, hf; None: the role's default (train: "train", eval: "test")
    path: str | None = None  # pg19: ROOT (else --pg19 / data.pg19 / $HARNESS_PG19_DIR); text, jsonl, hf: required
    field: str | None = None  # jsonl, hf: the text's field (default "text")
    name: str | None = None  # hf: the dataset's configuration name
    data_files: str | list[str] | None = None  # hf: local files (with path: json, say)
    max_tokens: int | None = Field(None, ge=1, strict=True)  # cap: the first max_tokens tokens of the source

    @model_validator(mode="after")
    def _fields_fit_the_source(self) -> Source:
        for option, kinds in _ONLY.items():
            if getattr(self, option) is not None and self.source not in kinds:
                raise ValueError(f"{option}: not an option of source {self.source} (it is one of {', '.join(kinds)})")
        if self.source in ("text", "jsonl", "hf") and not self.path:
            raise ValueError(f"source {self.source} needs a path ({_PATH_HELP[self.source]})")
        if self.split is not None and self.source not in SPLIT:
            raise ValueError(f"split: a {self.source} source is one split; point path at that split's files")
        return self

    def describe(self) -> str:
        shown = {k: v for k, v in self.model_dump(exclude={"source"}).items() if v is not None}
        return f"{self.source}({', '.join(f'{k}={v}' for k, v in shown.items())})"


_PATH_HELP = {"text": "a directory of .txt files or a glob", "jsonl": "a .jsonl file or a glob",
              "hf": "a dataset id or a builder such as json"}
#: Files a text source names that hold records, not prose, and the source that reads them.
STRUCTURED = {".jsonl": "source: jsonl (field: the text's key)", ".json": "source: hf with path: json and data_files",
              ".csv": "source: hf with path: csv and data_files", ".parquet": "source: hf with path: parquet and "
              "data_files"}


@dataclass(frozen=True)
class Documents:
    """A source's documents: iterate to read them (each time from the start), one at a time."""

    name: str  # kjv, pg19, text, jsonl, hf
    split: str | None
    description: str  # where they come from, for logs and reports
    fingerprint: str
    embedded: bool
    count: int | None  # number of documents where known without reading them
    _read: Callable[[], Iterator[Document]]
    max_tokens: int | None = None  # the source's cap (its first max_tokens tokens); in the fingerprint

    def __iter__(self) -> Iterator[Document]:
        return self._read()

    def text(self, max_chars: int) -> str:
        """The documents joined by blank lines, stopping after the one that reaches `max_chars`."""
        parts, n = [], 0
        for doc in self:
            parts.append(doc.text)
            n += len(doc.text) + 2
            if n >= max_chars:
                break
        return "\n\n".join(parts)

    def dataset(self) -> dict:
        """The `dataset` fields of a record measured on these documents."""
        return {"name": self.name, "split": self.split, "hash": self.fingerprint, "embedded": self.embedded,
                "source": self.description}

    @classmethod
    def of_corpus(cls, corpus: Corpus, split: str) -> Documents:
        docs = corpus.split(split)
        if not docs:
            raise UserError(f"split {split!r} of corpus {corpus.name!r} has no documents")
        return cls(corpus.name, split, f"{corpus.name} {split} split ({corpus.source})",
                   fingerprint(corpus.fingerprint, split), corpus.embedded, len(docs), lambda: iter(docs))


def open_source(src: Source, where: str) -> Documents:
    """The documents of `src` (`where` names its suite field in errors); raises a UserError if there are none."""
    docs = _open(src, where)
    if src.max_tokens is None:
        return docs
    return replace(docs, max_tokens=src.max_tokens, fingerprint=fingerprint(docs.fingerprint, src.max_tokens))


def _open(src: Source, where: str) -> Documents:
    if src.source == "embedded":
        from harness.data.embedded import default_corpus

        return Documents.of_corpus(default_corpus(), src.split or "train")
    if src.source == "pg19":
        from harness.data.pg19 import split_files

        base, files, description = split_files(src.path, src.split or "train")
        return _files("pg19", src.split, files, base, description, _read_text)
    if src.source == "text":
        files = _matching(src.path, where, "*.txt")
        if structured := [f for f in files if f.suffix in STRUCTURED]:
            f = structured[0]
            raise UserError(f"{where}.path: {f} is {f.suffix} data, which source text would read as prose; fix: "
                            f"{STRUCTURED[f.suffix]}")
        base = Path(src.path) if Path(src.path).is_dir() else Path(os.path.commonpath([f.parent for f in files]))
        return _files("text", None, files, base, f"{len(files)} text files from {src.path}", _read_text)
    if src.source == "jsonl":
        files = _matching(src.path, where, "*.jsonl")
        field = src.field or "text"
        return _files("jsonl", None, files, None, f"field {field!r} of {len(files)} jsonl files from {src.path}",
                      lambda f: _read_jsonl(f, field, where), field)
    return _hf(src, where)


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _natural(path: Path) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(path))]


def _matching(pattern: str, where: str, suffix: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = [f for f in path.rglob(suffix) if f.is_file()]
    elif path.is_file():
        files = [path]
    elif glob.has_magic(pattern):
        files = [Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file()]
    else:
        raise UserError(f"{where}.path: {path} does not exist; fix: point it at a directory, a file or a glob")
    if not files:
        raise UserError(f"{where}.path: {path} holds no {suffix} files; fix: point it at the text to read")
    return sorted(files, key=_natural)


def _files(name: str, split: str | None, files: list[Path], base: Path | None, description: str,
           read: Callable[[Path], Iterator[Document]], *extra) -> Documents:
    stats = [_stat(f) for f in files]

    def documents() -> Iterator[Document]:
        for f, opened in zip(files, stats, strict=True):
            if _stat(f) != opened:
                raise UserError(f"{f} changed since its source was opened (a cache keyed on what it was would "
                                "hold what it is); rerun once it stays put")
            for doc in read(f):
                yield doc if base is None else Document(str(f.relative_to(base).with_suffix("")), doc.title, doc.text)

    return Documents(name, split, description, fingerprint(name, split, stats, *extra), False,
                     len(files) if name != "jsonl" else None, documents)


def _stat(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns


def _read_text(path: Path) -> Iterator[Document]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 ({e}); fix: convert it (iconv -t UTF-8) or leave it out") from None
    yield Document(path.stem, path.stem, _normalise(text))


def _read_jsonl(path: Path, field: str, where: str) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not JSON ({e.msg}); fix: one JSON object per line") from None
            text = row.get(field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                got = f"fields: {', '.join(row)}" if isinstance(row, dict) else f"a {type(row).__name__}"
                raise UserError(f"{where}.field: {path}:{lineno} has no text field {field!r} ({got}); fix: set "
                                f"{where}.field")
            yield Document(f"{path.stem}:{lineno}", f"{path.name}:{lineno}", _normalise(text))


def _hf(src: Source, where: str) -> Documents:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{where}: source hf needs the package datasets; fix: pip install datasets") from None
    split, field = src.split or "train", src.field or "text"
    offline, hub = datasets.config.HF_HUB_OFFLINE, datasets.config.HF_ENDPOINT
    out_of_reach = not offline and _out_of_reach(src.path, hub)
    try:
        datasets.config.HF_HUB_OFFLINE = offline or out_of_reach  # the cache or a ConnectionError, not retries
        ds = datasets.load_dataset(src.path, src.name, split=split, data_files=src.data_files)
    except Exception as e:  # noqa: BLE001 - network, cache and builder errors: one message with the fix
        cache_dir = os.environ.get("HF_DATASETS_CACHE") or "~/.cache/huggingface/datasets"
        raise UserError(f"{where}: datasets.load_dataset({src.path!r}, {src.name!r}, split={split!r}) failed "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        f"{f'; {hub} does not answer' if out_of_reach else ''}); fix: without network "
                        f"it must be in the HF cache ({cache_dir}): load it once on a machine with network, or "
                        "read local files with path: json and data_files: FILE") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    if field not in ds.column_names:
        raise UserError(f"{where}.field: {src.path} has no column {field!r} (columns: {', '.join(ds.column_names)})")
    ds = ds.select_columns([field])

    def documents() -> Iterator[Document]:
        for i, row in enumerate(ds):
            if not isinstance(row[field], str):
                raise UserError(f"{where}: row {i} of {src.path} has no text in {field!r} (got {row[field]!r})")
            yield Document(str(i), str(i), _normalise(row[field]))

    description = f"column {field!r} of {src.path}" + (f" ({src.name})" if src.name else "") + f", split {split}"
    return Documents("hf", split, description, fingerprint("hf", ds._fingerprint, field), False, len(ds), documents)


def _out_of_reach(path: str, hub: str) -> bool:
    """Whether `path` names a Hub dataset (not a local path, nor one of datasets' builders such as json or text)
    and `hub` does not answer within 5 s. Offline, load_dataset retries the Hub for 23 s (huggingface_hub's
    backoff) before it falls back on the cache or fails."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    from huggingface_hub import get_session

    if path in _PACKAGED_DATASETS_MODULES or Path(path).expanduser().exists():
        return False

    try:
        get_session().head(hub, timeout=5)
    except Exception:  # noqa: BLE001 - no network, no name resolution, a proxy refusing: no answer
        return True
    return False
