"""Reports: a self-contained HTML page (``html``) with matplotlib figures (``plots``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["render_report"]


def render_report(records: list[dict[str, Any]], out: Path | str, *, title: str,
                  notes: list[str] | None = None) -> Path:
    """Write ``out/index.html`` from result records (see ``harness.report.html``); imports
    matplotlib only when called."""
    from harness.report.html import render_report as _render

    return _render(records, out, title=title, notes=notes)
