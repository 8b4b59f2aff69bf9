"""What every report section shares: input normalisation, model variants, table cells, number formats.

Input normalisation (:func:`normalise`) runs once, before any section sees the records:

* **the current record per cell**: a rerun appends a newer record for the same cell (a retry, or
  changed settings or code), so only the last one per (run, cell) is kept (``results.current``,
  the rule of the runner and of ``harness compare`` too);
* **runs**: records from several results directories carry ``run`` (the directory name, set by
  ``harness report DIR1 DIR2``) and get ``run_index`` (its position; 0 is the base); with more than
  one run every variant is keyed and labelled by its run, so nothing from different runs is merged;
  with one run the field is ignored and the output is the same as without it;
* **failure records from before measuring** (status oom/timeout/error, written by the runner when a
  job process died or by the job when a cell failed before its measurement) carry their cell's
  variant, task and eval attention but no measured settings or dataset: those are filled in from an
  ok record of the same variant, backend and metric, or failing that from the ok records of the
  metric of the same run, suite and model when they all agree, so the failure lands in the right
  table.

Sections get ``harness.results.Record``s (the report also takes records as dicts, as stored);
normalisation makes changed copies and never changes the caller's records.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

from harness.results import Record

Block = dict[str, Any]
Section = dict[str, Any]


# ----------------------------------------------------------------------------- normalisation


def run_names(records: Iterable[Record], runs: Sequence[str] | None = None) -> list[str]:
    """The runs in order: ``runs`` first (the first one is the base of comparisons), then any other
    record's ``run`` in order of first appearance."""
    out = [str(r) for r in runs or ()]
    for r in records:
        if r.run and r.run not in out:
            out.append(r.run)
    return out


def normalise(records: Iterable[Record | dict], runs: Sequence[str] | None = None) -> tuple[list[Record], list[str],
                                                                                            int]:
    """(normalised records, run names, number of superseded records dropped); see the module doc."""
    from harness.results import current

    records = [r if isinstance(r, Record) else Record.from_dict(r) for r in records]
    names = run_names(records, runs)
    kept = current(records)
    multi = len(names) > 1
    kept = [replace(r, run=r.run if multi else "", run_index=names.index(r.run) if multi and r.run in names else 0)
            for r in kept]
    return _fill_failures(kept), names if multi else names[:1], len(records) - len(kept)


def _fill_failures(records: list[Record]) -> list[Record]:
    siblings: dict[tuple, Record] = {}
    for r in records:
        if ok(r):
            siblings.setdefault((variant_key(r), r.backend, r.metric), r)
    out = []
    for r in records:
        sib = siblings.get((variant_key(r), r.backend, r.metric))
        if ok(r) or r.dataset or r.values:
            pass  # measured: complete (a job's failure before measuring has no more than the runner's)
        elif sib is not None:
            settings = {k: v for k, v in sib.settings.items() if k not in ("task", "samples_file")}
            r = replace(r, dataset=r.dataset or sib.dataset, settings={**settings, **r.settings})
        elif r.metric in ("perplexity", "ruler"):
            r = _settings_from_run(r, records)
        out.append(r)
    return out


def _settings_from_run(r: Record, records: list[Record]) -> Record:
    """Dataset and settings of the ok records of the same metric, run, suite and model, when they all agree (but
    for what each cell sets itself: its task, evaluation attention, window cap and seed)."""
    same = [o for o in records if ok(o) and (o.metric, o.run, o.suite, model_name(o)) == (r.metric, r.run, r.suite,
                                                                                          model_name(r))]
    drop = ("task", "samples_file", "max_windows", "seed", "eval_attention")
    shared = {repr(({k: v for k, v in o.settings.items() if k not in drop}, o.dataset)) for o in same}
    if len(shared) != 1:
        return r
    settings = {k: v for k, v in same[0].settings.items() if k not in drop}
    return replace(r, settings={**settings, **r.settings}, dataset=r.dataset or same[0].dataset)


def is_multi_run(records: Iterable[Record]) -> bool:
    return any(r.run for r in records)


# ----------------------------------------------------------------------------- variants


