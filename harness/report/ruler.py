"""Section "RULER": per-variant task x length heatmaps, the paper's groups, and the chance gate.

Records: ``metric == "ruler"`` with ``settings.task``, ``eval_context`` (the length) and
``values.accuracy`` (percent, RULER's score), ``values.samples``, ``values.haystack_deviation``.
Several records of one (variant, task, length) (seeds) are averaged.

**Chance gate.** The issue asks: "when the base model's accuracy on a task is at chance, the
report marks comparisons of fine-tuning methods on that task as uninformative instead of
ranking them". RULER's tasks are generative (the answer is a 7-digit number, a UUID, a list of
words), so chance is ~0%. We call the base model *at chance* on a (task, length) when the
pretrained variant's accuracy there is at most :data:`CHANCE_PCT` (5%): at ≤5% the base has
essentially never solved the task and a difference between fine-tuning methods there measures
what fine-tuning taught from nothing, not how well a method extends the base's ability, and
with the few samples per cell of a smoke run (e.g. 10) it is one or two lucky samples. A fixed
threshold was chosen over a binomial test against 0% because a test against an exact zero
rejects after a single correct sample, which is not a useful definition of "above chance".
For those cells the fine-tuned variants' values are still shown, but marked "uninformative
(base at chance)", hatched in the heatmaps, and never bolded as best. A group (NIAH-S, ...) is
uninformative at a length when all its tasks are.

**Uncertainty** (harness.report.significance): each accuracy has a Wilson 95% interval over its
samples, pooled over seeds; a fine-tuned variant's difference from the pretrained model on the same
samples (same task, length and seed) is marked ▲ / ▼ where McNemar's exact test gives p < 0.05.
"""

from __future__ import annotations

from collections import defaultdict

from harness.attention import decodes_with_full_attention
from harness.report import plots, significance
from harness.report.common import (
    Block,
    Pivot,
    Section,
    VariantKey,
    backend_name,
    callouts,
    cell,
    fmt_float,
    heading,
    labeller,
    length_column,
    paragraph,
    partial,
    sample_outcomes,
    table,
    variant_names,
)
from harness.results import Record

CHANCE_PCT = 5.0
UNINFORMATIVE = "uninformative (base at chance)"


def _task_order(tasks: set[str]) -> list[str]:
    from harness.data.ruler.tasks import PAPER_TASKS, TASKS

    known = [t for t in (*PAPER_TASKS, *TASKS) if t in tasks]
    return list(dict.fromkeys(known)) + sorted(tasks - set(known))


def base_of(k: VariantKey) -> VariantKey:
    return VariantKey(k.run_index, k.run, k.model, "pretrained", "none", "", None, "")


class RulerTable(Pivot):
    """Mean accuracy per (variant, (task, length)), failures, and the chance gate."""

    def __init__(self, recs: list[Record]):
        super().__init__(recs, lambda r: r.values.get("accuracy"),
                         column=lambda r: (str(r.settings["task"]), int(r.eval_context)))
        self.samples = {int(r.values["samples"]) for by in self.good.values() for rs in by.values() for r in rs
                        if r.values.get("samples")}
        self.tasks = _task_order({t for t, _ in self.columns})
        self.lengths = sorted({n for _, n in self.columns})

    def value(self, k: VariantKey, task: str, n: int) -> float | None:
        return self.mean(k, (task, n))

    def has_base(self, k: VariantKey) -> bool:
        return base_of(k) in self.good

    def at_chance(self, k: VariantKey, task: str, n: int) -> bool:
        """The base model of ``k`` scores at most CHANCE_PCT on (task, n)."""
        base = self.value(base_of(k), task, n)
        return base is not None and base <= CHANCE_PCT

    def uninformative(self, k: VariantKey, task: str, n: int) -> bool:
        return k.stage != "pretrained" and self.at_chance(k, task, n)

    def outcomes(self, k: VariantKey, columns: list[tuple[str, int]]) -> dict[str, float]:
        """Per-sample scores (0-1) of `k` in `columns`, pooled over its records (seeds); {} where a record has
        none (written before they were kept)."""
        recs = [r for c in columns for r in self.records(k, c)]
        if not recs or any(not r.values.get("per_sample") for r in recs):
            return {}
        return {s: v for r in recs for s, v in sample_outcomes(r).items()}

    def interval(self, k: VariantKey, columns: list[tuple[str, int]]) -> tuple[float, float] | None:
        """Wilson 95% interval (%) of the pooled samples of `columns`."""
        out = self.outcomes(k, columns)
        return tuple(100 * x for x in significance.wilson(sum(out.values()), len(out))) if out else None

    def versus_base(self, k: VariantKey, columns: list[tuple[str, int]]) -> significance.Difference | None:
        """`k` minus the pretrained model on the samples both scored in `columns`."""
        if k.stage == "pretrained":
            return None
        return significance.paired_samples(self.outcomes(base_of(k), columns), self.outcomes(k, columns))

    def groups(self, k: VariantKey, n: int) -> dict[str, float]:
        from harness.data.ruler.tasks import TASKS
        from harness.metrics.ruler import group_scores

        scores = {t: v for t in self.tasks if t in TASKS and (v := self.value(k, t, n)) is not None}
        return group_scores(scores)


