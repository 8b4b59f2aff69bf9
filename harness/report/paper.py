"""The report's section that sets this report's numbers beside the paper's (harness.report.paper_numbers).

Our numbers are put beside the paper's only when the records' model preset is the paper's
model (`paper_numbers.PAPER_MODEL`); with any other model (the CPU smoke suites use a 0.9M-parameter
hybrid) they are "not comparable: different model and scale". Our perplexities go beside Table 7 where our
fine-tunes read PG-19 (``suites/paper.yaml``), else beside Table 1.
"""

from __future__ import annotations

from collections.abc import Callable

from harness.report.claims import claims_blocks
from harness.report.common import (
    Block,
    Section,
    attention_kind,
    callouts,
    cell,
    finite,
    fmt_float,
    heading,
    model_name,
    ok,
    paragraph,
    table,
    variant_key,
)
from harness.report.paper_numbers import (
    ABLATION_LENGTH,
    ABLATIONS,
    MAIN,
    PAPER_FINETUNE_CONTEXT,
    PAPER_MODEL,
    PG19_FINETUNED,
    PPL_CONTEXTS,
    RULER_LENGTHS,
    RUNTIME_DEVICE,
    RUNTIME_LABELS,
    RUNTIME_LENGTH,
    RUNTIME_MS,
    RUNTIME_OPTIONS,
    SOURCE,
)
from harness.results import Record

NOT_COMPARABLE = "not comparable: different model and scale"


def _mean(xs: list[float]) -> float | None:
    """The mean of the finite numbers among xs (a diverged seed's NaN or inf left out, as the report's own tables
    count it)."""
    xs = [x for x in xs if finite(x)]
    return sum(xs) / len(xs) if xs else None


class Ours:
    """Our numbers in the paper's setting (paper model, HyLoRA at 8192, full-attention evaluation, base run)."""

    def __init__(self, records: list[Record]):
        self.records = [r for r in records if ok(r) and r.run_index == 0]

    def _variant(self, r: Record, method: str | None, backend: str | None) -> bool:
        k = variant_key(r)
        if k.model != PAPER_MODEL or k.eval_attention or "selection=previous" in str(k.backend):
            return False  # the paper's SE-Attn ranks blocks with the chunk's own queries
        if backend is None:
            return k.stage == "pretrained"
        return (k.stage != "pretrained" and k.method == method and k.finetune_context == PAPER_FINETUNE_CONTEXT
                and attention_kind(k.backend) == attention_kind(backend))

    def finetuned_on_pg19(self) -> bool:
        """Whether our fine-tunes of the paper's model read PG-19 (the setting of Table 7, not Table 1)."""
        return any(str(r.model.get("finetune_data", "")).startswith("PG-19") for r in self.records
                   if model_name(r) == PAPER_MODEL)

    def perplexity(self, backend: str | None, n: int) -> float | None:
        return _mean([r.values["perplexity"] for r in self.records
                      if r.metric == "perplexity" and r.eval_context == n
                      and self._variant(r, "hylora", backend) and "perplexity" in r.values])

    def ruler_average(self, method: str, backend: str | None, n: int) -> float | None:
        from harness.data.ruler.tasks import TASKS
        from harness.metrics.ruler import group_scores

        by_task: dict[str, list[float]] = {}
        for r in self.records:
            if (r.metric == "ruler" and r.eval_context == n
                    and r.settings.get("task") in TASKS
                    and self._variant(r, method, backend)):
                by_task.setdefault(r.settings["task"], []).append(r.values.get("accuracy"))
        return group_scores({t: m for t, v in by_task.items() if (m := _mean(v)) is not None}).get("average")

    def runtime(self, backend: str) -> tuple[float | None, str]:
        recs = [r for r in self.records if r.metric == "efficiency" and r.eval_context == RUNTIME_LENGTH
                and attention_kind(str(r.backend)) == attention_kind(backend)]
        if not recs:
            return None, "not measured"
        gpus = {str(r.env.get("gpu") or "CPU") for r in recs}
        if not all(RUNTIME_DEVICE in g for g in gpus):
            return None, f"not comparable: measured on {', '.join(sorted(gpus))}, not an {RUNTIME_DEVICE}"
        want = RUNTIME_OPTIONS.get(attention_kind(backend)[0], {})

        def figure4(r: Record) -> bool:
            options = r.settings.get("backend_options") or {}
            return options.get("selection", "chunk") == "chunk" and all(
                (list(v) if isinstance(v := options.get(k), (list, tuple)) else v) == w for k, w in want.items())

        if not (recs := [r for r in recs if figure4(r)]):
            return None, "not comparable: other settings than Figure 4's (" + ", ".join(
                f"{k} {'/'.join(map(str, w)) if isinstance(w, list) else w}" for k, w in want.items()) + ")"
        return _mean([r.values["time_ms"] for r in recs]), ""


def _pair(paper: float, ours: float | None, digits: int, why: str = "not measured") -> list[dict]:
    return [cell(fmt_float(paper, digits)),
            cell(fmt_float(ours, digits), cls="ours") if ours is not None else
            cell("–", cls="missing", title=why, note=why if why != "not measured" else "")]