class VariantKey(NamedTuple):
    """A model variant as the report groups records (harness.cells.Variant, plus the run and the evaluation
    attention, less the seed); ``eval_attention`` is "finetune" when evaluated with the fine-tuning attention
    (the paper's Table 2), else "" (full attention, the default); ``run`` is "" in single-run reports."""

    run_index: int
    run: str
    model: str
    stage: str
    method: str
    backend: str
    finetune_context: int | None
    eval_attention: str


def model_name(r: Record) -> str:
    return str(r.model.get("preset") or r.model.get("name") or "")


def _stage(r: Record) -> str:
    return r.stage or ("pretrained" if r.method in ("", "none") else "finetuned")


def variant_key(r: Record) -> VariantKey:
    run = (r.run_index, r.run)
    stage = _stage(r)
    if stage == "pretrained":  # evaluated with full attention whatever eval_attention says
        return VariantKey(*run, model_name(r), "pretrained", "none", "", None, "")
    ev = r.settings.get("eval_attention")
    return VariantKey(*run, model_name(r), stage, r.method or "none", r.backend or "", r.finetune_context,
                      "finetune" if ev == "finetune" else "")


def sample_outcomes(r: Record) -> dict[str, float]:
    """A RULER record's per-sample scores (0-1) keyed by its seed, task and prompt, so that records pooled over
    seeds and tasks keep every sample even where two draws made the same prompt; a variant and its pretrained
    model share a key when they scored the same prompt of the same seed and task (their pairing)."""
    seed, task = (r.variant or {}).get("seed", ""), r.settings.get("task", "")
    return {f"{seed}:{task}:{s}": float(v) for s, v in (r.values.get("per_sample") or {}).items()}


def variant_sort(key: VariantKey) -> tuple:
    return (key.run_index, key.model, key.stage != "pretrained", key.stage, key.method, key.backend,
            key.finetune_context or 0, key.eval_attention)


def variant_label(key: VariantKey, show_model: bool = False) -> str:
    if key.stage == "pretrained":
        label = "pretrained"
    else:
        label = f"{key.stage}: {key.method} / {key.backend}" + (f" @ {key.finetune_context}"
                                                                 if key.finetune_context else "")
        if key.eval_attention == "finetune":
            label += ", eval: finetune attention"
    if show_model and key.model:
        label = f"{key.model} · {label}"
    return f"[{key.run}] {label}" if key.run else label


def labeller(records: Iterable[Record]) -> Callable[[Record], str]:
    """VariantKey labels, naming the model only when the records hold more than one; an efficiency
    record (no model: one attention layer) is labelled by its backend."""
    show_model = len({m for r in records if (m := model_name(r))}) > 1

    def label(r: Record) -> str:
        if r.metric == "efficiency":
            run = f"[{r.run}] " if r.run else ""
            return f"{run}attention layer: {r.backend or '?'}"
        return variant_label(variant_key(r), show_model)

    return label


def variant_names(recs: Iterable[Record], label: Callable[[Record], str]) -> dict[VariantKey, str]:
    """The variants of `recs` in report order (:func:`variant_sort`), each with the label of its first record."""
    first: dict[VariantKey, Record] = {}
    for r in recs:
        first.setdefault(variant_key(r), r)
    return {k: label(first[k]) for k in sorted(first, key=variant_sort)}


def ok(r: Record) -> bool:
    return r.status == "ok"


def length(r: Record) -> int:
    return int(r.eval_context)


