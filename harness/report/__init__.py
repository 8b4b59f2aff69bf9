"""Reports: a self-contained HTML page (``html``) with matplotlib figures (``plots``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["render_report"]


def render_report(records: list[Any], out: Path | str, *, title: str,
                  notes: list[str] | None = None, runs: Sequence[str] | None = None) -> Path:
    """Write ``out/index.html`` from result records (``harness.results.Record``s, or dicts as stored); imports
    matplotlib only when called. ``runs``: run names in order (first = base) when the records
    come from several results directories and carry their ``run``."""
    from harness.report.html import render_report as _render

    return _render(records, out, title=title, notes=notes, runs=runs)
