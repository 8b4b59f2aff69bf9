"""A self-contained HTML report (one file, plots embedded as PNG data URIs, inline CSS, no JS).

Shape: ``render_report`` builds a header and a list of sections, then renders
``templates/report.html.j2``. Each section is built by one function of ``sections()``
taking the records and returning ``None`` (nothing to show: section omitted) or a dict
``{"id", "title", "blocks": [...]}``. Blocks are generic (``heading``, ``paragraph``,
``figure``, ``table``, ``list``, ``callouts``) and the template has one macro per block
type, so a new section is one new function (a metric plugin's ``section``) and no
template change.

Sections get ``harness.results.Record``s, normalised (``common.normalise``).
A model *variant* is (model preset, stage, method, backend, finetune_context); the model
preset only shows in labels when records hold more than one model.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from harness.report import plots
from harness.report.common import (  # noqa: F401 - re-exported: the report's helpers live in common
    Block,
    Pivot,
    Section,
    VariantKey,
    cell,
    fail_cell,
    fmt_count,
    fmt_float,
    fmt_int,
    is_multi_run,
    labeller,
    length_column,
    nan_failed,
    normalise,
    ok,
    paragraph,
    table,
    variant_key,
    variant_label,
    variant_names,
    variant_sort,
)
from harness.report.significance import mean_sd
from harness.results import Record

TEMPLATE = "report.html.j2"
ENV_KEYS = ("python", "torch", "transformers", "device", "gpu", "cuda", "cpu", "cpu_count", "threads", "git")
_labeller, _ok = labeller, ok


def protocol_label(settings: dict) -> str:
    proto = settings.get("protocol")
    if not proto:
        return "protocol not recorded"
    hop = next((f"{k} {settings[k]}" for k in ("step", "stride") if settings.get(k) is not None), "")
    return f"{proto} ({hop})" if hop else str(proto)


def dataset_label(ds: dict) -> str:
    if not ds:
        return "dataset not recorded"
    name = str(ds.get("name") or "unnamed dataset")
    extra = [str(ds[k]) for k in ("split",) if ds.get(k)]
    if ds.get("embedded"):
        extra.append("embedded")
    if ds.get("hash"):
        extra.append(f"hash {str(ds['hash'])[:10]}")
    return f"{name} ({', '.join(extra)})" if extra else name


def unplaced(r: Record) -> bool:
    """A failed perplexity record with neither dataset nor protocol, which normalisation could not give the one
    group it belongs to: it is in no group, so it makes no "not recorded" one."""
    return not ok(r) and not r.dataset and not r.settings.get("protocol")


# ----------------------------------------------------------------------------- header


def build_header(records: list[Record], *, title: str, notes: list[str] | None, runs: Sequence[str] = (),
                 superseded: int = 0) -> dict:
    notes = list(notes or [])
    ppl = [r for r in records if r.metric == "perplexity" and not unplaced(r)]
    protocols = sorted({protocol_label(r.settings) for r in ppl})
    datasets = sorted({dataset_label(r.dataset) for r in records if r.dataset})
    if len({r.settings.get("protocol") for r in ppl}) > 1:
        notes.append("Perplexities were measured with different protocols; they are shown in separate "
                     "plots and tables and are not comparable across them.")
    if warned := [f"{r.cell}: {w}" for r in records for w in r.warnings]:
        shown = "; ".join(warned[:5]) + (f"; and {len(warned) - 5} more" if len(warned) > 5 else "")
        notes.append(f"{len(warned)} warning(s) from the measurements, to read their numbers with: {shown}.")
    status = ", ".join(f"{n} {s}" for s, n in sorted(Counter(r.status for r in records).items()))
    created = sorted(r.created for r in records if r.created)
    facts = [
        ("suite", ", ".join(sorted({r.suite for r in records if r.suite})) or "–"),
        ("dataset", "; ".join(datasets) or "–"),
        ("perplexity protocol", "; ".join(protocols) or "–"),
        ("records", f"{len(records)}" + (f" ({status})" if status else "")
         + (f"; {superseded} older record(s) of rerun cells superseded by the latest" if superseded else "")),
    ]
    if len(runs) > 1:
        facts.insert(0, ("runs", " · ".join(f"{r} (base)" if i == 0 else r for i, r in enumerate(runs))))
    if created:
        facts.append(("measured", created[0] if created[0] == created[-1] else f"{created[0]} – {created[-1]}"))
    return {"title": title, "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z").strip(), "notes": notes,
            "facts": facts}


# ----------------------------------------------------------------------------- sections


def perplexity_groups(ppl: list[Record]) -> dict[tuple[str, str], list[Record]]:
    """Perplexity records by (dataset, protocol), which are not comparable across groups; unplaced ones left out."""
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in ppl:
        if not unplaced(r):
            groups[(dataset_label(r.dataset), protocol_label(r.settings))].append(r)
    return groups


def perplexity_section(records: list[Record]) -> Section | None:
    ppl = [r for r in records if r.metric == "perplexity" and r.eval_context]
    if not ppl:
        return None
    label = _labeller(records)
    groups = perplexity_groups(ppl)
    blocks: list[Block] = []
    if any(r.settings.get("eval_attention") == "finetune" and r.backend.startswith("se_attn")
           and "selection=previous" not in r.backend for r in ppl):
        blocks.append({"type": "paragraph", "text": (
            "Note: some cells are evaluated with SE-Attn and the paper's block selection, which ranks a chunk's "
            "memory blocks with all of the chunk's queries; an early position's blocks then depend on later tokens "
            "of its chunk, so those perplexities are not strictly causal scores (selection: previous is).")})
    for (ds, proto), recs in sorted(groups.items()):
        if len(groups) > 1:
            blocks.append({"type": "heading", "text": f"{ds} — {proto}"})
        blocks.extend(_perplexity_group(recs, label, ds, proto))
    if loose := [r for r in ppl if unplaced(r)]:
        blocks.append(paragraph(
            f"{len(loose)} cell(s) failed before recording their dataset and protocol, which the measured cells of "
            "their suite and model do not settle (none, or several groups): they are in no table here; see Failed "
            "cells." if groups else f"No perplexity was measured: {len(loose)} cell(s) failed before measuring; see "
            "Failed cells."))
    return {"id": "perplexity", "title": "Perplexity", "blocks": blocks}


def _spread(values: list[float], recs: list[Record]) -> tuple[float, float | None]:
    """(mean, sd over seeds); no sd where every seed's record is of one model (the same pretrained hash and
    adapter: a model pretrained once for all seeds, or a checkpoint), whose spread is not a seed's."""
    mean, sd = mean_sd(values)
    models = {(r.model.get("hash"), r.model.get("adapter")) for r in recs}
    one_model = len(models) == 1 and next(iter(models))[0] is not None
    return mean, None if one_model else sd


