"""Result records: one JSON object per measured cell, stored as JSONL.

A record is self-describing: what was measured (metric, values with units),
on what (its variant: model, seed, method, backend, contexts; dataset), how (kernel that ran,
protocol, the code that computed it), where (environment) and whether it worked (status).

`results.jsonl` is append-only: a cell measured again gets a new record, and :func:`current` keeps
the last one per cell, the rule that the runner, the report and `harness compare` all apply.
:func:`load` returns `Record`s (frozen: `dataclasses.replace` makes a changed copy). Schema 2 added
`variant`, `code` and `eval-finetune/` cell ids (harness.cells); :func:`load` migrates schema-1 records.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from harness.errors import UserError

SCHEMA_VERSION = 2
STATUSES = ("ok", "oom", "timeout", "error")
RESULTS_FILE = "results.jsonl"
LOCK_FILE = ".harness-run.lock"


@dataclass(frozen=True)
class Record:
    suite: str
    cell: str  # stable id of the cell within the suite (harness.cells.Cell.id)
    metric: str  # "perplexity" | "train" | ...
    status: str = "ok"
    variant: dict[str, Any] | None = None  # harness.cells.Variant.as_dict(); None for efficiency cells
    stage: str = ""  # model stage: "pretrained" or "finetuned"
    model: dict[str, Any] = field(default_factory=dict)  # preset, hash
    method: str = "none"  # fine-tuning method, "none" for the pretrained model
    backend: str = "full"  # attention backend used for fine-tuning
    finetune_context: int | None = None
    eval_context: int | None = None
    values: dict[str, Any] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # protocol, steps, lr, ...
    dataset: dict[str, Any] = field(default_factory=dict)  # name, split, hash, embedded
    kernel: str = ""  # what actually ran, e.g. "full via sdpa"
    config_hash: str = ""
    env: dict[str, Any] = field(default_factory=dict)
    code: dict[str, Any] = field(default_factory=dict)  # package version, git commit, fingerprint (provenance)
    seconds: float = 0.0
    error: str | None = None
    warnings: list[str] = field(default_factory=list)  # what the measurement found suspect in itself (a number
    # to be read with care: too little text scored, worse than chance), shown by the job and in the report's header
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    schema: int = SCHEMA_VERSION
    # Which results directory the record was read from, when a report reads several (`harness report A B`:
    # the directory's name and its position, 0 being the base); not stored.
    run: str = ""
    run_index: int = 0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} not in {STATUSES}")

    def as_dict(self) -> dict[str, Any]:
        """The record as stored: every field but `run` and `run_index`."""
        return {k: v for k, v in asdict(self).items() if k not in _NOT_STORED}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        unknown = set(d) - _FIELDS
        if unknown:
            raise ValueError(f"record {d.get('cell')!r}: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**d)


_FIELDS = {f.name for f in fields(Record)}
_NOT_STORED = ("run", "run_index")


def cell_record(suite: str, cell: dict, **given: Any) -> Record:
    """A cell's record with everything the cell says about itself (its id, variant, length, task, evaluation
    attention, settings hash) and the code that writes it: the job starts every measured record so, and the
    runner writes one so, with `status` and `error`, for a cell whose job process died."""
    from harness.provenance import code

    v = cell["variant"] or {}
    settings = {"eval_attention": cell["eval_attention"], **({"task": cell["task"]} if cell["task"] else {}),
                **({"hardware": cell["hardware"]} if cell.get("hardware") else {})}
    return Record(
        suite=suite, cell=cell["id"], metric=cell["metric"], variant=cell["variant"], stage=v.get("stage", ""),
        model={"preset": v["model"]} if v else {}, method=v.get("method", "none"),
        backend=v.get("backend") or cell["backend"] or "full", finetune_context=v.get("finetune_context"),
        eval_context=cell["length"], settings=settings, config_hash=cell["hash"], code=code(cell["metric"]),
        **given)


def environment() -> dict[str, Any]:
    """The software and hardware a result was measured on."""
    import torch
    import transformers

    from harness.hardware import cpu_model

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "git": git_revision(),
    }
    if torch.cuda.is_available():
        env.update(device="cuda", gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return env


def git_revision() -> str | None:
    """The checkout's commit, with "-dirty" where harness's tracked sources differ from it; None outside one, or
    where the checkout does not track harness (an install into a virtual environment inside another project)."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)

    try:
        sha = git("rev-parse", "--short", "HEAD").stdout.strip() if git("ls-files", "--", ".").stdout else ""
        return sha + ("-dirty" if git("diff", "--quiet", "HEAD", "--", ".").returncode == 1 else "") if sha else None
    except (OSError, subprocess.SubprocessError):
        return None


