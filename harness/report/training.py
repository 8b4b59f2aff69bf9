"""Section "Pretraining and fine-tuning": loss curves and a table of the training runs.

Records: ``metric == "pretrain"`` (the pretrained model's training log) and ``metric == "train"``
(one per fine-tuned variant: log + parameter counts, ``kernel`` = attention kernels used in
training). Values as written by ``harness.finetune.loop.TrainLog.values`` (loss_curve, tokens,
seconds, peak_memory_gib, memory_kind, tokens_per_s) and ``MethodSummary.values``
(trainable_params, total_params, trainable_by_group).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from harness.report import plots
from harness.report.common import (
    Block,
    Section,
    cell,
    fmt_count,
    fmt_float,
    fmt_gib,
    fmt_int,
    heading,
    isnan,
    labeller,
    model_name,
    number,
    ok,
    paragraph,
    table,
    variant_key,
    variant_sort,
)
from harness.results import Record

COLUMNS = ["model / variant", "steps", "final loss", "tokens", "tokens/s", "peak memory (GiB)",
           "trainable params", "kernels", "wall time (s)"]


def training_section(records: list[Record]) -> Section | None:
    pre = sorted((r for r in records if r.metric == "pretrain" and ok(r)),
                 key=lambda r: (r.run_index, model_name(r), r.cell))
    train = sorted((r for r in records if r.metric == "train" and ok(r)),
                   key=lambda r: (variant_sort(variant_key(r)), r.cell))
    if not pre and not train:
        return None
    label = labeller([r for r in records if r.metric in ("train", "perplexity", "ruler")])
    blocks: list[Block] = []
    rows = []
    if pre:
        # seeds that fine-tune from one pretrained model (pretrain.seed) each record its pretraining: one row
        shared: dict[tuple, list[Record]] = defaultdict(list)
        for r in pre:
            shared[(r.run_index, r.model.get("hash") or r.cell)].append(r)
        pre = [rs[0] for rs in shared.values()]
        names = {id(rs[0]): _pretrain_label(rs[0], pre) + (f" (one model for {len(rs)} seeds)" if len(rs) > 1 else "")
                 for rs in shared.values()}
        curves = [(names[id(r)], r.values.get("loss_curve") or []) for r in pre]
        if any(pts for _, pts in curves):
            blocks.append({"type": "figure", "alt": "pretraining loss curves",
                           "src": plots.loss_curves(curves, title="Pretraining"),
                           "caption": "Pretraining loss per optimisation step (the base model of every variant)."
                                      + _objective(pre)})
        rows += [_row(names[id(r)], r) for r in pre]
    if train:
        seeded = len({_seed(r) for r in train}) > 1
        by_variant: dict = defaultdict(list)
        for r in train:
            by_variant[variant_key(r)].append(r)
        failed = Counter(variant_key(r) for r in records if r.metric == "train" and not ok(r))
        curves = [(label(rs[0]) + (f" ({len(rs)} of {len(rs) + failed[k]} seeds)" if failed[k] else ""),
                   _mean_curve([r.values.get("loss_curve") or [] for r in rs])) for k, rs in by_variant.items()]
        if any(pts for _, pts in curves):
            styles = plots.looks([(k.backend, k.method, "") for k in by_variant], markers=False)
            blocks.append({"type": "figure", "alt": "fine-tuning loss curves",
                           "src": plots.loss_curves(curves, title="Fine-tuning", styles=styles),
                           "caption": "Fine-tuning loss per optimisation step, one line per variant"
                                      + (" (the mean over its seeds)." if seeded else ".") + _objective(train)})
        rows += [_row(label(r) + (f" · {_seed(r)}" if seeded else ""), r) for r in train]
    blocks.append(heading("Training runs"))
    blocks.append(paragraph(
        "Steps and final loss from the loss curve; tokens/s after the first step of the run (which compiles and "
        "warms up; over the whole run where a record has no warm-up split or the run had one step, as noted), "
        "with the machine that trained the model under it (a cached model's numbers are its builder's, whichever "
        "job recorded them); wall time of the training steps; peak memory as the run measured it (the kind is "
        "written under the number: CUDA allocator peak on GPU, process peak RSS on CPU, which are not "
        "comparable); trainable parameters with their share of the model."))
    blocks.append(table(COLUMNS, rows))
    return {"id": "training", "title": "Pretraining and fine-tuning", "blocks": blocks}


def _pretrain_label(r: Record, pre: list[Record]) -> str:
    """"[run] pretraining: model (seed0)", the seed only where the run pretrained that model with several."""
    seed_part = _seed(r)
    seeds = {_seed(p) for p in pre if p.run == r.run and model_name(p) == model_name(r)}
    name = f"pretraining: {model_name(r) or 'model'}" + (f" ({seed_part})" if seed_part and len(seeds) > 1 else "")
    return f"[{r.run}] {name}" if r.run else name


def _seed(r: Record) -> str:
    """"seed0": the record's seed (its variant's, else its settings', else its cell id's `seedN` part); "" where
    none says."""
    seed = (r.variant or {}).get("seed", r.settings.get("seed"))
    if seed is None:
        seed = next((p[4:] for p in str(r.cell or "").split("/") if re.fullmatch(r"seed\d+", p)), None)
    return "" if seed is None else f"seed{seed}"


def _objective(records: list[Record]) -> str:
    """What the plotted loss is where runs mixed recall rows in: the weighted objective, not text's NLL per token."""
    def mixed(recall) -> bool:
        return any(number(x) and x > 0 for x in (recall.values() if isinstance(recall, dict) else [recall]))

    weights = sorted({r.settings["answer_weight"] for r in records
                      if mixed(r.settings.get("recall")) and number(r.settings.get("answer_weight"))})
    return (f" Where recall rows were mixed in, the loss is the training objective: their answer tokens weigh "
            f"{' / '.join(f'{w:g}' for w in weights)}x as much as other tokens." if weights else "")