def _perplexity_group(recs: list[Record], label: Callable[[Record], str], ds: str, proto: str) -> list[Block]:
    names = variant_names(recs, label)
    # Models with different tokenizers compare per byte, not per token.
    per_byte = len({r.dataset.get("tokenizer") for r in recs}) > 1
    measure = "bits_per_byte" if per_byte else "perplexity"
    pv = Pivot(recs, lambda r: r.values.get(measure))
    keys, contexts = pv.rows, pv.columns

    # plot
    spread = {(k, c): _spread(pv.values(k, c), pv.records(k, c)) for k in keys for c in pv.measured(k)}
    seeded = any(sd is not None for _, sd in spread.values())
    looks = plots.looks([(f"{k.model}/{k.backend if k.stage != 'pretrained' else 'pretrained'}",
                          f"{k.run}/{k.method}", k.eval_attention) for k in keys])
    series = [plots.Series(label=names[k], x=pv.measured(k), y=[spread[(k, c)][0] for c in pv.measured(k)],
                           failed=pv.failures(k), partial=pv.partials(k), color=colour, linestyle=style,
                           marker=marker,
                           yerr=[spread[(k, c)][1] or 0.0 for c in pv.measured(k)] if seeded else None)
              for k, (colour, style, marker) in zip(keys, looks, strict=True)]
    vlines = []
    pre = sorted({int(s["pretrain_context"]) for r in recs
                  if (s := r.settings).get("pretrain_context")})
    for p in pre:
        vlines.append(plots.VLine(p, f"pretraining context ({plots.tokens_label(p)})", plots.PRETRAIN_COLOR))
    for ft in sorted({int(k.finetune_context) for k in keys if k.finetune_context}):
        vlines.append(plots.VLine(ft, f"fine-tuning context ({plots.tokens_label(ft)})", plots.FINETUNE_COLOR))
    src = (plots.line_vs_length(series, vlines, ylabel="bits per byte", xlabel="evaluation context (tokens)",
                                logy=False) if per_byte else plots.perplexity_vs_context(series, vlines))

    # table; the best of each column is of the means shown (a mean summed another way can differ in its last bit)
    best = {c: min((spread[(k, c)][0] for k in keys if (k, c) in spread), default=None) for c in contexts}

    def show(k: VariantKey, c: int) -> dict:
        (v, sd), n, digits = spread[(k, c)], len(pv.values(k, c)), 3 if per_byte else 2
        title = "" if n == 1 else (f"mean \u00b1 sd of {n} seeds" if sd is not None else
                                   f"one model, measured for each of {n} seeds (pretrain.seed, or a checkpoint)")
        return cell(fmt_float(v, digits), bold=v == best[c], note=f"\u00b1 {sd:.{digits}f}" if sd is not None else "",
                    title=title)

    rows = [[cell(names[k], cls="label")] + [pv.cell(k, c, show) for c in contexts] for k in keys]
    scored_row = [cell("tokens scored", cls="label foot")]
    windows_note = False
    for c in contexts:
        vals = sorted({r.values.get("tokens_scored") for k in keys for r in pv.records(k, c)} - {None})
        text = fmt_int(vals[0]) if len(vals) == 1 else (f"{fmt_int(vals[0])}–{fmt_int(vals[-1])}" if vals else "–")
        scored_row.append(cell(text, cls="foot"))
        windows_note |= any((r.values.get("windows_total") or 0) > (r.values.get("windows") or 0)
                            for k in keys for r in pv.records(k, c))
    rows.append(scored_row)
    columns = ["variant"] + [length_column(c) for c in contexts]
    what = ("Bits per byte (the models' tokenizers differ, so perplexities per token do not compare)" if per_byte
            else "Perplexity")
    text = (f"{what} on {ds}, protocol {proto}, by evaluation context length (tokens). "
            "Lower is better; the best value of each column is in bold; failed cells show their status.")
    if seeded:
        text += (" Where a variant was run with several seeds: the mean, with \u00b1 one sample standard deviation "
                 "over seeds under it (error bars in the plot).")
    if windows_note:
        text += " Some cells evaluated an evenly spaced subset of the windows (max_windows)."
    return [
        {"type": "paragraph", "text": text},
        {"type": "figure", "src": src, "alt": f"{measure.replace('_', ' ')} vs evaluation context ({ds}, {proto})",
         "caption": " ".join(filter(None, ["Dotted vertical lines: pretraining and fine-tuning context lengths. "
                                           "✕ at the top: a failed cell (status written next to it).",
                                           plots.ring_note(series)]))},
        table(columns, rows),
    ]