def ruler_section(records: list[Record]) -> Section | None:
    recs = [r for r in records if r.metric == "ruler" and r.eval_context
            and r.settings.get("task")]
    if not recs:
        return None
    label = labeller(records)
    tab = RulerTable(recs)
    names = variant_names(recs, label)
    samples = sorted(tab.samples)
    n_text = (f"{samples[0]}" if len(samples) == 1 else f"{samples[0]}–{samples[-1]}") if samples else "?"
    blocks: list[Block] = [paragraph(
        f"RULER accuracy (%, RULER's string-match score) per task and length, {n_text} samples per cell and "
        f"seed ({_seeds_text(recs)}). Under each value: its Wilson 95% interval over the samples, pooled over "
        "seeds, and \u25b2 / \u25bc where a fine-tuned variant differs from the pretrained model on the same "
        "samples (McNemar's exact test, p < 0.05, not adjusted for the number of cells). "
        f"Chance gate: where the pretrained model scores at most {CHANCE_PCT:g}% on a task at a length, "
        f"the fine-tuned variants' values there are marked \u201c{UNINFORMATIVE}\u201d (hatched in the heatmaps) "
        "and no method is ranked best, since the base had nothing to extend and the difference between "
        "methods is noise or learning from scratch.")]
    deviations = sorted({str(d) for r in recs if (d := r.values.get("haystack_deviation"))})
    notes = [f"Essay haystack replaced by book text ({d}) in "
             f"{sum(r.values.get('haystack_deviation') == d for r in recs)} cell(s): RULER uses "
             "Paul Graham essays, which are not available offline." for d in deviations]
    if own := sorted({b for k in tab.rows if k.eval_attention
                      and (b := backend_name(k.backend)) != "full" and decodes_with_full_attention(b)}):
        notes.append(f"Evaluated with the fine-tuning attention ({', '.join(own)}): the prompt is read with it, but "
                     "every generated token after the first is decoded on the KV cache with full attention over the "
                     "whole prompt (harness.attention.backend), so those accuracies are the fine-tuning attention's "
                     "for the first answer token only.")
    finetuned = [k for k in tab.rows if k.stage != "pretrained"]
    if without := [k for k in finetuned if not tab.has_base(k)]:
        whose = "" if len(without) == len(finetuned) else f" for {', '.join(names[k] for k in without)}"
        notes.append(f"No RULER records of the pretrained model{whose}: the chance gate cannot be applied, so "
                     f"comparisons between fine-tuning methods are shown without it{' there' if whose else ''}.")
    if notes:
        blocks.append(callouts(notes))
    chance = [(t, n) for t in tab.tasks for n in tab.lengths
              if any(tab.uninformative(k, t, n) for k in finetuned)]
    if chance:
        by_task: dict[str, list[int]] = defaultdict(list)
        for t, n in chance:
            by_task[t].append(n)
        blocks.append(paragraph(f"Base model at chance (\u2264{CHANCE_PCT:g}%) on: " + "; ".join(
            f"{t} at {', '.join(plots.tokens_label(n) for n in ns)}" for t, ns in by_task.items()) + "."))

    blocks.append(heading("Accuracy by task and length"))
    items = []
    for k in tab.rows:
        vals = [[tab.value(k, t, n) for n in tab.lengths] for t in tab.tasks]
        texts = [[f.status.upper() if (f := tab.failure(k, (t, n))) else "–"
                  for n in tab.lengths] for t in tab.tasks]
        hatched = [[tab.uninformative(k, t, n) for n in tab.lengths] for t in tab.tasks]
        marked = [[bool(tab.shortfall(k, (t, n))) for n in tab.lengths] for t in tab.tasks]
        items.append({"src": plots.accuracy_heatmap(tab.tasks, tab.lengths, vals, texts=texts, hatched=hatched,
                                                    partial=marked),
                      "alt": f"RULER accuracy heatmap: {names[k]}", "caption": names[k]})
    blocks.append({"type": "figures", "items": items,
                   "caption": "Colour scale fixed at 0–100%. Grey: no value (status written in red when the "
                              "cell failed). Hatched: uninformative (base model at chance). *: some seeds "
                              "failed; the mean of the others (the tables say which)."})

    blocks.append(heading("Paper groups"))
    blocks.extend(_groups_table(tab, names))
    blocks.append(heading("Per task, by length"))
    for n in tab.lengths:
        blocks.append(_task_table(tab, names, n))
    return {"id": "ruler", "title": "RULER", "blocks": blocks}


def _best(tab: RulerTable, values: dict[VariantKey, float | None], gated: dict[VariantKey, bool]) -> set[VariantKey]:
    """The best fine-tuned variant(s) of each (run, model), when two or more are comparable."""
    fams: dict[tuple, list[VariantKey]] = defaultdict(list)
    for k, v in values.items():
        if k.stage != "pretrained" and v is not None and not gated[k]:
            fams[(k.run_index, k.model)].append(k)
    out = set()
    for ks in fams.values():
        if len(ks) >= 2:
            top = max(values[k] for k in ks)
            out |= {k for k in ks if values[k] == top}
    return out