def append(out_dir: str | Path, record: Record) -> None:
    """Append one record as one line, flushed to disk, so an interruption never loses finished cells."""
    path = Path(out_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    locked_append(path, json.dumps(record.as_dict(), default=str) + "\n")


def locked_append(path: Path, line: str) -> None:
    """Append `line` to `path` under an exclusive lock, so that jobs finishing at once (on other nodes too, where
    the filesystem supports locks) never interleave, and flush it to disk. A last line cut off by a kill is ended
    first, so that the new line never joins it."""
    import fcntl

    with open(path, "ab+") as f:  # writes go to the end whatever the position
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        if f.seek(0, os.SEEK_END):
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """Hold the results directory for one `harness run` at a time; a second one gets a UserError saying who
    holds it (the lock is the kernel's: it goes away with the process, however it ends)."""
    import fcntl

    with open(Path(out_dir) / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"{out_dir} is in use by another harness run ({f.read().strip() or 'unknown'}); wait "
                            "for it to finish, or pass another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        yield


def read_lines(path: Path, start: int = 0) -> Iterator[tuple[int, dict | None]]:
    """(line number, JSON object) of each line of a results file from byte offset `start`; the object is None
    where the line holds none (a write cut off by a kill, damaged bytes)."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            obj = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
        yield n, obj if isinstance(obj, dict) else None


def load(out_dir: str | Path) -> list[Record]:
    """All records of a results directory, in append order, at the current schema. Lines that hold no record (a
    write cut off by a kill) are skipped with a warning naming them: their cells count as not measured."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        raise UserError(f"{path}: no results file here; run a suite first (harness run SUITE --out {out_dir})")
    records, unreadable = [], []
    for n, rec in read_lines(path):
        if rec is None:
            unreadable.append(n)
            continue
        if rec.get("schema") == 1:
            rec = _migrate_v1(rec)
        if rec.get("schema") != SCHEMA_VERSION:
            raise UserError(f"{path}: line {n}: record has schema {rec.get('schema')}, this harness reads 1 to "
                            f"{SCHEMA_VERSION}; rerun the suite into a new --out directory")
        try:
            records.append(Record.from_dict(rec))
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: line {n}: {e}; this harness cannot read it (written by another version?)"
                            ) from None
    if unreadable:
        shown = ", ".join(map(str, unreadable[:5])) + (", ..." if len(unreadable) > 5 else "")
        print(f"warning: {path}: {len(unreadable)} line(s) hold no record (line {shown}): a write cut off by a kill, "
              "or damaged bytes; ignored, so their cells count as not measured", file=sys.stderr)
    return records


def _migrate_v1(rec: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 record at schema 2: its variant from its cell id (the runner's failure records held no
    more), the id of a cell evaluated with the fine-tuning attention marked so, no code fingerprint (such a
    cell counts as stale and is measured again)."""
    from harness.cells import Cell

    rec = {**rec, "schema": SCHEMA_VERSION, "code": {}}
    try:
        cell = Cell.parse(rec.get("cell") or "", rec.get("finetune_context"))
    except ValueError:
        return {**rec, "variant": None}
    settings = dict(rec.get("settings") or {})
    if cell.variant is not None and cell.variant.stage == "finetuned" and settings.get("eval_attention") == "finetune":
        cell = Cell(cell.metric, cell.variant, cell.length, cell.task, "finetune")
    if cell.task and "task" not in settings:
        settings["task"] = cell.task
    rec.update(cell=cell.id, settings=settings, variant=cell.variant and cell.variant.as_dict())
    if cell.variant is not None and not rec.get("stage"):  # a runner-written failure: fill in its variant
        v = cell.variant
        rec.update(stage=v.stage, method=v.method, backend=v.backend, model={"preset": v.model})
    if cell.metric == "efficiency":
        rec["backend"] = cell.backend
    return rec


def current(records: list[Record]) -> list[Record]:
    """The record that stands for each cell: the last one appended for its (run, cell id), whatever its
    settings; every earlier one is superseded."""
    last = {(r.run, r.cell): i for i, r in enumerate(records)}
    return [records[i] for i in sorted(last.values())]


def to_frame(records: list[Record]):
    """Records as a pandas DataFrame, one row per record, `values` flattened to columns."""
    import pandas as pd

    return pd.DataFrame([{**{k: v for k, v in asdict(r).items() if k != "values"}, **r.values} for r in records])