def paper_section(records: list[Record]) -> Section | None:
    if not any(r.metric in ("perplexity", "ruler", "efficiency") for r in records):
        return None
    models = sorted({m for r in records if (m := model_name(r))})
    comparable = PAPER_MODEL in models
    blocks: list[Block] = [paragraph("Source: " + SOURCE)]
    if comparable:
        blocks.append(paragraph(
            f"\u201cours\u201d: this report's {PAPER_MODEL} records (base run) in the paper's setting: fine-tuned "
            f"with HyLoRA at {PAPER_FINETUNE_CONTEXT} tokens, evaluated with full attention. A dash: not measured "
            "in that setting. Our perplexity is on the dataset and protocol in the header, which may differ from "
            "the paper's PG-19 validation split with LongLoRA's protocol."))
    else:
        layers_only = not any(r.metric in ("perplexity", "ruler") for r in records)  # efficiency: no model
        what = ("this report measures attention layers alone, no model" if not models and layers_only
                else f"this report's model(s): {', '.join(models) or 'not recorded'}")
        blocks.append(callouts([
            f"Our numbers: {NOT_COMPARABLE}. The paper measured Mamba-2-Hybrid 2.7B ({PAPER_MODEL}) fine-tuned "
            f"at 8192 tokens; {what}. The paper's numbers are shown for reference only."]))
    ours = Ours(records) if comparable else None

    def both(paper: float, get: Callable[[], float | None], digits: int) -> list[dict]:
        return _pair(paper, get(), digits) if ours else [cell(fmt_float(paper, digits))]

    sub = ["paper", "ours"] if ours else ["paper"]
    pg19 = ours is not None and ours.finetuned_on_pg19()  # then our perplexities go beside Table 7's, not Table 1's

    def named(n: int, what: str, subs: list[str]) -> list[str]:
        return [f"{what} {n // 1024}K" + (f" {s}" if len(sub) > 1 else "") for s in subs]

    def perplexity_columns(with_ours: bool) -> list[str]:
        return [c for n in PPL_CONTEXTS for c in named(n, "PPL", sub if with_ours else ["paper"])]

    def perplexities(table_ppl: dict[int, float], backend: str | None, with_ours: bool) -> list[dict]:
        return [c for n in PPL_CONTEXTS for c in (both(table_ppl[n], lambda n=n: ours.perplexity(backend, n), 2)
                                                  if with_ours else [cell(fmt_float(table_ppl[n], 2))])]

    blocks.append(heading("Fine-tuned on the paper's natural-language dataset: perplexity (Table 1) and RULER "
                          "average (Figure 2); Mamba-2-Hybrid 2.7B, HyLoRA at 8192, full-attention eval"))
    if pg19:
        blocks.append(paragraph("Our fine-tunes read PG-19, so our perplexities are beside the paper's PG-19 "
                                "fine-tunes (Table 7, below). Our RULER averages are beside these, the only ones the "
                                "paper gives in numbers; its PG-19 fine-tunes scored lower on RULER (Appendix E.2)."))
    columns = ["method"] + perplexity_columns(not pg19) + [c for n in RULER_LENGTHS for c in named(n, "RULER", sub)]
    rows = []
    for label, backend, ppl, ruler in MAIN:
        row = [cell(label, cls="label")] + perplexities(ppl, backend, not pg19)
        for n in RULER_LENGTHS:
            row += both(ruler[n], lambda n=n, b=backend: ours.ruler_average("hylora", b, n), 1)
        rows.append(row)
    blocks.append(table(columns, rows))

    blocks.append(heading("Fine-tuned on PG-19: perplexity (Table 7)"))
    rows = [[cell(label, cls="label")] + perplexities(PG19_FINETUNED[backend], backend, pg19)
            for label, backend, _, _ in MAIN]
    blocks.append(table(["method"] + perplexity_columns(pg19), rows))

    blocks.append(heading(f"Ablations: RULER average at {ABLATION_LENGTH // 1024}K"))
    rows = []
    for label, method, backend, value in ABLATIONS:
        rows.append([cell(label, cls="label")] + both(
            value, lambda m=method, b=backend: ours.ruler_average(m, b, ABLATION_LENGTH), 1))
    blocks.append(table(["variant"] + [f"RULER avg {s}" for s in sub], rows))

    blocks.append(heading(f"Attention runtime: one layer, forward + backward, {RUNTIME_LENGTH // 1024}K tokens, "
                          f"{RUNTIME_DEVICE}"))
    rows = []
    for backend, ms in RUNTIME_MS.items():
        row = [cell(RUNTIME_LABELS[backend], cls="label")]
        if ours:
            value, why = ours.runtime(backend)
            row += _pair(ms, value, 0, why)
        else:
            row.append(cell(fmt_float(ms, 0)))
        rows.append(row)
    blocks.append(table(["attention"] + [f"time (ms) {s}" for s in sub], rows))
    if claims := claims_blocks(records, pg19):
        blocks += [heading("The paper's claims, judged on these records"), *claims]
    return {"id": "paper", "title": "Paper reference numbers", "blocks": blocks}
