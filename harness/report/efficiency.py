"""Section "Attention efficiency": one attention layer, forward + backward, per backend and length.

Records: ``metric == "efficiency"``, ``backend`` (label), ``eval_context`` (the length),
``values.time_ms`` (median of ``values.times_ms``), ``values.peak_memory_gib`` (None in CPU records made before
the CPU's was counted), ``values.ideal_speedup`` (dense causal query-key pairs over the backend's), ``kernel``; status
"oom"/"timeout"/"error" at lengths that did not fit or finish. Where a run holds the `full` backend at a length,
every other backend's measured speed-up over it is set beside that limit: their ratio is the fraction of the
limit the kernel reaches.
"""

from __future__ import annotations

import statistics

from harness.report import plots
from harness.report.common import (
    Block,
    Pivot,
    Section,
    cell,
    finite,
    fmt_float,
    fmt_gib,
    length_column,
    nonfinite,
    ok,
    paragraph,
    table,
)
from harness.results import Record


def _device(r: Record) -> str:
    env = r.env
    if env.get("gpu"):
        return f"{env['gpu']} (CUDA {env.get('cuda') or '?'})"
    if env.get("device"):
        threads = f", {env['threads']} threads" if env.get("threads") else ""
        return f"{env['device']} ({env.get('cpu') or 'unknown CPU'}{threads})"
    return ""


def efficiency_section(records: list[Record]) -> Section | None:
    recs = [r for r in records if r.metric == "efficiency" and r.eval_context]
    if not recs:
        return None
    pv = Pivot(recs, lambda r: r.values.get("time_ms"), order=None, unit="measurements",
               row=lambda r: (r.run_index, r.run, str(r.backend or "?")))
    keys, lengths = pv.rows, pv.columns
    names = {k: (f"[{k[1]}] {k[2]}" if k[1] else k[2]) for k in keys}
    colors = {k: plots.color(i) for i, k in enumerate(keys)}  # a backend's colour in every plot of the section

    def med(rs: list[Record], field: str) -> float | None:
        """The median of the records' finite values (a NaN or inf has no place on a plot's axis)."""
        vals = [r.values[field] for r in rs if finite(r.values.get(field))]
        return statistics.median(vals) if vals else None

    def series(field: str) -> list[plots.Series]:
        out = []
        for k in keys:
            xs = [n for n in pv.measured(k) if med(pv.records(k, n), field) is not None]
            out.append(plots.Series(label=names[k], x=xs, y=[med(pv.records(k, n), field) for n in xs],
                                    failed=pv.failures(k), linestyle=("-", "--", ":", "-.")[k[0] % 4],
                                    color=colors[k]))
        return out

    devices = sorted({d for r in recs if (d := _device(r))})
    settings = next((r.settings for r in recs if ok(r)), {})  # a failure has only its cell's
    shape = ", ".join(f"{k} {settings[k]}" for k in ("batch", "heads", "head_dim", "repeats", "warmup")
                      if settings.get(k) is not None)
    blocks: list[Block] = [paragraph(
        "One attention layer, forward + backward, per backend and sequence length: median time over the "
        "repeats" + (f" ({shape})" if shape else "") + ". Measured on " + ("; ".join(devices) or "an unrecorded device")
        + ". Times from different devices are not comparable.")]
    blocks.append({"type": "figure", "src": plots.line_vs_length(series("time_ms"), ylabel="time (ms)"),
                   "alt": "attention time vs length",
                   "caption": "Median forward+backward time; ✕ at the top: the cell failed (status next to it)."})
    has_memory = any(med(pv.records(k, n), "peak_memory_gib") is not None for k in keys for n in lengths)
    if has_memory:
        blocks.append({"type": "figure", "alt": "attention peak memory vs length",
                       "src": plots.line_vs_length(series("peak_memory_gib"), ylabel="peak memory (GiB)"),
                       "caption": "Peak memory of one forward+backward: the CUDA allocator's peak on a GPU; on a CPU, "
                                  "the inputs plus the most the pass held at once (from the profiler's allocations)."})
    else:
        blocks.append(paragraph("No peak-memory values: none measured (CPU records made before the CPU's peak was "
                                "counted have none)."))

    def show(k: tuple, n: int) -> dict:
        t, m = med(pv.records(k, n), "time_ms"), med(pv.records(k, n), "peak_memory_gib")
        times = [x for r in pv.records(k, n) for x in (r.values.get("times_ms") or [])]
        spread = f"repeats {_ms(min(times))}–{_ms(max(times))} ms" if times else ""
        odd = next((x for r in pv.records(k, n) if nonfinite(x := r.values.get("peak_memory_gib"))), None)
        memory = m if m is not None else odd  # a NaN or inf measured is said, not left out
        return cell(_ms(t), title=spread,
                    note=f"{fmt_gib(memory)} GiB" if memory is not None else "")

    def kernels(k: tuple) -> dict:
        ran = sorted({r.kernel for n in pv.measured(k) for r in pv.records(k, n) if r.kernel})
        return cell("; ".join(ran) or "–", cls="mono small left")

    rows = [[cell(names[k], cls="label mono"), *(pv.cell(k, n, show) for n in lengths), kernels(k)] for k in keys]
    blocks.append(table(["backend"] + [length_column(n) for n in lengths] + ["kernel"], rows,
                        caption="Median time (ms) per length" + (", peak memory under it" if has_memory else "")
                                + "; hover a time for the spread of the repeats."))
    blocks += _limit_blocks(pv, names, colors, med)
    return {"id": "efficiency", "title": "Attention efficiency", "blocks": blocks}


