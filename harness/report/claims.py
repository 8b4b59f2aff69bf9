"""The paper's claims as directional comparisons of two variants, each judged on this report's own records.

A claim says variant B beats variant A on a metric at a length relative to the fine-tuning context F: RULER
accuracy at F (the paper's 8K), perplexity at F and at 2F (the paper's 16K). It is judged with the paired tests
of harness.report.significance on the records of the base run, whatever the model: the numbers do not compare
with the paper's, the direction does.

* RULER: every sample both variants scored at that length (the suite's tasks, pooled over seeds; the paper
  averages eleven tasks), McNemar's exact test and the mean difference with its 95% interval.
* Perplexity: paired by seed, Student's t interval of the mean difference (at least two seeds for an interval).

Verdict: **reproduced** when the difference goes the claimed way and p < 0.05; **not reproduced** when it is
significant the other way; **inconclusive** otherwise; **failed** where a side's cells at the length failed
(and no pair is left to judge). The verdict follows the test's p, not the interval: for
RULER the interval is the normal approximation, which can exclude zero where McNemar's exact test (the more
conservative of the two with few discordant samples) gives p >= 0.05. With several labels of one backend (a
grid), each pair of labels is a row.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

from harness.report import paper_numbers, significance
from harness.report.common import (
    Block,
    VariantKey,
    attention_kind,
    cell,
    fmt_float,
    length_column,
    number,
    ok,
    paragraph,
    sample_outcomes,
    table,
    variant_key,
    variant_label,
)
from harness.report.paper_numbers import PAPER_FINETUNE_CONTEXT
from harness.results import Record

PRETRAINED = ("none", "")


@dataclass(frozen=True)
class Claim:
    text: str
    metric: str  # "ruler" (higher is better) | "perplexity" (lower is better)
    at: str  # "F": the fine-tuning context; "2F": twice it
    a: tuple[str, str]  # (method, backend as the paper names it: see attention_kind) of the baseline; PRETRAINED
    b: tuple[str, str]  # the variant claimed better

    def paper(self, pg19: bool = False) -> tuple[float, float]:
        """The paper's numbers for (a, b) in its setting (HyLoRA at 8192; harness.report.paper_numbers). `pg19`:
        perplexities after fine-tuning on PG-19 (Table 7); RULER has numbers only for Table 1's fine-tunes."""
        n = PAPER_FINETUNE_CONTEXT * (2 if self.at == "2F" else 1)

        def value(spec: tuple[str, str]) -> float:
            method, kind = spec
            kind_or_pretrained = None if spec == PRETRAINED else kind
            got = (paper_numbers.ruler(method, kind_or_pretrained, n) if self.metric == "ruler"
                   else paper_numbers.perplexity(kind_or_pretrained, n, pg19))
            if got is None:
                raise LookupError(f"the paper has no {self.metric} at {n} tokens for {spec}")
            return got

        return value(self.a), value(self.b)


_SE, _HY = ("hylora", "se_attn"), "hylora"
#: The paper's claims, each about HyLoRA at 8192 unless it names another method (Table 1 and 7, Figures 2 and 3).
CLAIMS = [
    Claim("SE-Attn retrieves better than a sliding window", "ruler", "F", (_HY, "sliding_window"), _SE),
    Claim("SE-Attn retrieves better than S\u00b2-Attn", "ruler", "F", (_HY, "s2_attn"), _SE),
    Claim("fine-tuning with SE-Attn lifts RULER at the fine-tuning context", "ruler", "F", PRETRAINED, _SE),
    Claim("HyLoRA beats LoRA (SE-Attn)", "ruler", "F", ("lora", "se_attn"), _SE),
    Claim("HyLoRA beats LoRA+ (SE-Attn)", "ruler", "F", ("lora_plus", "se_attn"), _SE),
    Claim("retrieved blocks beat no retrieval", "ruler", "F", (_HY, "se_attn_nomem"), _SE),
    Claim("top-k blocks beat random blocks", "ruler", "F", (_HY, "se_attn_random"), _SE),
    Claim("fine-tuning with SE-Attn lowers perplexity at the fine-tuning context", "perplexity", "F", PRETRAINED,
          _SE),
    Claim("SE-Attn extrapolates better than S\u00b2-Attn", "perplexity", "2F", (_HY, "s2_attn"), _SE),
    Claim("SE-Attn extrapolates better than a sliding window", "perplexity", "2F", (_HY, "sliding_window"), _SE),
]