class Pivot:
    """Records laid out as rows x columns (by default variant x evaluation length): per place, the ok records
    whose ``value`` is a finite number (several: seeds, or what ``unit`` names, shown as their mean) and the
    failures, if any (an ok record whose value is NaN or infinite counts as failed: an error). Every section builds
    its tables and plots from one, so a place is ok, failed or missing by the same rule everywhere."""

    def __init__(self, recs: Iterable[Record], value: Callable[[Record], Any], *,
                 row: Callable[[Record], Any] = variant_key, column: Callable[[Record], Any] = length,
                 order: Callable[[Any], Any] | None = variant_sort, unit: str = "seeds"):
        self._value, self.unit = value, unit
        good: dict[Any, dict[Any, list[Record]]] = defaultdict(lambda: defaultdict(list))
        failed: dict[Any, dict[Any, list[Record]]] = defaultdict(lambda: defaultdict(list))
        for r in recs:
            k, c = row(r), column(r)
            if not ok(r):
                failed[k][c].append(r)
            elif finite(v := value(r)):
                good[k][c].append(r)
            elif nonfinite(v):  # it ran and measured NaN or inf (a diverged model): a failed seed, not a missing one
                failed[k][c].append(nan_failed(r, v))
        self.good = {k: dict(by) for k, by in good.items()}
        self.failed = {k: dict(by) for k, by in failed.items()}
        self.rows = sorted(set(self.good) | set(self.failed), key=order)
        self.columns = sorted({c for by in (*self.good.values(), *self.failed.values()) for c in by})

    def records(self, k: Any, c: Any) -> list[Record]:
        return self.good.get(k, {}).get(c, [])

    def values(self, k: Any, c: Any) -> list[float]:
        return [float(self._value(r)) for r in self.records(k, c)]

    def mean(self, k: Any, c: Any) -> float | None:
        vals = self.values(k, c)
        return sum(vals) / len(vals) if vals else None

    def fails(self, k: Any, c: Any) -> list[Record]:
        """The failed records (seeds) of a place."""
        return self.failed.get(k, {}).get(c, [])

    def failure(self, k: Any, c: Any) -> Record | None:
        return next(iter(self.fails(k, c)), None)

    def shortfall(self, k: Any, c: Any) -> str:
        return shortfall(len(self.records(k, c)), self.fails(k, c), self.unit)

    def partials(self, k: Any) -> list[Any]:
        """The columns of row ``k`` whose value is a mean of fewer seeds than ran (some failed)."""
        return [c for c in self.measured(k) if self.fails(k, c)]

    def measured(self, k: Any) -> list[Any]:
        """The columns of row ``k`` with a value, in order."""
        return sorted(self.good.get(k, {}))

    def failures(self, k: Any) -> list[tuple[Any, str]]:
        """(column, status) of row ``k``'s failures where it has no value: the ✕ marks of a plot."""
        return [(c, rs[0].status) for c, rs in sorted(self.failed.get(k, {}).items())
                if c not in self.good.get(k, {})]

    def cell(self, k: Any, c: Any, show: Callable[[Any, Any], dict]) -> dict:
        """``show(k, c)`` where there are values (with the seeds that failed under it), else the failure's
        status, else a dash."""
        if self.records(k, c):
            return partial(show(k, c), self.shortfall(k, c), self.fails(k, c))
        if fail := self.failure(k, c):
            return fail_cell(fail)
        return cell("–", cls="missing")


def nan_failed(r: Record, value: Any) -> Record:
    """`r` as a failed record (an error, "it measured NaN" or "it measured inf") where it is ok but `value`, its
    number, is NaN or infinite (a perplexity of exp(inf): no mean, no plot limit)."""
    if not (ok(r) and nonfinite(value)):
        return r
    return replace(r, status="error", error=r.error or f"it measured {'NaN' if isnan(value) else value}")


def backend_name(label: str) -> str:
    """'se_attn(chunk_size=256,...)' -> 'se_attn'."""
    return str(label or "").split("(", 1)[0]


def attention_kind(label: str) -> tuple[str, str]:
    """A backend label's (canonical backend, retrieval): 'se_attn_random' and 'se_attn(retrieval=random)' are both
    ('se_attn', 'random'), 'se_attn(chunk_size=256)' is ('se_attn', 'relevancy'), 'sliding_window' is
    ('sliding_window', '')."""
    from harness.attention.options import ALIASES, SPECS  # imports torch: only when asked

    name = backend_name(label)
    canonical, fixed = ALIASES.get(name, (name, {}))
    shown = dict(o.split("=", 1) for o in label[len(name) + 1:-1].split(",") if "=" in o) if "(" in label else {}
    default = SPECS[canonical].defaults.get("retrieval", "") if canonical in SPECS else ""
    return canonical, str(fixed.get("retrieval") or shown.get("retrieval") or default)


