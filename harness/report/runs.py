"""Section "Comparison of runs": shown only when the records come from two or more runs.

``harness report DIR1 DIR2 ...`` tags every record with its ``run`` (the directory name);
the first run is the base. For perplexity and RULER: plots with one line per (run, variant)
(colour = variant, line style = run) and a table cell x run with each run's difference to the
base. Differences are coloured only when they are beyond noise, by the rules of
``harness compare`` (:mod:`harness.report.compare`): perplexity beyond its relative tolerance,
accuracy when the exact McNemar test over the samples both runs scored gives p < alpha.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

from harness.report import plots
from harness.report.common import (
    Block,
    Pivot,
    Section,
    VariantKey,
    cell,
    fail_cell,
    fmt_float,
    heading,
    labeller,
    model_name,
    nan_failed,
    ok,
    paragraph,
    table,
    variant_key,
    variant_label,
    variant_sort,
)
from harness.report.compare import Thresholds, judge_accuracy, judge_perplexity, unlike
from harness.report.html import perplexity_groups
from harness.results import Record

_CLASS = {"regression": "worse", "improvement": "better", "ok": "", "skipped": ""}


def comparison_section(records: list[Record]) -> Section | None:
    runs = sorted({(r.run_index, r.run) for r in records if r.run})
    if len(runs) < 2:
        return None
    names = [n for _, n in runs]
    blocks: list[Block] = [paragraph(
        f"{len(names)} runs: " + ", ".join(names) + f". Differences are to the base run, {names[0]}. In the plots "
        "the colour (with the marker, past ten variants) is the variant and the line style the run (" + ", ".join(
            f"{n}: {_style_name(plots.LINESTYLES[i % len(plots.LINESTYLES)])}" for i, n in runs) + ").")]
    th = Thresholds()
    show_model = len({m for r in records if (m := model_name(r))}) > 1  # efficiency records name none
    for metric, title in (("perplexity", "Perplexity"), ("ruler", "RULER")):
        recs = [r for r in records if r.metric == metric and r.eval_context]
        if not recs:
            continue
        blocks.append(heading(title))
        blocks += [_plot(group, metric, show_model, name) for name, group in _groups(recs, metric)]
        blocks.append(_table(recs, metric, names, th))
    if len(blocks) == 1:
        blocks.append(paragraph("No perplexity or RULER records to compare."))
    return {"id": "comparison", "title": "Comparison of runs", "blocks": blocks}


def _style_name(ls: str) -> str:
    return {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}[ls]


def _base_variant(k: VariantKey) -> VariantKey:
    return k._replace(run_index=0, run="")


def _groups(recs: list[Record], metric: str) -> list[tuple[str, list[Record]]]:
    """Perplexity records per dataset and protocol, as the Perplexity section plots them (a point's mean over two
    protocols would be neither's); RULER's in one group."""
    if metric != "perplexity":
        return [("", recs)]
    groups = [(f"{ds}, protocol {proto}", group) for (ds, proto), group in perplexity_groups(recs).items()]
    return sorted(groups, key=lambda named: named[0])


def _plot(recs: list[Record], metric: str, show_model: bool, group: str) -> Block:
    field = "perplexity" if metric == "perplexity" else "accuracy"
    pv = Pivot(recs, lambda r: r.values.get(field))
    # a variant's colour, and past the palette's ten a marker of its own too: (colour, marker) tell them apart
    variants = list(dict.fromkeys(_base_variant(k) for k in pv.rows))
    looks = {b: (plots.color(i), plots.MARKERS[i // len(plots.PALETTE) % len(plots.MARKERS)])
             for i, b in enumerate(variants)}
    series = [plots.Series(label=variant_label(k, show_model), x=pv.measured(k),
                           y=[pv.mean(k, n) for n in pv.measured(k)],
                           failed=pv.failures(k), partial=pv.partials(k),
                           color=looks[_base_variant(k)][0], marker=looks[_base_variant(k)][1],
                           linestyle=plots.LINESTYLES[k.run_index % len(plots.LINESTYLES)]) for k in pv.rows]
    if metric == "perplexity":
        src = plots.perplexity_vs_context(series)
        caption = f"Mean perplexity per (run, variant) on {group}."
    else:
        src = plots.line_vs_length(series, ylabel="mean accuracy over measured tasks (%)", logy=False,
                                   ylim=(0, 100))
        caption = ("Mean RULER accuracy over the tasks each (run, variant) measured at a length; compare runs on the "
                   "same tasks only (see the table).")
    return {"type": "figure", "src": src, "alt": f"{metric} by run",
            "caption": " ".join(filter(None, [caption, plots.ring_note(series, "seeds" if metric == "perplexity"
                                                                        else "tasks or seeds"),
                                              "\u2715 at the top: every cell of the (run, variant) at that length "
                                              "failed (status next to it)." if any(s.failed for s in series) else ""]))}


def _table(recs: list[Record], metric: str, runs: list[str], th: Thresholds) -> Block:
    # rows: (cell id, variant without its run); records are the current ones per (run, cell)
    by_row: dict[tuple[str, VariantKey], dict[str, dict]] = defaultdict(dict)
    for r in recs:
        by_row[(r.cell, _base_variant(variant_key(r)))][r.run] = r
    label = labeller(recs)

    def order(key: tuple[str, VariantKey]) -> tuple:
        any_rec = next(iter(by_row[key].values()))
        return (variant_sort(key[1]), str(any_rec.settings.get("task")), int(any_rec.eval_context))

    field = "perplexity" if metric == "perplexity" else "accuracy"
    rows = []
    for key in sorted(by_row, key=order):
        c, variant = key
        base = by_row[key].get(runs[0])
        base = base and nan_failed(base, base.values.get(field))
        name = label(replace(next(iter(by_row[key].values())), run=""))
        row = [cell(c, cls="mono wrap-any", title=name,
                    note="eval: finetune attention" if variant.eval_attention else "")]
        for i, run in enumerate(runs):
            r = by_row[key].get(run)
            if r is None:
                row.append(cell("–", cls="missing", title="no record in this run"))
            elif not ok(r := nan_failed(r, r.values.get(field))):
                row.append(fail_cell(r))
            elif i == 0 or base is None or not ok(base):
                row.append(cell(fmt_float(r.values.get(field), 2 if field == "perplexity" else 1)))
            else:
                row.append(_diff_cell(base, r, field, th))
        rows.append(row)
    caption = ("Perplexity per cell and run; under each later run its difference to the base (relative change; "
               f"coloured beyond the {th.ppl_rtol:.1%} tolerance of harness compare)." if field == "perplexity" else
               "RULER accuracy (%) per cell and run; under each later run its difference to the base in percentage "
               f"points, coloured when McNemar's exact test over the shared samples gives p < {th.alpha}.")
    return table(["cell"] + [f"{r} (base)" if i == 0 else r for i, r in enumerate(runs)], rows, caption=caption,
                 summary=f"{len(rows)} cells: show the table" if len(rows) > 12 else "")


def _diff_cell(base: Record, head: Record, field: str, th: Thresholds) -> dict:
    b, h = base.values.get(field), head.values.get(field)
    if not isinstance(b, (int, float)) or not isinstance(h, (int, float)):
        return cell(fmt_float(h), cls="missing")
    # as harness compare: cells whose settings differ are not judged (not coloured), only shown
    judged = base.config_hash == head.config_hash
    settings = "" if judged else f"; not judged: {unlike(base, head)}"
    if field == "perplexity":
        rel = h / b - 1 if b else 0.0
        cls = _CLASS[judge_perplexity(b, h, th) if judged else "skipped"]
        return cell(fmt_float(h, 2), note=f"{h - b:+.2f} ({rel:+.2%}){settings}", cls=cls)
    verdict, p, n = judge_accuracy(base.values.get("per_sample") or {}, head.values.get("per_sample") or {},
                                   th) if judged else ("skipped", 1.0, 0)
    title = (f"McNemar p={p:.3g} over {n} shared samples" if n else
             f"no shared samples: Fisher exact p={p:.3g}" if verdict != "skipped" else "")
    return cell(fmt_float(h, 1), note=f"{h - b:+.1f} pts{settings}", cls=_CLASS[verdict], title=title)