#: The value of each metric that its tables and plots show, which fails an ok record where it is NaN or inf
#: (common.Pivot).
SHOWN = {"perplexity": "perplexity", "ruler": "accuracy", "efficiency": "time_ms"}


def failures_section(records: list[Record]) -> Section | None:
    measured_odd = [f for r in records if _ok(r) and r.metric in SHOWN
                    and not _ok(f := nan_failed(r, r.values.get(SHOWN[r.metric])))]
    bad = [r for r in records if not _ok(r)] + measured_odd
    if not bad:
        return None
    label = _labeller(records)
    rows = []
    for r in sorted(bad, key=lambda r: (r.metric, r.eval_context or 0, r.cell)):
        err = str(r.error or "")
        first = err.strip().splitlines()[-1] if err.strip() else ""
        short = first if len(first) <= 160 else first[:157] + "…"
        rows.append([
            cell(r.cell, cls="mono wrap-any"), cell(r.metric), cell(label(r), cls="label"),
            cell(r.eval_context or "–"), cell(r.status.upper(), cls="fail"),
            cell(short, cls="mono err", details=err if err.strip() != short else ""),
        ])
    text = f"{len(bad)} cell(s) produced no measurement" + (
        f"; {len(measured_odd)} of them recorded ok, but measured NaN or inf, which the tables count as failed."
        if measured_odd else ".")
    return {"id": "failures", "title": "Failed cells",
            "blocks": [{"type": "paragraph", "text": text},
                       table(["cell", "metric", "variant", "eval context", "status", "error"], rows,
                             numeric_from=99)]}