def _seeds_text(recs: list[Record]) -> str:
    seeds = sorted({int(r.variant["seed"]) for r in recs if r.variant and "seed" in r.variant})
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds: {', '.join(map(str, seeds))}"


def _value_cell(v: float | None, k: VariantKey, tab: RulerTable, fails: Record | None, gated: bool, best: bool,
                columns: list[tuple[str, int]], title: str = "") -> dict:
    if v is None:
        return cell("–", cls="missing") if fails is None else cell(
            str(fails.status).upper(), cls="fail", title=str(fails.error or ""))
    notes = []
    if (ci := tab.interval(k, columns)) is not None:
        notes.append(f"[{ci[0]:.0f}\u2013{ci[1]:.0f}]")
    if (d := tab.versus_base(k, columns)) is not None:
        title = "; ".join(filter(None, [title, f"vs pretrained: {100 * d.estimate:+.1f} pts "
                                               f"[{100 * d.low:+.1f}, {100 * d.high:+.1f}], McNemar p={d.p:.2g} "
                                               f"over {d.n} samples"]))
        notes.append({1: "\u25b2", -1: "\u25bc", 0: ""}[d.sign])
    if gated:
        notes.append(UNINFORMATIVE)
    shown = cell(fmt_float(v, 1), bold=best, cls="uninf" if gated else "", note=" ".join(filter(None, notes)),
                 title=title)
    short = [s for c in columns if (s := tab.shortfall(k, c))]
    fails = [r for c in columns for r in tab.fails(k, c)]
    return partial(shown, (short[0] if len(columns) == 1 else "some seeds failed") if short else "", fails)


def _groups_table(tab: RulerTable, names: dict[VariantKey, str]) -> list[Block]:
    from harness.data.ruler.tasks import GROUPS

    scores = {(k, n): tab.groups(k, n) for k in tab.rows for n in tab.lengths}
    groups = [g for g in GROUPS if any(g in s for s in scores.values())]
    rows = []
    for g in groups:
        gated = {(k, n): k.stage != "pretrained" and all(tab.uninformative(k, t, n) for t in GROUPS[g])
                 for k in tab.rows for n in tab.lengths}
        best = {n: _best(tab, {k: scores[(k, n)].get(g) for k in tab.rows}, {k: gated[(k, n)] for k in tab.rows})
                for n in tab.lengths}
        for i, k in enumerate(tab.rows):
            row = [cell(g if i == 0 else "", cls="label group"), cell(names[k], cls="label")]
            for n in tab.lengths:
                v = scores[(k, n)].get(g)
                # no value where a task has none: a task that failed there says so (else it was not measured, "–")
                failed = [(t, f) for t in GROUPS[g] if tab.value(k, t, n) is None and (f := tab.failure(k, (t, n)))]
                if v is None and failed:
                    row.append(cell(failed[0][1].status.upper(), cls="fail", title="; ".join(
                        f"{t}: {f.status.upper()} {f.error or ''}".strip() for t, f in failed)))
                    continue
                row.append(_value_cell(v, k, tab, None, gated[(k, n)], k in best[n],
                                       [(t, n) for t in GROUPS[g]], title=f"mean of {', '.join(GROUPS[g])}"))
            rows.append(row)
    out: list[Block] = []
    if rows:
        out.append(paragraph(
            "The paper's Appendix I.4 groups: NIAH-S (niah_single_1–3), NIAH-M (niah_multikey_1–3), NIAH-M-QV "
            "(niah_multivalue, niah_multiquery), VT, CF-WE (cwe, fwe) and the average of the eleven tasks; each "
            "the unweighted mean of its tasks. A group is shown only where all its tasks were measured (where one "
            "failed, its status; hover for which). Bold: the "
            "best fine-tuned variant of each length (when two or more are comparable and the group is not "
            "uninformative)."))
        out.append(table(["group", "variant"] + [length_column(n) for n in tab.lengths], rows, numeric_from=2))
    else:
        out.append(paragraph("No group is complete (every group needs all its tasks measured): see the per-task "
                             "tables."))
    return out


def _task_table(tab: RulerTable, names: dict[VariantKey, str], n: int) -> Block:
    rows = []
    for t in tab.tasks:
        values = {k: tab.value(k, t, n) for k in tab.rows}
        gated = {k: tab.uninformative(k, t, n) for k in tab.rows}
        best = _best(tab, values, gated)
        row = [cell(t, cls="label mono")]
        for k in tab.rows:
            row.append(_value_cell(values[k], k, tab, tab.failure(k, (t, n)), gated[k], k in best, [(t, n)]))
        rows.append(row)
    tbl = table(["task"] + [names[k] for k in tab.rows], rows,
                caption=f"RULER accuracy (%) at {length_column(n)} tokens. Bold: best fine-tuned variant of the "
                        "row, where the base model is not at chance.")
    tbl["cls"] = "wrap-headers"
    return tbl