def _mean_curve(curves: list[list]) -> list[tuple[int, float]]:
    """The mean loss per step over curves (seeds), at the steps every curve has."""
    steps = set.intersection(*({int(s) for s, _ in c} for c in curves)) if curves else set()
    losses = [dict((int(s), float(v)) for s, v in c) for c in curves]
    return [(s, sum(c[s] for c in losses) / len(losses)) for s in sorted(steps)]


def _whole_run(v: dict) -> bool:
    """Whether tokens/s is over the whole run, first step included (`TrainLog.tokens_per_s`): a record from before
    the warm-up split, or a run of one step."""
    if "warmup_seconds" not in v:
        return True
    return v.get("tokens", 0) <= v.get("warmup_tokens", 0) or v.get("seconds", 0) <= v["warmup_seconds"]


def _row(name: str, r: Record) -> list[dict]:
    v = r.values
    curve = v.get("loss_curve") or []
    steps = v.get("steps", curve[-1][0] if curve else r.settings.get("steps"))
    final = v.get("final_loss", curve[-1][1] if curve else None)
    trainable, total = v.get("trainable_params"), v.get("total_params")
    share = f"{100 * trainable / total:.2f}% of {fmt_count(total)}" if trainable and total else ""
    groups = v.get("trainable_by_group") or {}
    group_text = ", ".join(f"{k} {fmt_count(n)}" for k, n in groups.items() if n)
    kernels = str(r.kernel or "")
    return [
        cell(name, cls="label"), cell(fmt_int(steps)),
        cell("NaN", cls="fail") if isnan(final) else cell(fmt_float(final, 3)), cell(fmt_count(v.get("tokens"))),
        cell(fmt_float(v.get("tokens_per_s"), 0),
             note=" · ".join(filter(None, [str(r.model.get("trained_on") or ""),
                                           "whole run" if _whole_run(v) else ""]))),
        cell(fmt_gib(v.get("peak_memory_gib")), note=str(v.get("memory_kind") or "")),
        cell(fmt_count(trainable) if trainable is not None else "all" if r.metric == "pretrain" else "–",
             note=share, title=group_text),
        cell(kernels or "–", cls="mono small left"), cell(fmt_float(v.get("seconds", r.seconds), 0)),
    ]