def environment_section(records: list[Record]) -> Section | None:
    if not records:
        return None
    multi = is_multi_run(records)
    envs: Counter = Counter()
    missing = 0
    for r in records:
        env = r.env
        if not env:
            missing += 1
            continue
        run = ((("run", r.run),) if multi else ())
        envs[run + tuple((k, env.get(k)) for k in ENV_KEYS)] += 1
    keys = (["run"] if multi else []) + [k for k in ENV_KEYS if any(dict(e).get(k) is not None for e in envs)]
    blocks: list[Block] = []
    if envs and keys:
        if len(envs) == 1:
            env = dict(next(iter(envs)))
            rows = [[cell(k, cls="label"), cell(env.get(k), cls="mono")] for k in keys]
            blocks.append(table(["", "value"], rows, numeric_from=99))
        else:
            order = {r.run: r.run_index for r in records}  # runs in their order, the base first
            rows = [[cell(dict(e).get(k) if dict(e).get(k) is not None else "–", cls="mono") for k in keys]
                    + [cell(n)] for e, n in sorted(envs.items(), key=lambda kv: (order.get(dict(kv[0]).get("run"), 0),
                                                                                -kv[1]))]
            blocks.append(table(keys + ["records"], rows, numeric_from=len(keys)))
    if missing:
        blocks.append(paragraph(
            f"{missing} record(s) carry no environment: failure records written by the runner when a job "
            "process died (crash, out-of-memory kill or timeout)."))
    kernels: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        if r.kernel:
            kernels[r.kernel][r.metric] += 1
    if kernels:
        blocks.append({"type": "heading", "text": "Kernels that ran"})
        blocks.append({"type": "list", "mono": True, "items": [
            f"{k} — " + ", ".join(f"{n} {m}" for m, n in sorted(c.items())) for k, c in sorted(kernels.items())
        ]})
    return {"id": "environment", "title": "Environment", "blocks": blocks} if blocks else None


def sections() -> list[Callable[[list[Record]], Section | None]]:
    """The report's sections in page order, each taking the normalised records (see ``common.normalise``): one per
    registered metric (its plugin's ``section``), then the comparison of runs, the paper's numbers, the failed
    cells and the environment."""
    from harness.metrics.base import builtin
    from harness.report.paper import paper_section
    from harness.report.runs import comparison_section

    return [m.section for m in builtin().values()] + [comparison_section, paper_section, failures_section,
                                                     environment_section]


# ----------------------------------------------------------------------------- rendering


def build_context(records: list[Record], *, title: str, notes: list[str] | None = None,
                  runs: Sequence[str] | None = None) -> dict:
    records, names, superseded = normalise(records, runs)
    built = [s for s in (build(records) for build in sections()) if s]
    return {"header": build_header(records, title=title, notes=notes, runs=names, superseded=superseded),
            "sections": built}


def render_html(records: list[Record], *, title: str, notes: list[str] | None = None,
                runs: Sequence[str] | None = None) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=select_autoescape(["html", "j2"]), undefined=StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    return env.get_template(TEMPLATE).render(**build_context(records, title=title, notes=notes, runs=runs))


def render_report(records: list[Record], out: Path | str, *, title: str, notes: list[str] | None = None,
                  runs: Sequence[str] | None = None) -> Path:
    """Write ``out/index.html``, a single self-contained file, and return its path.

    ``runs``: the run names in order (the first is the base of comparisons) when ``records`` come
    from several results directories, each tagged with its ``run``; by default the order in
    which the records name them. With one run the report is the same as without run tags.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_html(records, title=title, notes=notes, runs=runs), encoding="utf-8")
    tmp.replace(path)
    return path
