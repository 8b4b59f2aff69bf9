"""Section "lm-eval": downstream task metrics per variant, value ± standard error.

Records: ``metric == "lm_eval"`` with ``settings.task`` and ``values`` as written by
``harness.metrics.lm_eval`` (``acc``, ``acc_stderr``, ..., ``samples``, a group's ``subtasks``). One row per
(task, metric), a group's subtasks in rows after it, one column per variant. Several records of one
(variant, task) (seeds) show their mean, without a stderr.
"""

from __future__ import annotations

from collections import defaultdict

from harness.report.common import (
    Block,
    Section,
    VariantKey,
    cell,
    fail_cell,
    finite,
    fmt_float,
    labeller,
    nan_failed,
    nonfinite,
    number,
    ok,
    paragraph,
    partial,
    shortfall,
    table,
    variant_key,
    variant_names,
)
from harness.results import Record

COUNTS = ("samples", "samples_available")


def metric_names(values: dict) -> list[str]:
    """An lm-eval record's metrics (acc, acc_norm, exact_match/strict-match, ...): its numbers (NaN and inf too:
    a failed measurement, shown as one) less the counts and the standard errors."""
    return [k for k, v in values.items()
            if k not in COUNTS and not k.endswith("_stderr") and (number(v) or nonfinite(v))]


def lm_eval_section(records: list[Record]) -> Section | None:
    recs = [r for r in records if r.metric == "lm_eval" and r.settings.get("task")]
    if not recs:
        return None
    label = labeller(records)
    # (record, values) per (variant, task or subtask row)
    good: dict[tuple[VariantKey, str], list[tuple[Record, dict]]] = defaultdict(list)
    failed: dict[tuple[VariantKey, str], list[Record]] = defaultdict(list)
    subtasks: dict[str, dict[str, None]] = defaultdict(dict)  # a group's subtasks, in order
    notes: dict[str, set[str]] = defaultdict(set)
    better: dict[str, bool] = {}
    for r in recs:
        k, task, values = variant_key(r), str(r.settings["task"]), r.values
        if not ok(r):
            failed[(k, task)].append(r)
            continue
        good[(k, task)].append((r, values))
        for sub, sub_values in (values.get("subtasks") or {}).items():
            subtasks[task][sub] = None
            good[(k, f"{task} \u203a {sub}")].append((r, sub_values))
        notes[task].add(f"{values.get('samples')} samples, {r.settings.get('num_fewshot')}-shot")
        better.update(r.settings.get("higher_is_better") or {})
    names = variant_names(recs, label)
    keys = list(names)
    rows = []
    for task in dict.fromkeys(str(r.settings["task"]) for r in recs):
        for row_label in [task] + [f"{task} \u203a {sub}" for sub in subtasks[task]]:
            found = [v for k in keys for _, v in good.get((k, row_label), [])]
            metrics = list(dict.fromkeys(m for v in found for m in metric_names(v))) or ["\u2013"]
            note = "; ".join(sorted(notes[task])) if row_label == task else ""
            for i, m in enumerate(metrics):
                arrow = {True: " \u2191", False: " \u2193"}.get(better.get(m.split("/")[0]), "")
                row = [cell(row_label if i == 0 else "", cls="label mono", note=note if i == 0 else ""),
                       cell(f"{m}{arrow}", cls="mono")]
                rows.append(row + [_value(good.get((k, row_label), []), m, failed.get((k, task), [])) for k in keys])
    blocks: list[Block] = [paragraph(
        "lm-eval (EleutherAI lm-evaluation-harness) tasks, through its HFLM wrapper: each metric with its "
        "standard error (\u00b1) as lm-eval computes it. \u2191 / \u2193: higher / lower is better. Under each task: "
        "the documents evaluated and the few-shot count; a group's subtasks follow it (\u203a)."),
        table(["task", "metric"] + [names[k] for k in keys], rows, numeric_from=2, cls="wrap-headers")]
    return {"id": "lm-eval", "title": "lm-eval", "blocks": blocks}


def _value(found: list[tuple[Record, dict]], metric: str, fails: list[Record]) -> dict:
    """The cell of one metric of one variant: the mean over its records, or a failure where none measured it (a
    NaN or inf measured is one, as in the other sections)."""
    fails = fails + [nan_failed(r, v[metric]) for r, v in found if nonfinite(v.get(metric))]
    measured = [v for _, v in found if not nonfinite(v.get(metric))]  # the records that did not fail it
    having = [v for v in measured if finite(v.get(metric))]
    vals = [v[metric] for v in having]
    if not vals:
        return fail_cell(fails[0]) if fails else cell("\u2013", cls="missing")
    if len(vals) > 1:
        shown = cell(fmt_float(sum(vals) / len(vals), 3), title=f"mean of {len(vals)} records")
    else:
        se = having[0].get(f"{metric}_stderr")
        shown = cell(fmt_float(vals[0], 3) + (f" \u00b1 {fmt_float(se, 3)}" if number(se) else ""))
    if len(having) < len(measured):  # ok seeds that did not report this metric
        shown["note"] = f"{len(having)} of {len(measured)} seeds report it"
    return partial(shown, shortfall(len(measured), fails), fails)