def _matches(k: VariantKey, spec: tuple[str, str]) -> bool:
    method, backend = spec
    if method == "none":
        return k.stage == "pretrained"
    return (k.stage != "pretrained" and not k.eval_attention and k.method == method
            and attention_kind(k.backend) == attention_kind(backend))


def _seed(r: Record) -> int:
    return int((r.variant or {}).get("seed", 0))


class _Data:
    """The base run's ok values by variant: perplexity per (context, seed), RULER per-sample scores per length."""

    def __init__(self, records: list[Record]):
        self.ppl: dict[VariantKey, dict[tuple[int, int], float]] = defaultdict(dict)
        self.ruler: dict[VariantKey, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
        # statuses of the failed cells (a NaN or infinite value: "error") by variant and (metric, length)
        self.failed: dict[VariantKey, dict[tuple[str, int], Counter]] = defaultdict(lambda: defaultdict(Counter))
        for r in records:
            if r.run_index or not r.eval_context or r.metric not in ("perplexity", "ruler"):
                continue
            k, n = variant_key(r), int(r.eval_context)
            field = "perplexity" if r.metric == "perplexity" else "accuracy"
            v = r.values.get(field)
            if not ok(r) or (v is not None and not (number(v) and math.isfinite(v))):
                # a NaN or infinite value is a failure, as everywhere in the report
                self.failed[k][(r.metric, n)][r.status if not ok(r) else "error"] += 1
            elif r.metric == "perplexity" and v is not None:
                self.ppl[k][(n, _seed(r))] = float(v)
            elif r.metric == "ruler" and r.values.get("per_sample"):
                self.ruler[k][n].update(sample_outcomes(r))
        self.variants = sorted(set(self.ppl) | set(self.ruler) | set(self.failed))

    def failures(self, claim: Claim, a: VariantKey, b: VariantKey, n: int) -> str:
        """'A: 1 cell OOM; B: 2 cells TIMEOUT': the failed cells of each side at length n, "" where none."""
        def side(k: VariantKey) -> str:
            c = self.failed.get(k, {}).get((claim.metric, n), Counter())
            return ", ".join(f"{m} cell{'s' if m > 1 else ''} {status.upper()}" for status, m in sorted(c.items()))

        return "; ".join(f"{name}: {said}" for name, k in (("A", a), ("B", b)) if (said := side(k)))

    def lengths(self, claim: Claim, a: VariantKey, b: VariantKey) -> list[int]:
        if claim.metric == "ruler":
            ra, rb = self.ruler[a], self.ruler[b]
            return sorted(n for n in set(ra) & set(rb) if set(ra[n]) & set(rb[n]))  # lengths with shared samples
        return sorted({n for n, s in self.ppl[a] if (n, s) in self.ppl[b]})  # lengths with a seed in common

    def judge(self, claim: Claim, a: VariantKey, b: VariantKey, n: int):
        """(mean of a, mean of b, b - a as a Difference) at length n, over what both measured."""
        if claim.metric == "ruler":
            pa, pb = self.ruler[a][n], self.ruler[b][n]
            shared = set(pa) & set(pb)
            d = significance.paired_samples(pa, pb)
            return (100 * sum(pa[s] for s in shared) / len(shared), 100 * sum(pb[s] for s in shared) / len(shared),
                    d and replace(d, estimate=100 * d.estimate, low=100 * d.low, high=100 * d.high))
        seeds = sorted({s for m, s in self.ppl[a] if m == n} & {s for m, s in self.ppl[b] if m == n})
        va, vb = [self.ppl[a][(n, s)] for s in seeds], [self.ppl[b][(n, s)] for s in seeds]
        return (sum(va) / len(va), sum(vb) / len(vb), significance.paired_t([y - x for x, y in zip(va, vb,
                                                                                                   strict=True)]))


def verdict(claim: Claim, d: significance.Difference | None) -> str:
    if d is None or not d.significant:
        return "inconclusive"
    better = d.estimate > 0 if claim.metric == "ruler" else d.estimate < 0
    return "reproduced" if better else "not reproduced"


def claims_blocks(records: list[Record], pg19: bool = False) -> list[Block]:
    """The claims table; [] when no claim has both its variants in the records. `pg19`: the fine-tunes read PG-19,
    so perplexity claims show the paper's PG-19 fine-tunes (Table 7)."""
    data = _Data(records)
    rows = []
    for claim in CLAIMS:
        pairs = [(a, b) for b in data.variants if _matches(b, claim.b)
                 for a in data.variants if _matches(a, claim.a) and a.model == b.model
                 and a.finetune_context in (None, b.finetune_context)]  # fine-tunes at one context
        for a, b in pairs:
            rows.append(_row(claim, data, a, b, claim.paper(pg19)))
    if not rows:
        return []
    return [paragraph(
        "Each of the paper's claims as a comparison of two variants of this report (base run, full-attention "
        "evaluation, one model and one fine-tuning context), whatever the model: the direction is what carries "
        "over, not the numbers. RULER: all samples both variants scored at the length (the suite's tasks, pooled "
        "over seeds), McNemar's exact test; "
        "perplexity: paired by seed, Student's t. Reproduced: the difference goes the claimed way with p < 0.05; "
        "not reproduced: significant the other way; inconclusive: otherwise (p ≥ 0.05, or a sign test on partial "
        "scores that favours the side the mean does not); failed: a side's cells at the length all failed (OOM, "
        "timeout, NaN), which the row names, as it names failed cells left out beside measured ones. The verdict "
        "follows p: for RULER the "
        "interval is the normal approximation, which can exclude zero where the exact test, with few discordant "
        "samples, does not reach p < 0.05."),
        table(["claim", "A → B", "at", "paper A → B", "ours A → B", "B − A [95% CI]", "p", "verdict"], rows,
              numeric_from=3, cls="wrap-headers")]


def _row(claim: Claim, data: _Data, a: VariantKey, b: VariantKey, paper_ab: tuple[float, float]) -> list[dict]:
    digits = 1 if claim.metric == "ruler" else 2
    unit = " pts" if claim.metric == "ruler" else ""
    f = b.finetune_context or a.finetune_context or 0
    want = f if claim.at == "F" else 2 * f
    names = cell(f"{variant_label(a)} → {variant_label(b)}", cls="label")
    what = "RULER" if claim.metric == "ruler" else "PPL"
    lengths = data.lengths(claim, a, b)
    paper = cell(f"{paper_ab[0]:g} → {paper_ab[1]:g}")
    failed = data.failures(claim, a, b, want)
    if want not in lengths:
        why = (f"{what} at {claim.at} = {want} failed: {failed}" if failed else
               f"{what} not measured at {claim.at} = {want} for both")
        return [cell(claim.text, cls="label"), names, cell(f"{what} @ {claim.at}"), paper,
                cell("–", cls="missing", title=why, note=why), cell(""), cell(""),
                cell("failed", cls="fail") if failed else cell("not measured")]
    mean_a, mean_b, d = data.judge(claim, a, b, want)
    v = verdict(claim, d)
    ci = "" if d is None or not math.isfinite(d.low) else f" [{d.low:+.{digits}f}, {d.high:+.{digits}f}]"
    flat = d is not None and d.n > 1 and not ci  # every seed the same difference (significance.paired_t)
    n_text = ("" if d is None else f"{d.n} samples" if claim.metric == "ruler" else f"{d.n} seed(s)")
    n_text = "; ".join(filter(None, [n_text, f"{failed}, left out" if failed else ""]))
    return [cell(claim.text, cls="label"), names, cell(f"{what} @ {length_column(want)}"), paper,
            cell(f"{fmt_float(mean_a, digits)} → {fmt_float(mean_b, digits)}", note=n_text),
            cell("–" if d is None else f"{d.estimate:+.{digits}f}{unit}{ci}",
                 note="every seed gave the same difference: not replicates, nothing to test" if flat else ""),
            cell("–" if d is None else f"{d.p:.2g}"),
            cell(v, cls={"reproduced": "better", "not reproduced": "worse"}.get(v, ""))]
