"""Result records: one JSON object per measured cell, stored as JSONL.

A record is self-describing: what was measured (metric, values with units),
on what (model stage, method, backend, contexts, dataset), how (kernel that ran,
protocol), where (environment) and whether it worked (status).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UserError

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "timeout", "error")
RESULTS_FILE = "results.jsonl"


@dataclass
class Record:
    suite: str
    cell: str  # stable id of the cell within the suite
    metric: str  # "perplexity" | "train" | ...
    status: str = "ok"
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
    seconds: float = 0.0
    error: str | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} not in {STATUSES}")


def environment() -> dict[str, Any]:
    """The software and hardware a result was measured on."""
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "git": _git_revision(),
    }
    if torch.cuda.is_available():
        env.update(device="cuda", gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return env


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def append(out_dir: str | Path, record: Record) -> None:
    """Append one record (one line, flushed) so an interruption never loses finished cells."""
    path = Path(out_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(asdict(record), default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load(out_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a results directory (a truncated last line from a kill is skipped)."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        raise UserError(f"{path}: no results file here; run a suite first (harness run SUITE --out {out_dir})")
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("schema") != SCHEMA_VERSION:
            raise UserError(
                f"{path}: record has schema {rec.get('schema')}, this harness reads {SCHEMA_VERSION}; "
                "rerun the suite into a new --out directory"
            )
        records.append(rec)
    return records


def to_frame(records: list[dict[str, Any]]):
    """Records as a pandas DataFrame, one row per record, `values` flattened to columns."""
    import pandas as pd

    rows = [{**{k: v for k, v in r.items() if k != "values"}, **r.get("values", {})} for r in records]
    return pd.DataFrame(rows)