def _ms(x: float) -> str:
    """A time in ms as the table shows it: 2 decimals under 100 ms, else 1 (never 1.09e+03)."""
    return fmt_float(x, 2 if x < 100 else 1)


def _limit_blocks(pv: Pivot, names: dict, colors: dict, med) -> list[Block]:
    """Per backend and length: measured speed-up over `full` of the same run, the limit the backend's query-key
    pairs set (values.ideal_speedup), and the fraction of it reached; a table and a plot of the fraction."""
    def speedups(k: tuple, n: int) -> tuple[float, float] | None:
        t, ideal = med(pv.records(k, n), "time_ms"), med(pv.records(k, n), "ideal_speedup")
        t_dense = med(pv.records((k[0], k[1], "full"), n), "time_ms")
        return None if None in (t, ideal, t_dense) or not t else (t_dense / t, ideal)

    found = {k: {n: got for n in pv.columns if (got := speedups(k, n))} for k in pv.rows if k[2] != "full"}
    found = {k: by for k, by in found.items() if by}
    if not found:
        return []

    def show(k: tuple, n: int) -> dict:
        if n not in found[k]:
            failed = [(who, f) for who, row in (("this backend", k), ("full attention", (k[0], k[1], "full")))
                      if not pv.records(row, n) and (f := pv.failure(row, n))]
            why = "; ".join(f"{who} {f.status.upper()} at this length" for who, f in failed) or "not measured"
            return cell("–", cls="missing", title=f"no speed-up: {why}")
        measured, ideal = found[k][n]
        return cell(f"{measured:.2f}x / {ideal:.2f}x", note=f"{measured / ideal:.0%} of the limit")

    rows = [[cell(names[k], cls="label mono"), *(show(k, n) for n in pv.columns)] for k in found]
    series = [plots.Series(label=names[k], x=list(by), y=[m / i for m, i in by.values()], color=colors[k])
              for k, by in found.items()]
    return [
        table(["backend"] + [length_column(n) for n in pv.columns], rows,
              caption="Speed-up over full attention of the same run: measured / the limit, which is dense causal "
                      "query-key pairs over the backend's (what a kernel computing only the pairs its pattern "
                      "holds, as fast per pair as full attention, would reach)."),
        {"type": "figure", "src": plots.line_vs_length(series, ylabel="measured speed-up / limit", logy=False),
         "alt": "fraction of the query-key pair limit vs length",
         "caption": "Fraction of the limit: 100% is a kernel as fast per computed pair as full attention."},
    ]
