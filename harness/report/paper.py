"""The paper's headline numbers, as data, and the report section that shows them.

Source: Nunez, Zancato, Bowman, Golatkar, Xia, Soatto, "Expansion Span: Combining Fading Memory
and Retrieval in Hybrid State Space Models", NeuS 2025 (PMLR 288). Printed in its tables: Table 1 (PG-19
validation perplexity after fine-tuning on the paper's natural-language dataset, which it does not name) and
Table 7 (the same after fine-tuning on PG-19, Appendix E.2). Drawn only as plots, and read off them in the
team's ``../shared/docs/METHODS.md`` ("Headline numbers to compare against"), so approximate: the RULER
averages over the eleven tasks (Figure 2), the SE-Attn ablations (Section 4.3, Figure 3) and the
attention-layer runtime at 32K tokens (Figure 4; the paper's experiments ran on A100s, Appendix G). Setting:
Mamba-2-Hybrid 2.7B (``mamba2attn-2.7b``) pretrained at 2048, fine-tuned with HyLoRA at 8192 (1000 steps of
64 x 8192 tokens: 8 GPUs x 8 accumulation steps), evaluated with full attention.

Our numbers are put beside the paper's only when the records' model preset is the paper's
model (:data:`PAPER_MODEL`); with any other model (the CPU smoke suites use a 0.9M-parameter
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
    fmt_float,
    heading,
    model_name,
    number,
    ok,
    paragraph,
    table,
    variant_key,
)
from harness.results import Record

SOURCE = ("Nunez et al., \u201cExpansion Span: Combining Fading Memory and Retrieval in Hybrid State Space "
          "Models\u201d, NeuS 2025 (PMLR 288). Perplexities as printed in its Table 1 (fine-tuned on its "
          "natural-language dataset) and Table 7 (fine-tuned on PG-19); RULER averages (Figure 2), ablations "
          "(Figure 3) and runtimes (Figure 4) read off its plots, so approximate (transcribed into "
          "harness/report/paper.py).")
PAPER_MODEL = "mamba2attn-2.7b"
PAPER_FINETUNE_CONTEXT = 8192
NOT_COMPARABLE = "not comparable: different model and scale"

PPL_CONTEXTS = (2048, 8192, 16384, 32768)
RULER_LENGTHS = (2048, 8192, 16384)

#: (row label, backend name of the fine-tuning attention or None for the pretrained model,
#:  PG-19 perplexity by context, RULER average accuracy (%) by length). Fine-tuning method: HyLoRA.
MAIN: list[tuple[str, str | None, dict[int, float], dict[int, float]]] = [
    ("not fine-tuned", None, {2048: 10.72, 8192: 14.99, 16384: 19.35, 32768: 26.37},
     {2048: 64.9, 8192: 5.5, 16384: 0.2}),
    ("Full-Attn", "full", {2048: 10.99, 8192: 10.28, 16384: 10.39, 32768: 11.14},
     {2048: 59.9, 8192: 39.2, 16384: 35.3}),
    ("SW-Attn", "sliding_window", {2048: 10.98, 8192: 10.80, 16384: 11.82, 32768: 13.45},
     {2048: 54.9, 8192: 21.0, 16384: 17.4}),
    ("S\u00b2-Attn", "s2_attn", {2048: 10.87, 8192: 12.89, 16384: 14.67, 32768: 16.37},
     {2048: 65.8, 8192: 24.6, 16384: 11.9}),
    ("SE-Attn", "se_attn", {2048: 10.99, 8192: 10.45, 16384: 11.14, 32768: 12.64},
     {2048: 71.9, 8192: 40.5, 16384: 28.2}),
]

#: Table 7 (Appendix E.2): PG-19 validation perplexity by context after fine-tuning on PG-19 (as MAIN: the
#: backend of the fine-tuning attention, None for the pretrained model).
PG19_FINETUNED: dict[str | None, dict[int, float]] = {
    None: {2048: 10.72, 8192: 14.99, 16384: 19.35, 32768: 26.37},
    "full": {2048: 10.73, 8192: 10.04, 16384: 10.14, 32768: 10.91},
    "sliding_window": {2048: 10.72, 8192: 10.59, 16384: 11.64, 32768: 13.25},
    "s2_attn": {2048: 10.78, 8192: 12.74, 16384: 14.42, 32768: 16.11},
    "se_attn": {2048: 10.73, 8192: 10.22, 16384: 10.84, 32768: 12.28},
}

#: RULER average at 8K: (label, method, backend as the paper names it (common.attention_kind), value).
ABLATIONS: list[tuple[str, str, str, float]] = [
    ("SE-Attn, no retrieval", "hylora", "se_attn_nomem", 26.1),
    ("SE-Attn, random blocks", "hylora", "se_attn_random", 32.5),
    ("SE-Attn", "hylora", "se_attn", 40.5),
    ("LoRA (SE-Attn)", "lora", "se_attn", 31.6),
    ("LoRA+ (SE-Attn)", "lora_plus", "se_attn", 33.1),
    ("HyLoRA (SE-Attn)", "hylora", "se_attn", 40.5),
]
ABLATION_LENGTH = 8192

#: One attention layer, forward + backward, at RUNTIME_LENGTH tokens on RUNTIME_DEVICE (ms).
RUNTIME_MS: dict[str, float] = {"full": 182.0, "sliding_window": 69.0, "s2_attn": 81.0, "se_attn": 71.0}
RUNTIME_LABELS = {"full": "Full-Attn", "sliding_window": "SW-Attn", "s2_attn": "S\u00b2-Attn", "se_attn": "SE-Attn"}
RUNTIME_LENGTH = 32768
RUNTIME_DEVICE = "A100"
#: Figure 4's settings: a window of 4096; SE-Attn's chunk alternating between 2048 and 4096, blocks of 32, top-8.
RUNTIME_OPTIONS: dict[str, dict] = {"sliding_window": {"window": 4096},
                                    "se_attn": {"chunk_size": [2048, 4096], "block_size": 32, "top_k": 8}}


def _mean(xs: list[float]) -> float | None:
    """The mean of the numbers among xs (a diverged seed's NaN left out, as the report's own tables count it)."""
    xs = [x for x in xs if number(x)]
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
                by_task.setdefault(r.settings["task"], []).append(float(r.values["accuracy"]))
        return group_scores({t: sum(v) / len(v) for t, v in by_task.items()}).get("average")

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
        blocks.append(callouts([
            f"Our numbers: {NOT_COMPARABLE}. The paper measured Mamba-2-Hybrid 2.7B ({PAPER_MODEL}) fine-tuned "
            f"at 8192 tokens; this report's model(s): {', '.join(models) or 'not recorded'}. The paper's numbers are "
            "shown for reference only."]))
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
