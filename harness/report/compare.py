"""`harness compare BASE HEAD`: a regression gate between two results directories.

Cells are matched by id, and only each side's current record per cell counts (`results.current`: a
superseded record is never judged). Each value is judged by its kind, by the functions here, which the
report's run comparison uses too:
- perplexity (deterministic under fixed model, data and settings): relative tolerance;
- accuracy with per-sample outcomes (`values.per_sample`: {sample id: score in [0, 1]}): exact McNemar test
  over the samples both runs scored (a sign test on partial scores), a regression only if head is lower, on the
  samples and in accuracy, and p < alpha; with no sample in
  common (the prompts changed), Fisher's exact test on the two accuracies, unpaired;
- time with repeats (`values.times_ms`: list): ratio of medians above the threshold AND a
  one-sided permutation test p < alpha (asv's rule), only between records of the same device; timed on CPU,
  a regression is reported but fails the gate only with --fail-on-time (two CPU runs drift apart);
- peak memory (`values.peak_memory_gib`): ratio above a tight threshold, same device only;
- an lm-eval task's metrics (each with lm-eval's standard error): a z-test on the difference, two-sided,
  unpaired (conservative: both sides scored the same documents), in the direction lm-eval says is better.
A cell that was ok in base and failed or vanished in head is a regression, and so is a head record
that lacks a value its base has, or whose perplexity is not a finite number.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from dataclasses import dataclass

from harness.hardware import describe
from harness.report.lm_eval import metric_names
from harness.report.significance import fisher_exact, mcnemar_exact
from harness.results import Record

VERDICTS = ("regression", "improvement", "ok", "skipped")


@dataclass(frozen=True)
class Thresholds:
    ppl_rtol: float = 0.005  # perplexity may rise by 0.5%
    time_ratio: float = 1.10  # median time may rise by 10% (or more if not significant)
    memory_ratio: float = 1.05
    alpha: float = 0.05

    def __post_init__(self) -> None:
        from harness.errors import UserError

        rules = {"ppl_rtol": (lambda x: x > 0, "> 0"), "time_ratio": (lambda x: x >= 1, ">= 1"),
                 "memory_ratio": (lambda x: x >= 1, ">= 1"), "alpha": (lambda x: 0 < x < 1, "in (0, 1)")}
        for name, (ok, allowed) in rules.items():
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and ok(value)):
                raise UserError(f"compare threshold {name} (--{name.replace('_', '-')}) = {value!r}: must be a "
                                f"finite number {allowed}")


@dataclass
class Finding:
    cell: str
    metric: str
    base: float | None
    head: float | None
    verdict: str
    why: str = ""
    gates: bool = True  # False: reported, but fails the gate only with --fail-on-time (timings measured on CPU)

    @property
    def change(self) -> str:
        """Relative, or in points for an accuracy (a percentage, as the report's run comparison shows it)."""
        if None in (self.base, self.head) or not all(math.isfinite(x) for x in (self.base, self.head)):
            return ""  # not "+nan%" or "+inf%": base and head say it
        if self.metric == "accuracy":
            return f"{self.head - self.base:+.1f} pts"
        if self.base == 0:
            return ""
        return f"{(self.head / self.base - 1) * 100:+.2f}%"


def compare(base: list[Record], head: list[Record], th: Thresholds = Thresholds()) -> list[Finding]:
    """Judge the current record of every cell of `base` against the current record of the same cell in `head`."""
    from harness.results import current

    head_by_cell = {r.cell: r for r in current(head)}
    findings = []
    for b in current(base):
        if b.status != "ok":
            continue
        h = head_by_cell.get(b.cell)
        if h is None or h.status != "ok":
            why = "missing in head" if h is None else f"head status {h.status}" + (f": {h.error}" if h.error else "")
            findings.append(Finding(b.cell, b.metric, None, None, "regression", why))
            continue
        if b.config_hash != h.config_hash:
            findings.append(Finding(b.cell, b.metric, None, None, "skipped", unlike(b, h)))
            continue
        findings += _judge(b, h, th)
    return findings


def unlike(b: Record, h: Record) -> str:
    """Why two records of a cell with different config hashes are not compared."""
    hw = {side: r.settings.get("hardware") for side, r in (("base", b), ("head", h))}
    if hw["base"] == hw["head"]:
        return "settings differ (config hash)"
    if None in hw.values():
        side = "base" if hw["base"] is None else "head"
        return f"no hardware in {side}'s record (recorded before records named it): re-make {side}"
    return f"hardware differs: {hw['base']} vs {hw['head']}"


_NO_VALUE = (None, [], {})
# Records of a training run, whose peak memory is not judged: on a CPU it is the process's peak RSS, which identical
# runs put 3% apart (and a job forked from the fork server lower than a fresh one), against a 5% threshold.
TRAINING = ("train", "pretrain")


def _judge(b: Record, h: Record, th: Thresholds) -> list[Finding]:
    bv, hv, cell, out = b.values, h.values, b.cell, []
    devices = describe(b.env), describe(h.env)  # the machines (harness.hardware) each side ran on
    same_device = devices[0] == devices[1]
    lost = [k for k in ("perplexity", "per_sample", "times_ms", "peak_memory_gib")
            if bv.get(k) not in _NO_VALUE and hv.get(k) in _NO_VALUE]
    if lost:
        return [Finding(cell, b.metric, None, None, "regression", f"no {', '.join(lost)} in head")]
    if "perplexity" in bv:
        base, new = bv["perplexity"], hv["perplexity"]
        verdict = judge_perplexity(base, new, th)
        out.append(Finding(cell, "perplexity", base, new, verdict, f"tolerance {th.ppl_rtol:.1%}"))
    if "per_sample" in bv:
        out.append(_accuracy(cell, bv["per_sample"], hv["per_sample"], th))
    if "times_ms" in bv:
        out.append(_timing(cell, bv["times_ms"], hv["times_ms"], th, gates=devices[0].startswith("cuda"))
                   if same_device else
                   Finding(cell, "time (median ms)", None, None, "skipped",
                           f"devices differ: {devices[0]} vs {devices[1]}"))
    if "peak_memory_gib" in bv and b.metric not in TRAINING:
        base, new = bv["peak_memory_gib"], hv.get("peak_memory_gib")
        if not same_device or None in (base, new):  # CPU records made before its peak was counted: None
            out.append(Finding(cell, "peak memory (GiB)", base, new, "skipped", "devices differ or no value"))
        else:
            verdict = ("regression" if new > base * th.memory_ratio
                       else "improvement" if new < base / th.memory_ratio else "ok")
            out.append(Finding(cell, "peak memory (GiB)", base, new, verdict, f"ratio threshold {th.memory_ratio}"))
    if b.metric == "lm_eval":
        better = b.settings.get("higher_is_better") or {}
        out += [_lm_eval(cell, m, bv, hv, better.get(m.split("/")[0]), th) for m in metric_names(bv)]
    return out


def _lm_eval(cell: str, metric: str, bv: dict, hv: dict, higher_is_better: bool | None, th: Thresholds) -> Finding:
    base, new = bv[metric], hv.get(metric)
    name = f"lm_eval {metric}"
    if not isinstance(new, int | float) or not math.isfinite(new):
        return Finding(cell, name, base, None, "regression", f"no finite {metric} in head")
    if new == base:
        return Finding(cell, name, base, new, "ok", "unchanged")
    se = [v.get(f"{metric}_stderr") for v in (bv, hv)]
    if higher_is_better is None or not all(isinstance(x, int | float) and math.isfinite(x) for x in se):
        why = "lm-eval gives no direction for it" if higher_is_better is None else "no standard error to test with"
        return Finding(cell, name, base, new, "skipped", f"changed, but {why}")
    spread = math.hypot(*se)
    p = math.erfc(abs(new - base) / spread / math.sqrt(2)) if spread else 0.0
    worse = new < base if higher_is_better else new > base
    verdict = "ok" if p >= th.alpha else "regression" if worse else "improvement"
    return Finding(cell, name, base, new, verdict, f"z-test on lm-eval's standard errors, p={p:.3g}")


def judge_perplexity(base: float, head: float, th: Thresholds) -> str:
    """Perplexity is deterministic: a change beyond the relative tolerance is a verdict; a non-finite head is a
    regression (NaN compares false with everything, which would pass), a finite head of a non-finite base an
    improvement."""
    if not math.isfinite(head):
        return "regression" if math.isfinite(base) else "ok"
    if not math.isfinite(base):
        return "improvement"
    if head > base * (1 + th.ppl_rtol):
        return "regression"
    return "improvement" if head < base * (1 - th.ppl_rtol) else "ok"


def judge_accuracy(base: dict, head: dict, th: Thresholds) -> tuple[str, float, int]:
    """(verdict, p, shared samples) for per-sample outcomes {sample id: score in [0, 1]}: McNemar over the shared
    samples (a sign test where scores are partial, which counts only where the accuracy over them moves the same
    way), or, with none shared (0), Fisher's exact test on the two accuracies; "skipped" if a side has no
    samples."""
    shared = set(base) & set(head)
    against = False
    if shared:
        worse = sum(base[s] > head[s] for s in shared)  # right before, wrong now (or less right: partial scores)
        better = sum(head[s] > base[s] for s in shared)
        p = mcnemar_exact(worse, better)
        # RULER's string_match_all scores a sample in [0, 1]: the sign test can count more samples lost while the
        # accuracy rose (many lost a little, a few gained much). That is significant neither way
        # (harness.report.significance.paired_samples).
        moved = sum(head[s] - base[s] for s in shared)
        against = (better > worse) - (better < worse) != (moved > 0) - (moved < 0)
    elif base and head:
        hits_b, hits_h = round(sum(base.values())), round(sum(head.values()))
        p = fisher_exact(hits_b, len(base), hits_h, len(head))
        worse, better = hits_b * len(head), hits_h * len(base)  # the accuracies, cross-multiplied
    else:
        return "skipped", 1.0, 0
    verdict = ("ok" if p >= th.alpha or worse == better or against else "regression" if worse > better
               else "improvement")
    return verdict, p, len(shared)


def _accuracy(cell: str, base: dict, head: dict, th: Thresholds) -> Finding:
    verdict, p, n = judge_accuracy(base, head, th)
    if verdict == "skipped":
        return Finding(cell, "accuracy", None, None, "skipped", "no samples")
    if n:
        shared = set(base) & set(head)
        acc_b, acc_h = (100 * sum(x[s] for s in shared) / n for x in (base, head))
        unpaired = [f"{len(x) - n} only in {side}" for side, x in (("base", base), ("head", head)) if len(x) > n]
        left_out = f" ({', '.join(unpaired)}: not compared)" if unpaired else ""
        return Finding(cell, "accuracy", acc_b, acc_h, verdict, f"McNemar p={p:.3g} over {n} samples{left_out}")
    acc_b, acc_h = (100 * sum(x.values()) / len(x) for x in (base, head))
    return Finding(cell, "accuracy", acc_b, acc_h, verdict,
                   f"no sample in common (prompts changed): Fisher exact p={p:.3g}, {len(base)} vs {len(head)} samples")


def _timing(cell: str, base: list[float], head: list[float], th: Thresholds, gates: bool) -> Finding:
    mb, mh = statistics.median(base), statistics.median(head)
    p_slower = permutation_p(base, head)
    p_faster = permutation_p(head, base)
    if mh > mb * th.time_ratio and p_slower < th.alpha:
        verdict = "regression"
    elif mh * th.time_ratio < mb and p_faster < th.alpha:
        verdict = "improvement"
    else:
        verdict = "ok"
    return Finding(cell, "time (median ms)", mb, mh, verdict,
                   f"ratio threshold {th.time_ratio}, permutation p={min(p_slower, p_faster):.3g}", gates)


def failed(findings: list[Finding], fail_on_time: bool = False) -> bool:
    """Whether the gate fails: a regression that gates (CPU timings only with `fail_on_time`)."""
    return any(f.verdict == "regression" and (f.gates or fail_on_time) for f in findings)


def permutation_p(base: list[float], head: list[float], n_random: int = 20_000, seed: int = 0) -> float:
    """One-sided p that head's median exceeds base's by chance (exact when few permutations)."""
    pooled, k = list(base) + list(head), len(head)
    observed = statistics.median(head) - statistics.median(base)
    exact = math.comb(len(pooled), k) <= n_random
    if exact:
        splits = itertools.combinations(range(len(pooled)), k)
    else:
        rng = random.Random(seed)
        splits = (rng.sample(range(len(pooled)), k) for _ in range(n_random))
    hits = total = 0 if exact else 1  # sampled: the observed split counts too, so p is never 0 (Phipson & Smyth)
    for idx in splits:
        chosen = set(idx)
        h = [pooled[i] for i in chosen]
        b = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        hits += statistics.median(h) - statistics.median(b) >= observed - 1e-12
        total += 1
    return hits / total


def markdown(findings: list[Finding], base: str, head: str, fail_on_time: bool = False) -> str:
    """A summary for a CI job page: counts, then every regression and improvement (and, where CPU timings moved,
    whether they gate: only with `fail_on_time`)."""
    counts = {v: sum(f.verdict == v for f in findings) for v in VERDICTS}
    lines = [f"### harness compare: `{base}` → `{head}`", "",
             " · ".join(f"{n} {v}" for v, n in counts.items()), ""]
    shown = [f for f in findings if f.verdict != "ok"]
    if shown:
        lines += ["| verdict | cell | metric | base | head | change | why |", "|---|---|---|---|---|---|---|"]
        for f in sorted(shown, key=lambda f: VERDICTS.index(f.verdict)):
            lines.append(f"| {f.verdict} | `{f.cell}` | {f.metric} | {_fmt(f.base)} | {_fmt(f.head)} | "
                         f"{f.change} | {f.why} |")
    else:
        lines.append("No regressions or improvements beyond the thresholds.")
    if any(not f.gates and f.verdict != "ok" for f in shown):
        lines += ["", "Timed on CPU: gating (--fail-on-time)." if fail_on_time else
                  "Timed on CPU: reported, not gating (pass --fail-on-time to gate on them)."]
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"