# ----------------------------------------------------------------------------- blocks and formats


def cell(text: Any = "", *, bold: bool = False, cls: str = "", title: str = "", details: str = "",
         note: str = "") -> dict:
    """A table cell; ``note`` is small text under the value, ``details`` a collapsible <details>."""
    return {"text": "" if text is None else str(text), "bold": bold, "cls": cls, "title": title,
            "details": details, "note": note}


def table(columns: list[str], rows: list[list[dict]], caption: str = "", numeric_from: int = 1, *,
          cls: str = "", summary: str = "") -> Block:
    """A table; ``cls`` a CSS class of the <table> ("wrap-headers"), ``summary`` folds it into a <details>."""
    return {"type": "table", "columns": columns, "rows": rows, "caption": caption, "numeric_from": numeric_from,
            "cls": cls, "summary": summary}


def paragraph(text: str) -> Block:
    return {"type": "paragraph", "text": text}


def heading(text: str) -> Block:
    return {"type": "heading", "text": text}


def figure(src: str, alt: str, caption: str = "") -> Block:
    return {"type": "figure", "src": src, "alt": alt, "caption": caption}


def callouts(items: list[str]) -> Block:
    return {"type": "callouts", "items": items}


def fail_cell(r: Record) -> dict:
    return cell(r.status.upper(), cls="fail", title=r.error or "")


def shortfall(measured: int, fails: list[Record], unit: str = "seeds") -> str:
    """Where some seeds of a place failed and `measured` others did not, e.g. "2 of 3 seeds (1 OOM)": the value
    shown is the mean of fewer seeds than the rest of the table's; else ""."""
    if not (fails and measured):
        return ""
    kinds = Counter(r.status.upper() for r in fails)
    return f"{measured} of {measured + len(fails)} {unit} ({', '.join(f'{n} {s}' for s, n in kinds.items())})"


def partial(shown: dict, shortfall: str, fails: list[Record]) -> dict:
    """A value cell of a place where some seeds failed (`Pivot.shortfall`): the shortfall under the value, marked
    as a failure, with the errors on hover."""
    if not shortfall:
        return shown
    errors = "; ".join(f"{r.cell}: {r.error}" for r in fails if r.error)
    return {**shown, "note": " ".join(filter(None, [shown.get("note"), shortfall])),
            "cls": " ".join(filter(None, [shown.get("cls"), "partial"])),
            "title": "; ".join(filter(None, [shown.get("title"), errors]))}


def isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def nonfinite(x: Any) -> bool:
    """NaN, inf or -inf."""
    return isinstance(x, float) and not math.isfinite(x)


def finite(x: Any) -> bool:
    """A number that is neither NaN nor infinite."""
    return number(x) and math.isfinite(x)


def number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not isnan(x)


def fmt_int(n: Any) -> str:
    return f"{int(n):,}" if number(n) else "–"


def fmt_count(n: Any) -> str:
    """1_234_567 -> '1.23M'."""
    if not number(n):
        return "–"
    shown = float(f"{n:.3g}")  # the unit of the number as shown: 999_999 is "1M", not "1e+03K"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(shown) >= size:
            return f"{shown / size:.3g}{unit}"
    return f"{n:g}"


def fmt_float(x: Any, digits: int = 2) -> str:
    """`x` to `digits` decimals; "NaN" where it was measured as NaN, "–" where there is no number."""
    return f"{x:,.{digits}f}" if number(x) else "NaN" if isnan(x) else "–"


def fmt_gib(x: Any) -> str:
    """A memory size in GiB to 3 significant digits, so a CPU peak of 11 MiB reads 0.0107, not 0.01."""
    return f"{x:.3g}" if number(x) else "NaN" if isnan(x) else "–"


def length_column(n: int) -> str:
    """2048 -> '2K (2048)'; a length without a shorter name (300, 3000) -> itself, once."""
    from harness.report.plots import tokens_label

    short = tokens_label(n)
    return short if short == str(n) else f"{short} ({n})"
