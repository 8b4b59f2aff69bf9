import re
from dataclasses import asdict, replace

import pytest

from harness.report import render_report
from harness.report.html import build_context, variant_key, variant_label
from harness.report.plots import PALETTE, looks, tokens_label
from harness.report.significance import wilson
from harness.results import Record, to_frame

CONTEXTS = [2048, 4096, 8192, 16384]
ENV = {"python": "3.11.9", "torch": "2.13.0+cpu", "transformers": "5.23.0", "device": "cpu",
       "cpu": "x86_64", "cpu_count": 2, "threads": 2, "git": "eca9ce4"}
DATASET = {"name": "kjv", "split": "validation", "embedded": True, "hash": "0123456789abcdef"}
NOTE = "PG-19 not configured: evaluated on the embedded KJV corpus"


def ppl_record(stage, method, ctx, ppl, status="ok", error=None, ft_ctx=None):
    values = {} if status != "ok" else {"perplexity": ppl, "nll": 0.0, "tokens_scored": 10 * ctx,
                                        "windows": 10, "windows_total": 10}
    return Record(
        suite="smoke", cell=f"ppl-{stage}-{method}-{ctx}", metric="perplexity", status=status, stage=stage,
        model={"preset": "tiny-hybrid", "hash": "abc"}, method=method, backend="se_attn" if ft_ctx else "full",
        finetune_context=ft_ctx, eval_context=ctx, values=values,
        units={"perplexity": "", "tokens_scored": "tokens"},
        settings={"protocol": "longlora", "step": 256, "pretrain_context": 2048}, dataset=DATASET,
        kernel="full via sdpa", env=ENV, error=error,
    )


def synthetic_records(train=True, failure=True):
    pre = [31.25, 45.5, 78.125, 140.0]
    fine = [32.5, 28.75, 29.125, 35.0]
    recs = [ppl_record("pretrained", "none", c, p) for c, p in zip(CONTEXTS, pre, strict=True)]
    recs += [ppl_record("finetuned", "hylora", c, p, ft_ctx=8192) for c, p in zip(CONTEXTS, fine, strict=True)]
    if failure:
        recs[-1] = ppl_record("finetuned", "hylora", 16384, None, status="oom", ft_ctx=8192,
                              error="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 40.00 GiB")
    if train:
        recs.append(Record(
            suite="smoke", cell="train-hylora", metric="train", stage="finetuned", model={"preset": "tiny-hybrid"},
            method="hylora", backend="se_attn", finetune_context=8192,
            values={"loss_curve": [[i, 5.0 - 0.02 * i] for i in range(0, 101, 5)], "tokens_per_s": 1234.5,
                    "peak_memory_gib": 3.25, "trainable_params": 1_234_567},
            units={"tokens_per_s": "tokens/s", "peak_memory_gib": "GiB"},
            kernel="se_attn via torch", env=ENV, seconds=321.0,
        ))
    return [asdict(r) for r in recs]


def test_full_report(tmp_path):
    records = synthetic_records()
    assert len(to_frame([Record.from_dict(r) for r in records])) == len(records)  # what the store produces
    path = render_report(records, tmp_path / "rep", title="Smoke report", notes=[NOTE])
    assert path == tmp_path / "rep" / "index.html" and path.is_file()
    html = path.read_text()
    for heading in ("Smoke report", "Perplexity", "Pretraining and fine-tuning", "Failed cells", "Environment",
                    "Kernels that ran"):
        assert f">{heading}</h" in html, heading
    assert NOTE in html and 'class="callout"' in html
    assert "kjv (validation, embedded" in html and "longlora (step 256)" in html
    # table numbers, two decimals, best of each column bold
    for v in ("31.25", "45.50", "78.12", "140.00", "32.50", "28.75", "29.12"):
        assert v in html
    assert "<strong>31.25</strong>" in html and "<strong>28.75</strong>" in html
    assert "<strong>45.50</strong>" not in html
    assert "20,480" in html  # tokens scored at 2048
    # the oom cell: in the table, in the failed list with its error
    assert ">OOM<" in html and "Tried to allocate 40.00 GiB" in html
    # variants
    assert "pretrained" in html and "finetuned: hylora / se_attn @ 8192" in html
    # train table
    assert "1,234" in html or "1,235" in html
    assert "1.23M" in html and "3.25" in html
    # environment and kernels
    assert "2.13.0+cpu" in html and "eca9ce4" in html and "full via sdpa" in html and "se_attn via torch" in html
    # self-contained
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 2
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html)
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html


def test_perplexity_only_report_omits_empty_sections(tmp_path):
    records = synthetic_records(train=False, failure=False)
    html = render_report(records, tmp_path, title="PPL only").read_text()
    assert ">Perplexity</h2>" in html and ">Environment</h2>" in html
    assert "Pretraining and fine-tuning" not in html and "Failed cells" not in html
    assert html.count("data:image/png;base64,") == 1
    assert "<strong>35.00</strong>" in html  # the finetuned variant is best at 16K
    assert "https://" not in html and "http://" not in html


def test_failure_only_variant_and_notes_are_escaped(tmp_path):
    records = [asdict(ppl_record("pretrained", "none", 4096, None, status="timeout", error="<killed>"))]
    html = render_report(records, tmp_path, title="t", notes=["a <b>bold</b> claim"]).read_text()
    assert "&lt;b&gt;bold&lt;/b&gt;" in html and "&lt;killed&gt;" in html
    assert ">TIMEOUT<" in html
    empty = render_report([], tmp_path / "empty", title="nothing").read_text()
    assert "No records to report." in empty


def test_length_columns_and_an_empty_report_read_cleanly():
    """A length without a shorter name read "3000 (3000)"; an empty results file's record count "0 ()"."""
    from harness.report.common import length_column

    assert [length_column(n) for n in (300, 1024, 1536, 3000)] == ["300", "1K (1024)", "1.5K (1536)", "3000"]
    assert ("records", "0") in build_context([], title="t")["header"]["facts"]


def test_mixed_protocols_are_split_and_flagged():
    a = synthetic_records(train=False, failure=False)
    b = [dict(r, cell=r["cell"] + "-stride", settings={"protocol": "stride", "stride": 1024}, config_hash="stride")
         for r in a]
    ctx = build_context(a + b, title="t")
    assert any("not comparable" in n for n in ctx["header"]["notes"])
    ppl = next(s for s in ctx["sections"] if s["id"] == "perplexity")
    assert sum(b["type"] == "figure" for b in ppl["blocks"]) == 2


@pytest.mark.parametrize("n,label", [(2048, "2K"), (1536, "1.5K"), (32768, "32K"), (300, "300"), (1 << 20, "1M")])
def test_tokens_label(n, label):
    assert tokens_label(n) == label


def test_many_series_keep_apart_by_colour_line_and_marker():
    few = looks([("full", "lora", ""), ("s2", "lora", "")])
    assert few == [(PALETTE[0], "-", "o"), (PALETTE[1], "-", "o")]  # each its own colour while they last
    # the ablation: pretrained + 5 backends x 3 methods x 2 evaluations, less full with its own attention
    groups = [("pretrained", "none", "")] + [(b, m, e) for b in ("full", "sw", "s2", "se", "se-prev")
                                              for m in ("lora", "lora_plus", "hylora") for e in ("", "finetune")
                                              if not (b == "full" and e)]
    styles = looks(groups)
    assert len(groups) == 28 and len(set(styles)) == 28
    assert len({c for c, _, _ in styles}) == 6 and len({ls for _, ls, _ in styles}) == 4


def test_series_past_what_the_channels_tell_apart_get_looks_of_their_own():
    """Two runs' methods (10 style groups for 4 line styles) drew `[abl] pretrained` and `[pg19] pretrained` alike;
    fine-tune loss curves (lines only) could not use a marker."""
    groups = [("pretrained", f"{run}/none", "") for run in ("abl", "pg19")] + [
        (b, f"{run}/{m}", "") for run in ("abl", "pg19") for b in ("full", "sw", "s2", "se")
        for m in ("lora", "lora_plus", "hylora", "full")]
    assert len(set(looks(groups))) == len(groups) == 34
    # a moved look takes a marker no group has: the evaluation attention's markers keep their meaning
    groups = [(b, f"{run}/{m}", e) for run in ("abl", "pg19") for b in ("full", "sw", "s2", "se")
              for m in ("lora", "lora_plus", "hylora", "full") for e in ("", "finetune") if not (b == "full" and e)]
    drawn = looks(groups)
    assert len(set(drawn)) == len(groups) == 56
    assert all(marker == {"": "o", "finetune": "^"}[e] for (_, _, e), (_, _, marker) in zip(groups, drawn, strict=True)
               if marker in ("o", "^"))
    lines = looks([(b, m, "") for b in ("full", "sw", "s2", "se", "se-prev") for m in ("lora", "lora_plus", "hylora")],
                  markers=False)
    assert len(set(lines)) == 15 and {m for _, _, m in lines} == {""}
    # every line style in use and no spare one: a repeat takes any free look of its colour
    groups = [("b0", "a", ""), ("b0", "b", "")] + [(f"b{i}", m, "") for i in range(1, 10) for m in "abcd"] + [
        ("b10", "a", "")]
    assert len(set(looks(groups, markers=False))) == len(groups) == 39


def test_a_place_where_some_seeds_failed_says_so(monkeypatch):
    """The mean of the seeds that were measured was shown as if it were every seed's."""
    from harness.report.lm_eval import lm_eval_section

    recs = []
    for seed, ppl in ((0, 30.0), (1, 32.0), (2, None)):
        r = asdict(ppl_record("finetuned", "hylora", 2048, ppl, status="ok" if ppl else "oom", ft_ctx=8192,
                              error=None if ppl else "CUDA out of memory"))
        recs.append({**r, "cell": f"{r['cell']}-seed{seed}", "model": {**r["model"], "adapter": f"a{seed}"}})
    from harness.report import html, runs
    from harness.report.common import normalise

    drawn = []
    monkeypatch.setattr(html.plots, "perplexity_vs_context", lambda series, *a, **k: drawn.append(series) or "")
    sec, _ = _section(recs, "perplexity")
    (fine,) = [c for _, col, c in _cells(sec) if col.startswith("2K") and c["text"] != "20,480"]
    assert (fine["text"], fine["note"]) == ("31.00", "\u00b1 1.41 2 of 3 seeds (1 OOM)")
    assert "partial" in fine["cls"] and "CUDA out of memory" in fine["title"]
    # the plots ring the point (the comparison of runs too), and their captions say what a ring means
    assert [s.partial for s in drawn[0]] == [[2048]]
    assert "ring" in next(b for b in sec["blocks"] if b["type"] == "figure")["caption"]
    head = [dict(r, run="b", values={"perplexity": 40.0} if r["status"] == "ok" else {}) for r in recs]
    cmp = runs.comparison_section(normalise([dict(r, run="a") for r in recs] + head, ["a", "b"])[0])
    assert [s.partial for s in drawn[1]] == [[2048], [2048]]
    assert "ring" in next(b for b in cmp["blocks"] if b["type"] == "figure")["caption"]
    ruler = [ruler_record("finetuned", "lora", "niah_single_1", 1024, acc, seed=seed) for seed, acc in ((0, 40.0),
                                                                                                      (1, 60.0))]
    ruler.append({**ruler_record("finetuned", "lora", "niah_single_1", 1024, None, seed=2), "status": "timeout",
                  "values": {}})
    from harness.report import ruler as ruler_report

    heatmaps = []
    monkeypatch.setattr(ruler_report.plots, "accuracy_heatmap", lambda *a, **k: heatmaps.append(k) or "")
    sec, _ = _section(ruler, "ruler")
    (acc,) = [c for row, _, c in _cells(sec) if row == "niah_single_1" and c["text"] == "50.0"]
    assert acc["note"].endswith("2 of 3 seeds (1 TIMEOUT)")
    assert [k["partial"] for k in heatmaps] == [[[True]]]  # its heatmap marks it too
    lm = [asdict(Record(suite="s", cell=f"m/seed{seed}/lm_eval/arc_easy", metric="lm_eval", stage="pretrained",
                        model={"preset": "tiny-hybrid"}, status=status, settings={"task": "arc_easy"},
                        values={"acc": 0.5} if status == "ok" else {})) for seed, status in ((0, "ok"), (1, "error"))]
    (arc,) = [c for _, col, c in _cells(lm_eval_section([Record.from_dict(r) for r in lm])) if c["text"] == "0.500"]
    assert arc["note"] == "1 of 2 seeds (1 ERROR)"
    # both seeds ok, but only one reported acc_norm: its value is that seed's alone
    lm = [dict(r, status="ok", values={"acc": 0.5, **({"acc_norm": 0.25} if r["cell"].startswith("m/seed0") else {})})
          for r in lm]
    (norm,) = [c for _, col, c in _cells(lm_eval_section([Record.from_dict(r) for r in lm])) if c["text"] == "0.250"]
    assert norm["note"] == "1 of 2 seeds report it"


def test_plots_mark_means_of_fewer_seeds(monkeypatch):
    """The heatmap writes a "*" after such a value; a line plot rings such a point."""
    from matplotlib.axes import Axes

    from harness.report import plots

    texts, rings = [], []
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, **k: texts.append(s))
    plots.accuracy_heatmap(["niah"], [1024, 2048], [[50.0, 100.0]], partial=[[True, False]])
    assert texts == ["50.0*", "100"]
    draw = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: (rings.append(a) if k.get("mfc") == "none" else None)
                        or draw(self, *a, **k))
    plots.line_vs_length([plots.Series("a", [1024, 2048], [3.0, 4.0], partial=[2048])], ylabel="y")
    assert rings == [([2048], [4.0])]


def test_a_y_axis_says_log_scale_only_where_it_is_one(monkeypatch):
    """The efficiency plots were labelled "log scale" whatever was drawn; a value <= 0 makes the axis linear."""
    from matplotlib.axes import Axes

    from harness.report import plots

    labels = []
    monkeypatch.setattr(Axes, "set_ylabel", lambda self, text, **k: labels.append(text))
    for ys in ([3.0, 4.0], [0.0, 4.0]):
        plots.line_vs_length([plots.Series("a", [1024, 2048], ys)], ylabel="time (ms)")
        plots.line_vs_length([plots.Series("a", [1024, 2048], ys)], ylabel="perplexity")
    plots.line_vs_length([plots.Series("a", [1024, 2048], [3.0, 4.0])], ylabel="fraction", logy=False)
    assert labels == ["time (ms, log scale)", "perplexity (log scale)", "time (ms)", "perplexity", "fraction"]


def test_failed_cells_at_one_length_are_drawn_apart(monkeypatch):
    """Two series that fail at one length: two markers, one under the other, not one on top of the other; the
    measured points stay where they are."""
    from matplotlib.axes import Axes

    from harness.report import plots

    points, failed = [], []
    draw = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: (failed if k.get("marker") == "X" else points).append(a)
                        or draw(self, *a, **k))
    plots.perplexity_vs_context([plots.Series("a", [1024], [3.0], failed=[(2048, "oom")]),
                                 plots.Series("b", [1024], [4.0], failed=[(2048, "error"), (4096, "oom")])])
    assert points == [([1024], [3.0]), ([1024], [4.0])]
    assert [x for x, _ in failed] == [[2048], [2048], [4096]] and failed[0][1] != failed[1][1]
    assert failed[2][1] == failed[0][1]  # alone at its length: at the top, as the first at 2048


def test_a_seed_that_measured_nan_is_a_failed_seed():
    """A diverged fine-tune writes an ok record with NaN: it was neither counted as measured nor as failed, so the
    cell read "1 of 2 seeds (1 OOM)" when three seeds ran, and a place where every seed gave NaN read '–'."""
    recs = []
    for seed, ppl, status in ((0, 30.0, "ok"), (1, float("nan"), "ok"), (2, None, "oom")):
        r = asdict(ppl_record("finetuned", "hylora", 2048, ppl, status=status, ft_ctx=8192))
        recs.append({**r, "cell": f"{r['cell']}-seed{seed}", "model": {**r["model"], "adapter": f"a{seed}"}})
    r = asdict(ppl_record("finetuned", "hylora", 4096, float("nan"), ft_ctx=8192))
    recs.append(r)
    sec, _ = _section(recs, "perplexity")
    cells = {col[:2]: c for row, col, c in _cells(sec) if row.startswith("finetuned")}
    assert (cells["2K"]["text"], cells["2K"]["note"]) == ("30.00", "1 of 3 seeds (1 ERROR, 1 OOM)")
    assert "it measured NaN" in cells["2K"]["title"]
    assert (cells["4K"]["text"], cells["4K"]["cls"], cells["4K"]["title"]) == ("ERROR", "fail", "it measured NaN")


def test_an_infinite_perplexity_is_a_failed_cell_not_a_crash(tmp_path):
    """An NLL of inf (a token given probability 0) records perplexity = exp(inf) = inf in an ok record: the plot set
    its y limit to inf and matplotlib stopped the whole report (ValueError: Axis limits cannot be NaN or Inf), at the
    end of `harness run` too. It is a failed cell, as a NaN is, in the perplexity section and the run comparison."""
    from harness.report import runs
    from harness.report.common import normalise

    recs = synthetic_records(failure=False)
    recs[1]["values"]["perplexity"] = float("inf")  # pretrained @ 4096
    html = render_report(recs, tmp_path / "rep", title="t").read_text()
    assert "it measured inf" in html
    sec, _ = _section(recs, "perplexity")
    cells = {(row, col[:2]): c for row, col, c in _cells(sec)}
    assert (cells[("pretrained", "4K")]["text"], cells[("pretrained", "4K")]["cls"]) == ("ERROR", "fail")
    assert "<strong>" not in cells[("pretrained", "4K")]["text"] and cells[("finetuned: hylora / se_attn @ 8192",
                                                                             "4K")]["bold"]
    recs = [dict(asdict(ppl_record("finetuned", "hylora", 2048, ppl, ft_ctx=8192)), run=run)
            for run, ppl in (("a", 30.0), ("b", float("inf")))]
    sec = runs.comparison_section(normalise(recs, ["a", "b"])[0])  # draws its plot: no crash either
    table = next(x for x in sec["blocks"] if x["type"] == "table")
    assert [(c["text"], c["title"]) for c in table["rows"][0][1:]] == [("30.00", ""), ("ERROR", "it measured inf")]


def test_a_cell_that_measured_nan_is_listed_in_failed_cells_too():
    """The perplexity table showed ERROR ("it measured NaN") for an ok record whose value was NaN, and its caption
    says failed cells show their status, but the Failed cells section, which lists the errors, left it out."""
    recs = synthetic_records(failure=False)
    recs[1]["values"]["perplexity"] = float("nan")  # pretrained @ 4096
    recs[6]["values"]["perplexity"] = float("inf")  # finetuned @ 8192
    sec, _ = _section(recs, "failures")
    (tbl,) = [b for b in sec["blocks"] if b["type"] == "table"]
    assert [(r[0]["text"], r[4]["text"], r[5]["text"]) for r in tbl["rows"]] == [
        ("ppl-pretrained-none-4096", "ERROR", "it measured NaN"), ("ppl-finetuned-hylora-8192", "ERROR",
                                                                   "it measured inf")]
    assert "2 of them recorded ok" in sec["blocks"][0]["text"]


def test_perplexity_over_seeds_is_mean_and_sd():
    """Fine-tunes of three seeds: mean ± sd. One pretrained model for all seeds (pretrain.seed): its value, no
    spread, since the seeds did not change it."""
    recs = []
    for seed, ppl in ((0, 30.0), (1, 32.0), (2, 34.0)):
        r = asdict(ppl_record("finetuned", "hylora", 2048, ppl, ft_ctx=8192))
        recs.append({**r, "cell": f"{r['cell']}-seed{seed}", "model": {**r["model"], "adapter": f"a{seed}"}})
        r = asdict(ppl_record("pretrained", "none", 2048, 40.0))
        recs.append({**r, "cell": f"{r['cell']}-seed{seed}"})
    sec, _ = _section(recs, "perplexity")
    cells = {row: c for row, col, c in _cells(sec) if col.startswith("2K")}
    fine = next(c for row, c in cells.items() if row.startswith("finetuned"))
    assert (fine["text"], fine["note"], fine["title"]) == ("32.00", "\u00b1 2.00", "mean \u00b1 sd of 3 seeds")
    pre = cells["pretrained"]
    assert (pre["text"], pre["note"]) == ("40.00", "") and pre["title"].startswith("one model, measured for each of 3")
    assert "one sample standard deviation" in sec["blocks"][0]["text"]


def test_the_best_mean_of_seeds_is_bold():
    """The best was taken of means summed one way (sum / n) and compared with the means shown (statistics.fmean):
    seeds at 12.3, 12.4 and 12.6 give means a last bit apart, and the best variant was not bold."""
    recs = [asdict(ppl_record("pretrained", "none", 2048, 40.0))]
    for seed, ppl in enumerate((12.3, 12.4, 12.6)):
        r = asdict(ppl_record("finetuned", "hylora", 2048, ppl, ft_ctx=8192))
        recs.append({**r, "cell": f"{r['cell']}-seed{seed}", "model": {**r["model"], "adapter": f"a{seed}"}})
    sec, _ = _section(recs, "perplexity")
    shown = [(c["text"], c["bold"]) for row, col, c in _cells(sec) if col.startswith("2K") and row != "tokens scored"]
    assert shown == [("40.00", False), ("12.43", True)]


def test_variant_labels():
    rec = [Record.from_dict(r) for r in synthetic_records(train=False, failure=False)]
    assert variant_label(variant_key(rec[0])) == "pretrained"
    assert variant_label(variant_key(rec[-1])) == "finetuned: hylora / se_attn @ 8192"


# ----------------------------------------------------------------------------- sections added with the job records

SE = "se_attn(chunk_size=256/512,block_size=16,top_k=8)"


def _section(records, sid, **kw):
    ctx = build_context(records, title="t", **kw)
    return next((s for s in ctx["sections"] if s["id"] == sid), None), ctx


def _cells(section):
    """Every table cell of a section as (row label, column, cell)."""
    out = []
    for b in section["blocks"]:
        if b["type"] == "table":
            for row in b["rows"]:
                for col, c in zip(b["columns"], row, strict=True):
                    out.append((row[0]["text"], col, c))
    return out


def parent_failure(cell_id, metric, status="oom", ctx=None, config_hash="h", ft_ctx=None):
    """What harness.runner writes when a job process dies: the cell's own fields, no env, values or dataset."""
    from harness.cells import Cell
    from harness.results import cell_record

    cell = {**Cell.parse(cell_id, ft_ctx).as_dict(), "hash": config_hash, "code": "f"}
    assert cell["metric"] == metric and cell["length"] == ctx
    return asdict(cell_record("smoke", cell, status=status, error="killed"))


def test_pivot_places_values_failures_and_gaps():
    from harness.report.common import Pivot

    recs = [ppl_record("pretrained", "none", 2048, 30.0), ppl_record("pretrained", "none", 2048, 32.0),
            ppl_record("pretrained", "none", 4096, None, status="oom"),
            ppl_record("finetuned", "lora", 4096, 20.0, ft_ctx=2048)]
    pv = Pivot(recs, lambda r: r.values.get("perplexity"))
    pre, fine = pv.rows  # pretrained first
    assert pv.columns == [2048, 4096] and pv.mean(pre, 2048) == 31.0 and pv.mean(pre, 4096) is None
    assert pv.failures(pre) == [(4096, "oom")] and pv.failures(fine) == [] and pv.measured(fine) == [4096]
    shown = [pv.cell(k, c, lambda k, c: {"text": str(pv.mean(k, c))})["text"] for k in pv.rows for c in pv.columns]
    assert shown == ["31.0", "OOM", "–", "20.0"]


def test_the_current_record_per_cell_wins():
    old = asdict(ppl_record("pretrained", "none", 2048, None, status="oom", error="first try"))
    new = asdict(ppl_record("pretrained", "none", 2048, 31.25))
    sec, ctx = _section([old, new], "perplexity")
    texts = [c["text"] for _, _, c in _cells(sec)]
    assert "31.25" in texts and "OOM" not in texts
    assert "1 older record(s) of rerun cells superseded" in dict(ctx["header"]["facts"])["records"]
    assert not any(s["id"] == "failures" for s in ctx["sections"])
    # the other order: the rerun failed, so the cell is a failure now
    sec, ctx = _section([new, old], "perplexity")
    assert "OOM" in [c["text"] for _, _, c in _cells(sec)] and any(s["id"] == "failures" for s in ctx["sections"])
    # rerun with changed settings (another config hash): the new record replaces the old, never averaged with it
    other = dict(new, config_hash="other", values=dict(new["values"], perplexity=33.25))
    sec, ctx = _section([new, other], "perplexity")
    assert "33.25" in [c["text"] for _, _, c in _cells(sec)] and "32.25" not in [c["text"] for _, _, c in _cells(sec)]
    assert "1 older record(s) of rerun cells superseded" in dict(ctx["header"]["facts"])["records"]


def test_eval_attention_finetune_is_its_own_variant():
    full = asdict(ppl_record("finetuned", "lora", 2048, 30.0, ft_ctx=2048))
    ft = dict(full, cell="eval-finetune/" + full["cell"], config_hash="ft",
              settings={**full["settings"], "eval_attention": "finetune"},
              values={**full["values"], "perplexity": 35.0})
    pre = dict(asdict(ppl_record("pretrained", "none", 2048, 40.0)),
               settings={**full["settings"], "eval_attention": "finetune"})  # pretrained: always full attention
    sec, _ = _section([pre, full, ft], "perplexity")
    rows = {label: c["text"] for label, col, c in _cells(sec) if col.startswith("2K")}
    assert rows == {"pretrained": "40.00", "finetuned: lora / se_attn @ 2048": "30.00",
                    "finetuned: lora / se_attn @ 2048, eval: finetune attention": "35.00",
                    "tokens scored": "20,480"}
    notes = [b["text"] for b in sec["blocks"] if b["type"] == "paragraph" and b["text"].startswith("Note:")]
    assert len(notes) == 1 and "not strictly causal" in notes[0]
    causal = dict(ft, backend="se_attn(selection=previous)")
    sec, _ = _section([pre, full, causal], "perplexity")
    assert not any(b.get("text", "").startswith("Note:") for b in sec["blocks"])


def ruler_record(stage, method, task, n, acc, run=None, backend=SE, deviation=None, per_sample=None, seed=0):
    d = asdict(Record(
        suite="smoke", cell=f"tiny/seed{seed}/{'pretrained' if stage == 'pretrained' else method + '/' + backend}"
                            f"/ruler/{task}@{n}", variant={"model": "tiny", "seed": seed},
        metric="ruler", stage=stage, model={"preset": "tiny-hybrid"}, method=method,
        backend="full" if stage == "pretrained" else backend, finetune_context=None if stage == "pretrained" else 2048,
        eval_context=n, values={"accuracy": acc, "samples": 20, "per_sample": per_sample or {},
                                "haystack_deviation": deviation},
        settings={"task": task, "eval_attention": "full", "samples_file": "samples/x.jsonl"}, env=ENV,
        config_hash=f"{stage}{method}{task}{n}"))
    if run:
        d["run"] = run
    return d


def _ruler_records():
    from harness.data.ruler.tasks import PAPER_TASKS

    recs = []
    for i, task in enumerate(PAPER_TASKS):
        for n in (1024, 2048):
            base = 5.0 if task == "vt" else 60.0 - i  # vt: at chance (<= 5%) at both lengths
            recs.append(ruler_record("pretrained", "none", task, n, base,
                                     deviation="book text instead of Paul Graham essays" if i == 1 else None))
            recs.append(ruler_record("finetuned", "lora", task, n, 40.0 + i))
            recs.append(ruler_record("finetuned", "hylora", task, n, 50.0 + i - (20 if task == "vt" else 0)))
    return recs


def test_ruler_groups_heatmaps_and_chance_gate():
    from harness.report.ruler import CHANCE_PCT, UNINFORMATIVE

    sec, _ = _section(_ruler_records(), "ruler")
    assert CHANCE_PCT == 5.0
    figs = [b for b in sec["blocks"] if b["type"] == "figures"]
    assert len(figs) == 1 and len(figs[0]["items"]) == 3  # one heatmap per variant
    assert [i["caption"] for i in figs[0]["items"]] == [
        "pretrained", f"finetuned: hylora / {SE} @ 2048", f"finetuned: lora / {SE} @ 2048"]
    notes = [n for b in sec["blocks"] if b["type"] == "callouts" for n in b["items"]]
    assert any("Essay haystack replaced by book text (book text instead of Paul Graham essays) in 2 cell(s)" in n
               for n in notes)
    assert any(b["type"] == "paragraph" and "Base model at chance (≤5%) on: vt at 1K, 2K." in b["text"]
               for b in sec["blocks"])
    tables = [b for b in sec["blocks"] if b["type"] == "table"]
    groups, per_task = tables[0], tables[1:]
    assert len(per_task) == 2 and per_task[0]["caption"].startswith("RULER accuracy (%) at 1K (1024)")
    # per task at 1K: vt is uninformative for both fine-tuned variants, nothing bold; other rows: hylora bold
    vt = next(r for r in per_task[0]["rows"] if r[0]["text"] == "vt")
    assert [c["text"] for c in vt] == ["vt", "5.0", "38.0", "48.0"]
    assert [c["note"] for c in vt[2:]] == [UNINFORMATIVE] * 2 and not any(c["bold"] for c in vt)
    assert vt[1]["note"] == ""  # the base itself is not marked
    s1 = next(r for r in per_task[0]["rows"] if r[0]["text"] == "niah_single_1")
    assert [(c["text"], c["bold"], c["note"]) for c in s1[1:]] == [("60.0", False, ""), ("50.0", True, ""),
                                                                  ("40.0", False, "")]
    # groups (harness.metrics.ruler.group_scores): NIAH-S of hylora = mean(50, 51, 52); VT uninformative;
    # average of lora = mean(40..50) = 45
    by = {(r[0]["text"] or None, r[1]["text"]): r for r in groups["rows"]}
    assert groups["columns"] == ["group", "variant", "1K (1024)", "2K (2048)"]
    rows = groups["rows"]
    names = [r[1]["text"] for r in rows]
    assert names.count("pretrained") == 6  # NIAH-S, NIAH-M, NIAH-M-QV, VT, CF-WE, average
    assert by[("NIAH-S", "pretrained")][2]["text"] == "59.0"
    hy_niahs = rows[1]
    assert hy_niahs[1]["text"].startswith("finetuned: hylora") and hy_niahs[2]["text"] == "51.0" and hy_niahs[2]["bold"]
    vt_rows = [r for r in rows if rows.index(r) // 3 == 3]
    assert vt_rows[0][0]["text"] == "VT"
    assert all(c["note"] == UNINFORMATIVE and not c["bold"] for r in vt_rows[1:] for c in r[2:])
    avg_lora = rows[-1]
    assert avg_lora[1]["text"].startswith("finetuned: lora") and avg_lora[2]["text"] == "45.0"


def test_a_ruler_group_with_a_failed_task_shows_the_failure_not_a_dash():
    """A task of a group that failed (OOM) left the group's cell, and the average's, as "–", what a task never
    measured shows: the paper-groups table hid the failure that the heatmap and the per-task table show."""
    recs = _ruler_records()
    i = next(i for i, r in enumerate(recs) if r["method"] == "lora" and r["settings"]["task"] == "niah_single_2"
             and r["eval_context"] == 2048)
    recs[i] = {**recs[i], "status": "oom", "values": {}, "error": "CUDA out of memory"}
    sec, _ = _section(recs, "ruler")
    groups = next(b for b in sec["blocks"] if b["type"] == "table")
    lora = [r for r in groups["rows"] if r[1]["text"].startswith("finetuned: lora")]
    niah_s, average = lora[0], lora[-1]
    for row in (niah_s, average):
        assert (row[3]["text"], row[3]["cls"]) == ("OOM", "fail")
        assert "niah_single_2" in row[3]["title"] and "CUDA out of memory" in row[3]["title"]
    assert niah_s[2]["text"] == "41.0" and lora[1][3]["text"] == "44.0"  # 1K, and NIAH-M at 2K: measured


def test_ruler_of_several_runs_gates_and_bolds_each_run_against_its_own_base():
    """Run b's pretrained model is at chance on vt, run a's is not: only b's fine-tunes there are uninformative; the
    best fine-tune is bolded per run (a's hylora, b's lora), never across runs."""
    from harness.report.ruler import UNINFORMATIVE

    recs = []
    for run, vt_base, lora, hy in (("a", 60.0, 40.0, 50.0), ("b", 0.0, 70.0, 30.0)):
        for task, base in (("niah_single_1", 60.0), ("vt", vt_base)):
            recs += [ruler_record("pretrained", "none", task, 1024, base, run=run),
                     ruler_record("finetuned", "lora", task, 1024, lora, run=run),
                     ruler_record("finetuned", "hylora", task, 1024, hy, run=run)]
    sec, _ = _section(recs, "ruler", runs=["a", "b"])
    assert any(b["type"] == "paragraph" and "Base model at chance (≤5%) on: vt at 1K." in b["text"]
               for b in sec["blocks"])  # in one run is enough to be named
    cells = {(row, col.split(" /")[0]): c for row, col, c in _cells(sec) if row in ("vt", "niah_single_1")}
    for task in ("vt", "niah_single_1"):
        gated = task == "vt"
        assert [(c["bold"], c["note"]) for c in (cells[(task, "[a] finetuned: hylora")],
                                               cells[(task, "[a] finetuned: lora")])] == [(True, ""), (False, "")]
        assert [(c["bold"], c["note"] == UNINFORMATIVE) for c in (cells[(task, "[b] finetuned: hylora")],
                                                                cells[(task, "[b] finetuned: lora")])] == [
            (False, gated), (not gated, gated)], task


def test_ruler_group_is_uninformative_only_where_all_its_tasks_are_and_gated_cells_are_hatched(monkeypatch):
    from harness.report import plots
    from harness.report.ruler import UNINFORMATIVE

    hatched = []
    draw = plots.accuracy_heatmap
    monkeypatch.setattr(plots, "accuracy_heatmap", lambda *a, **kw: hatched.append(kw["hatched"]) or draw(*a, **kw))
    recs = []
    for task in ("niah_single_1", "niah_single_2", "niah_single_3"):
        base = 0.0 if task == "niah_single_1" else 60.0  # at chance on one of NIAH-S's three tasks only
        recs += [ruler_record("pretrained", "none", task, 1024, base),
                 ruler_record("finetuned", "lora", task, 1024, 40.0),
                 ruler_record("finetuned", "hylora", task, 1024, 50.0)]
    sec, _ = _section(recs, "ruler")
    assert hatched == [[[False]] * 3, [[True], [False], [False]], [[True], [False], [False]]]  # pretrained first
    cells = {(row, col.split(" /")[0]): c for row, col, c in _cells(sec)}
    gated = cells[("niah_single_1", "finetuned: hylora")]
    assert gated["note"] == UNINFORMATIVE and "uninf" in gated["cls"] and not gated["bold"]
    groups = next(b for b in sec["blocks"] if b["type"] == "table")
    niah_s = {r[1]["text"].split(" /")[0]: r[2] for r in groups["rows"]}
    assert niah_s["finetuned: hylora"]["text"] == "50.0" and niah_s["finetuned: hylora"]["bold"]
    assert niah_s["finetuned: hylora"]["note"] == niah_s["finetuned: lora"]["note"] == ""
    assert "uninf" not in niah_s["finetuned: lora"]["cls"]


def test_ruler_intervals_pool_seeds_and_marks_need_mcnemar():
    def outcomes(seed, right):  # 20 samples of niah_single_1 at 1K for `seed`, the first `right` correct
        return {f"s{seed}-{i}": float(i < right) for i in range(20)}

    recs = []
    for seed in (0, 1):
        recs.append(ruler_record("pretrained", "none", "niah_single_1", 1024, 30.0, seed=seed,
                                 per_sample=outcomes(seed, 6)))
        recs.append(ruler_record("finetuned", "hylora", "niah_single_1", 1024, 80.0, seed=seed,
                                 per_sample=outcomes(seed, 16)))
        recs.append(ruler_record("finetuned", "lora", "niah_single_1", 1024, 40.0, seed=seed,
                                 per_sample=outcomes(seed, 8)))
    sec, _ = _section(recs, "ruler")
    assert "2 seeds: 0, 1" in sec["blocks"][0]["text"]
    per_task = [b for b in sec["blocks"] if b["type"] == "table"][-1]
    row = next(r for r in per_task["rows"] if r[0]["text"] == "niah_single_1")
    pre, hy, lo = row[1:]
    lo95, hi95 = (100 * x for x in wilson(12, 40))  # 6 of 20 right at each seed, pooled
    assert pre["note"] == f"[{lo95:.0f}\u2013{hi95:.0f}]"
    assert hy["note"].endswith("\u25b2")  # 20 won, 0 lost over the 40 shared samples
    assert "McNemar p=1.9e-06 over 40 samples" in hy["title"]
    assert not lo["note"].endswith(("\u25b2", "\u25bc"))  # 4 won, 0 lost: p = 0.125


def test_ruler_intervals_pool_seeds_even_where_two_seeds_drew_the_same_prompts():
    same = {f"p{i}": float(i < 6) for i in range(20)}  # a task whose prompts do not depend on the seed
    recs = [ruler_record("pretrained", "none", "niah_single_1", 1024, 30.0, seed=seed, per_sample=same)
            for seed in (0, 1)]
    sec, _ = _section(recs, "ruler")
    row = next(r for r in [b for b in sec["blocks"] if b["type"] == "table"][-1]["rows"]
               if r[0]["text"] == "niah_single_1")
    lo95, hi95 = (100 * x for x in wilson(12, 40))  # 40 samples, not the 20 of one seed
    assert row[1]["note"] == f"[{lo95:.0f}\u2013{hi95:.0f}]"


def test_ruler_mcnemar_marks_test_each_cells_own_samples():
    """A task cell's mark tests that task at that length; a group's pools the samples of all its tasks there."""
    recs = []
    for task in ("niah_single_1", "niah_single_2", "niah_single_3"):
        for n in (1024, 2048):
            right = 16 if n == 1024 and task != "niah_single_1" else 6  # hylora gains at 1K on tasks 2 and 3 only
            for stage, method, k in (("pretrained", "none", 6), ("finetuned", "hylora", right)):
                recs.append(ruler_record(stage, method, task, n, 5.0 * k,
                                         per_sample={f"{task}-{n}-{i}": float(i < k) for i in range(20)}))
    sec, _ = _section(recs, "ruler")
    groups, at_1k, at_2k = [b for b in sec["blocks"] if b["type"] == "table"]
    marked = {(t["caption"][:30], r[0]["text"]): r[2]["note"].endswith("\u25b2") for t in (at_1k, at_2k)
              for r in t["rows"]}
    assert [v for _, v in sorted(marked.items())] == [False, True, True, False, False, False]
    assert groups["rows"][1][1]["text"].startswith("finetuned: hylora")
    assert [c["note"].endswith("\u25b2") for c in groups["rows"][1][2:]] == [True, False]  # NIAH-S at 1K, 2K


def test_ruler_without_base_says_the_gate_cannot_apply(tmp_path):
    recs = [r for r in _ruler_records() if r["stage"] != "pretrained"]
    sec, _ = _section(recs, "ruler")
    notes = [n for b in sec["blocks"] if b["type"] == "callouts" for n in b["items"]]
    assert any("chance gate cannot be applied" in n for n in notes)
    assert not any(c["note"] for _, _, c in _cells(sec))


def test_ruler_says_that_decoding_attends_fully_where_the_fine_tuning_attention_was_evaluated():
    """Under eval_attention finetune only the prefill runs the backend: generate()'s later steps decode on the cache
    with full attention (on niah_single_1 at 1K with a 512-token window, 48% against 42% decoded through the window
    without a cache, 16 of 40 predictions different), so the report says so."""
    def own(backend):
        r = ruler_record("finetuned", "hylora", "niah_single_1", 1024, 50.0, backend=backend)
        r["settings"]["eval_attention"] = "finetune"
        return r

    recs = [ruler_record("pretrained", "none", "niah_single_1", 1024, 60.0),
            ruler_record("finetuned", "hylora", "niah_single_1", 1024, 55.0, backend="se_attn(chunk_size=256)")]
    sec, _ = _section(recs + [own("se_attn(chunk_size=256)"), own("sliding_window(window=512)")], "ruler")
    (note,) = [n for b in sec["blocks"] if b["type"] == "callouts" for n in b["items"]]
    # the sliding window decodes with its window (harness.attention.backend): not named
    assert note.startswith("Evaluated with the fine-tuning attention (se_attn): the prompt is read with it")
    sec, _ = _section(recs, "ruler")  # full-attention evaluation alone: nothing to say
    assert not [n for b in sec["blocks"] if b["type"] == "callouts" for n in b["items"]]


def test_ruler_says_which_variants_have_no_base_to_gate_by():
    """A run without pretrained RULER records beside one with them: its variants went ungated, unsaid."""
    recs = [ruler_record("pretrained", "none", "niah_single_1", 1024, 0.0, run="a"),
            ruler_record("finetuned", "hylora", "niah_single_1", 1024, 50.0, run="a"),
            ruler_record("finetuned", "hylora", "niah_single_1", 1024, 60.0, run="b")]
    sec, _ = _section(recs, "ruler")
    (note,) = [n for b in sec["blocks"] if b["type"] == "callouts" for n in b["items"]]
    assert note.startswith("No RULER records of the pretrained model for [b] finetuned: hylora")
    assert note.endswith("shown without it there.") and "[a]" not in note


def test_training_section_pretrain_and_finetune():
    # the pretrain record of a job that found the model cached: 0.2 s to load it, 2 s to train it
    pre = asdict(Record(suite="s", cell="tiny-hybrid/seed0/pretrain", metric="pretrain", stage="pretrained",
                        model={"preset": "tiny-hybrid"}, kernel="full via sdpa", env=ENV, seconds=0.2,
                        values={"loss_curve": [[1, 9.0], [2, 7.5], [3, 6.25]], "tokens": 3072, "seconds": 2.0,
                                "peak_memory_gib": 11.0 / 1024, "memory_kind": "process peak RSS",
                                "tokens_per_s": 1536.0}))
    train = asdict(Record(suite="s", cell=f"tiny-hybrid/seed0/hylora/{SE}/train", metric="train", stage="finetuned",
                          model={"preset": "tiny-hybrid", "trained_on": "cuda: NVIDIA H100 80GB HBM3"},
                          method="hylora", backend=SE, finetune_context=2048,
                          kernel="se_attn via sdpa", env=ENV, seconds=12.0,
                          values={"loss_curve": [[s, 5.0 - s / 100] for s in range(1, 51)], "tokens": 102400,
                                  "seconds": 12.0, "warmup_tokens": 2048, "warmup_seconds": 1.0,
                                  "peak_memory_gib": 2.25, "memory_kind": "cuda allocator peak",
                                  "tokens_per_s": 8533.3, "trainable_params": 250_000, "total_params": 1_000_000,
                                  "trainable_by_group": {"lora": 200_000, "conv1d": 50_000, "norms": 0}}))
    # the same fine-tune rerun with another recipe (another config hash) supersedes the first: one row, not two
    older = dict(train, config_hash="older recipe", values={**train["values"], "tokens_per_s": 1.0})
    sec, _ = _section([pre, older, train], "training")
    assert sec["title"] == "Pretraining and fine-tuning"
    assert [b["alt"] for b in sec["blocks"] if b["type"] == "figure"] == ["pretraining loss curves",
                                                                        "fine-tuning loss curves"]
    tbl = next(b for b in sec["blocks"] if b["type"] == "table")
    p, t = tbl["rows"]
    # peak memory to 3 significant digits: 11 MiB was "0.01"
    assert [c["text"] for c in p[:6]] == ["pretraining: tiny-hybrid", "3", "6.250", "3.07K", "1,536", "0.0107"]
    assert p[5]["note"] == "process peak RSS" and p[6]["text"] == "all" and p[8]["text"] == "2"  # its training's
    assert [c["text"] for c in t] == [f"finetuned: hylora / {SE} @ 2048", "50", "4.500", "102K", "8,533", "2.25",
                                      "250K", "se_attn via sdpa", "12"]
    assert t[5]["note"] == "cuda allocator peak" and t[6]["note"] == "25.00% of 1M"
    assert t[4]["note"] == "cuda: NVIDIA H100 80GB HBM3"
    assert p[4]["note"] == "whole run"  # a record from before trained_on and the warm-up split were kept
    assert t[6]["title"] == "lora 200K, conv1d 50K"
    # a throughput measured as NaN says so; "–" is for nothing recorded
    nan = dict(train, values={**train["values"], "tokens_per_s": float("nan")})
    (t,) = next(b for b in _section([nan], "training")[0]["blocks"] if b["type"] == "table")["rows"]
    assert t[4]["text"] == "NaN"


def test_loss_curves_of_runs_with_recall_rows_say_the_loss_is_the_weighted_objective():
    """With recall rows mixed in, answer tokens weigh answer_weight times: the curve is not text's NLL per token."""
    def rec(metric, settings):
        return asdict(Record(suite="s", cell=f"tiny-hybrid/seed0/{metric}", metric=metric,
                             stage="pretrained" if metric == "pretrain" else "finetuned",
                             model={"preset": "tiny-hybrid"}, method="none" if metric == "pretrain" else "lora",
                             backend="full", finetune_context=None if metric == "pretrain" else 2048, env=ENV,
                             settings=settings, values={"loss_curve": [[1, 5.0], [2, 4.0]], "seconds": 1.0}))

    pre = rec("pretrain", {"recall": {"0": 0.5, "1000": 0.0}, "answer_weight": 5.0})
    sec, _ = _section([pre, rec("train", {"recall": 0.0, "answer_weight": 5.0})], "training")
    pre_fig, ft_fig = [b["caption"] for b in sec["blocks"] if b["type"] == "figure"]
    assert pre_fig.endswith("their answer tokens weigh 5x as much as other tokens.") and "recall" not in ft_fig
    sec, _ = _section([rec("train", {"recall": 0.25, "answer_weight": 3.0})], "training")
    assert "weigh 3x as much" in next(b for b in sec["blocks"] if b["type"] == "figure")["caption"]


def test_training_rows_of_several_seeds_name_them_and_the_plot_takes_their_mean(monkeypatch):
    """A model named like a seed ("seed-oss") was read as the seed; the plot's line is the mean over the seeds that
    trained, saying how many of those that ran."""
    from harness.report import training

    drawn = []
    monkeypatch.setattr(training.plots, "loss_curves", lambda curves, **k: drawn.extend(curves) or "")
    recs = [asdict(Record(suite="s", cell=f"seed-oss/seed{seed}/lora/full/train", metric="train",
                          stage="finetuned", model={"preset": "seed-oss"}, method="lora", backend="full",
                          finetune_context=2048, env=ENV, status="ok" if seed < 2 else "error",
                          values={"loss_curve": [[1, 4.0 + seed], [2, 3.0 + seed]], "seconds": 5.0} if seed < 2
                          else {})) for seed in (0, 1, 2)]
    sec, _ = _section(recs, "training")
    rows = next(b for b in sec["blocks"] if b["type"] == "table")["rows"]
    assert [r[0]["text"] for r in rows] == [f"finetuned: lora / full @ 2048 · seed{i}" for i in (0, 1)]
    assert next(b for b in sec["blocks"] if b["type"] == "figure")["caption"].endswith("(the mean over its seeds).")
    assert drawn == [("finetuned: lora / full @ 2048 (2 of 3 seeds)", [(1, 4.5), (2, 3.5)])]
    assert training._mean_curve([[[1, 4.0], [2, 3.0]], [[1, 5.0], [2, 4.0], [3, 1.0]]]) == [(1, 4.5), (2, 3.5)]


def test_seeds_that_share_a_pretrained_model_show_one_pretraining():
    """With pretrain.seed every seed's job records the one model it fine-tunes from: three identical rows read as
    three pretrainings. Seeds with their own models keep a row each."""
    def pre(seed, key):
        return asdict(Record(suite="s", cell=f"m/seed{seed}/pretrain", metric="pretrain", stage="pretrained",
                             variant={"model": "m", "seed": seed}, model={"preset": "m", "hash": key}, env=ENV,
                             values={"loss_curve": [[1, 9.0]], "tokens": 10, "seconds": 1.0}))

    for keys, names in ((["k", "k", "k"], ["pretraining: m (one model for 3 seeds)"]),
                        (["a", "b"], ["pretraining: m (seed0)", "pretraining: m (seed1)"])):
        sec, _ = _section([pre(seed, k) for seed, k in enumerate(keys)], "training")
        assert [r[0]["text"] for r in next(b for b in sec["blocks"] if b["type"] == "table")["rows"]] == names
    # two runs of one seed each: no seed in their names (each read "(seed0)", as if a run had several)
    sec, _ = _section([dict(pre(0, k), run=run) for run, k in (("a", "ka"), ("b", "kb"))], "training", runs=["a", "b"])
    assert [r[0]["text"] for r in next(b for b in sec["blocks"] if b["type"] == "table")["rows"]] == [
        "[a] pretraining: m", "[b] pretraining: m"]


def test_a_diverged_training_shows_its_nan_loss():
    """A loss curve ending in NaN (the training loop logs it and goes on) read "–" as its final loss, as if none
    was logged."""
    from harness.report.training import _row

    r = Record(suite="s", cell="c", metric="train", values={"loss_curve": [[1, 4.0], [2, float("nan")]]})
    assert [(c["text"], c["cls"]) for c in _row("x", r)[1:3]] == [("2", ""), ("NaN", "fail")]


def test_tokens_per_s_of_a_one_step_run_is_noted_as_over_the_whole_run():
    from harness.report.training import _whole_run

    assert _whole_run({"tokens": 512, "seconds": 2.0})  # from before the warm-up split
    assert _whole_run({"tokens": 512, "seconds": 2.0, "warmup_tokens": 512, "warmup_seconds": 2.0})  # one step
    assert _whole_run({"tokens": 512, "seconds": 2.5, "warmup_tokens": 512, "warmup_seconds": 2.0})  # no token after
    assert not _whole_run({"tokens": 1024, "seconds": 3.0, "warmup_tokens": 512, "warmup_seconds": 2.0})


def eff_record(backend, n, t, status="ok", mem=None, run=None, gpu=None, ideal=None):
    env = dict(ENV, **({"device": "cuda", "gpu": gpu, "cuda": "12.4"} if gpu else {}))
    d = asdict(Record(suite="s", cell=f"attention/{backend}/efficiency@{n}", metric="efficiency", backend=backend,
                      eval_context=n, status=status, env=env, kernel=f"{backend} via sdpa",
                      values={} if status != "ok" else {"time_ms": t, "times_ms": [t, t * 1.1, t * 0.9],
                                                        "peak_memory_gib": mem, "ideal_speedup": ideal},
                      settings={"batch": 1, "heads": 4, "head_dim": 32, "repeats": 3}))
    if run:
        d["run"] = run
    return d


def test_efficiency_section_cpu_and_cuda():
    recs = [eff_record("full", 1024, 2.5), eff_record("full", 2048, 10.0),
            parent_failure("attention/full/efficiency@4096", "efficiency", ctx=4096),
            eff_record("se_attn", 1024, 2.0), eff_record("se_attn", 2048, 4.5), eff_record("se_attn", 4096, 125.25)]
    sec, _ = _section(recs, "efficiency")
    assert "Measured on cpu (x86_64, 2 threads)" in sec["blocks"][0]["text"]
    assert sum(b["type"] == "figure" for b in sec["blocks"]) == 1  # no memory plot on CPU
    tbl = next(b for b in sec["blocks"] if b["type"] == "table")
    assert tbl["columns"] == ["backend", "1K (1024)", "2K (2048)", "4K (4096)", "kernel"]
    assert [c["text"] for c in tbl["rows"][0]] == ["full", "2.50", "10.00", "OOM", "full via sdpa"]
    assert [c["text"] for c in tbl["rows"][1]] == ["se_attn", "2.00", "4.50", "125.2", "se_attn via sdpa"]
    assert sum(b["type"] == "table" for b in sec["blocks"]) == 1  # no limits recorded: no speed-up table
    cuda = [eff_record("full", 1024, 2.5, mem=1.5, gpu="NVIDIA H100"), eff_record("full", 2048, 9.0, mem=3.0,
                                                                                  gpu="NVIDIA H100")]
    sec, _ = _section(cuda, "efficiency")
    assert "NVIDIA H100 (CUDA 12.4)" in sec["blocks"][0]["text"]
    assert sum(b["type"] == "figure" for b in sec["blocks"]) == 2
    assert next(b for b in sec["blocks"] if b["type"] == "table")["rows"][0][1]["note"] == "1.5 GiB"
    # a CPU's peaks at 2K (the README's efficiency-limit run: 11.0 and 13.3 MiB) were both "0.01 GiB"
    cpu = [eff_record("full", 2048, 2.5, mem=11.0 / 1024), eff_record("sliding_window", 2048, 3.0, mem=13.3 / 1024)]
    rows = next(b for b in _section(cpu, "efficiency")[0]["blocks"] if b["type"] == "table")["rows"]
    assert [r[1]["note"] for r in rows] == ["0.0107 GiB", "0.013 GiB"]


def test_efficiency_memory_of_a_cpu_and_of_some_lengths_only(monkeypatch):
    """A CPU's peak memory (counted since the profiler's allocations) was captioned as the CUDA allocator's; a
    length without a peak (a record from before) is left out of the memory plot; the kernel column names what ran
    at every length."""
    from harness.report import plots

    drawn = []
    monkeypatch.setattr(plots, "line_vs_length", lambda series, **kw: drawn.append(series) or "")
    recs = [eff_record("full", 1024, 2.0, mem=0.5), dict(eff_record("full", 2048, 8.0), kernel="full via math")]
    sec, _ = _section(recs, "efficiency")
    assert [(s.x, s.y) for s in drawn[1]] == [([1024], [0.5])]
    caption = next(b for b in sec["blocks"] if b.get("alt") == "attention peak memory vs length")["caption"]
    assert "on a CPU, the inputs plus the most the pass held" in caption
    assert next(b for b in sec["blocks"] if b["type"] == "table")["rows"][0][-1]["text"] == (
        "full via math; full via sdpa")
    sec, _ = _section([eff_record("full", 1024, 2.0)], "efficiency")
    assert "made before the CPU's peak was counted" in sec["blocks"][2]["text"]


def test_an_efficiency_value_that_is_not_finite_does_not_stop_the_report(tmp_path):
    """An infinite peak memory (or ideal speed-up) went into the memory plot's y limit and matplotlib stopped the
    whole report (Axis limits cannot be NaN or Inf). The cell says what was measured instead."""
    recs = [eff_record("full", 1024, 10.0, mem=0.5), eff_record("full", 2048, 30.0, mem=float("inf"))]
    html = render_report(recs, tmp_path / "rep", title="t").read_text()
    assert "inf GiB" in html
    sec, _ = _section(recs, "efficiency")
    cells = {col: c for _, col, c in _cells(sec)}
    assert (cells["2K (2048)"]["text"], cells["2K (2048)"]["note"]) == ("30.00", "inf GiB")


def test_efficiency_section_sets_the_speedup_over_full_beside_its_limit():
    recs = [eff_record("full", 1024, 4.0, ideal=1.0), eff_record("full", 2048, 16.0, ideal=1.0),
            eff_record("se_attn", 1024, 2.0, ideal=4.0), eff_record("se_attn", 2048, 4.0, ideal=5.0),
            eff_record("se_attn", 4096, 9.0, ideal=6.0)]  # no full attention at 4096: no speed-up there
    sec, _ = _section(recs, "efficiency")
    limits = [b for b in sec["blocks"] if b["type"] == "table"][1]
    assert [c["text"] for c in limits["rows"][0]] == ["se_attn", "2.00x / 4.00x", "4.00x / 5.00x", "–"]
    assert [c.get("note") for c in limits["rows"][0][1:3]] == ["50% of the limit", "80% of the limit"]
    assert limits["rows"][0][3]["title"] == "no speed-up: not measured"
    assert sum(b["type"] == "figure" for b in sec["blocks"]) == 2  # time, and the fraction of the limit
    # full attention ran out of memory there: the "–" says so (it read as if nothing had been measured)
    recs.append(parent_failure("attention/full/efficiency@4096", "efficiency", ctx=4096))
    limits = [b for b in _section(recs, "efficiency")[0]["blocks"] if b["type"] == "table"][1]
    assert limits["rows"][0][3]["title"] == "no speed-up: full attention OOM at this length"
    # a spread of times past 1000 ms in plain numbers, not 1.09e+03
    (row,) = next(b for b in _section([eff_record("full", 1024, 1090.0)], "efficiency")[0]["blocks"]
                  if b["type"] == "table")["rows"]
    assert (row[1]["text"], row[1]["title"]) == ("1,090.0", "repeats 981.0–1,199.0 ms")


def test_paper_reference_numbers():
    from harness.report import paper_numbers

    sec, _ = _section(synthetic_records(), "paper")
    assert any(b["type"] == "callouts" and "not comparable: different model and scale" in b["items"][0]
               for b in sec["blocks"])
    main = next(b for b in sec["blocks"] if b["type"] == "table")
    assert [c["text"] for c in main["rows"][0]] == ["not fine-tuned", "10.72", "14.99", "19.35", "26.37", "64.9",
                                                    "5.5", "0.2"]
    assert [c["text"] for c in main["rows"][-1]] == ["SE-Attn", "10.99", "10.45", "11.14", "12.64", "71.9", "40.5",
                                                     "28.2"]
    texts = [c["text"] for _, _, c in _cells(sec)]
    for v in ("26.1", "32.5", "31.6", "33.1", "182", "69", "81", "71"):
        assert v in texts, v
    assert paper_numbers.RUNTIME_MS == {"full": 182.0, "sliding_window": 69.0, "s2_attn": 81.0, "se_attn": 71.0}
    # the paper's model: our numbers beside the paper's
    r = asdict(ppl_record("finetuned", "hylora", 8192, 10.5, ft_ctx=8192))
    r["model"], r["backend"] = {"preset": "mamba2attn-2.7b"}, SE
    eff = eff_record(SE, 32768, 70.0, gpu="NVIDIA H100 80GB")
    sec, _ = _section([r, eff], "paper")
    main = next(b for b in sec["blocks"] if b["type"] == "table")
    assert main["columns"][1:3] == ["PPL 2K paper", "PPL 2K ours"]
    se = main["rows"][-1]
    assert [c["text"] for c in se[3:5]] == ["10.45", "10.50"]  # PPL 8K: paper, ours
    rt = [b for b in sec["blocks"] if b["type"] == "table"][-1]["rows"][-1]
    assert rt[2]["text"] == "–" and "not an A100" in rt[2]["note"]
    # on an A100: beside Figure 4's time only at Figure 4's settings
    figure4 = {"chunk_size": [2048, 4096], "block_size": 32, "top_k": 8}
    other = "not comparable: other settings than Figure 4's (chunk_size 2048/4096, block_size 32, top_k 8)"
    for options, shown, note in (({**figure4, "chunk_size": [2048]}, "–", other), (figure4, "70", ""),
                                 ({**figure4, "selection": "previous"}, "–", other)):
        a100 = eff_record(SE, 32768, 70.0, gpu="NVIDIA A100-SXM4-80GB")
        a100["settings"]["backend_options"] = options
        sec, _ = _section([r, a100], "paper")
        rt = [b for b in sec["blocks"] if b["type"] == "table"][-1]["rows"][-1]
        assert (rt[2]["text"], rt[2]["note"]) == (shown, note), rt[2]
    table7 = [b for b in sec["blocks"] if b["type"] == "table"][1]
    assert [c["text"] for c in table7["rows"][-1]] == ["SE-Attn", "10.73", "10.22", "10.84", "12.28"]
    # fine-tuned on PG-19 (suites/paper.yaml): our perplexities beside Table 7's PG-19 fine-tunes, not Table 1's
    r["model"]["finetune_data"] = "PG-19 train split from /pg19: 28602 books"
    sec, _ = _section([r], "paper")
    main, table7 = [b for b in sec["blocks"] if b["type"] == "table"][:2]
    assert main["columns"][1:3] == ["PPL 2K paper", "PPL 8K paper"] and "RULER 2K ours" in main["columns"]
    assert table7["columns"][1:3] == ["PPL 2K paper", "PPL 2K ours"]
    assert [c["text"] for c in table7["rows"][-1][3:5]] == ["10.22", "10.50"]  # PPL 8K: paper, ours
    # a diverged seed (NaN) leaves the others' mean, as the perplexity table counts it
    for diverged in (float("nan"), float("inf")):  # inf too: it read "inf", where the perplexity table fails it
        nan = dict(r, cell=r["cell"] + "-seed1", values={**r["values"], "perplexity": diverged})
        table7 = [b for b in _section([r, nan], "paper")[0]["blocks"] if b["type"] == "table"][1]
        assert table7["rows"][-1][4]["text"] == "10.50"


def test_paper_ablation_rows_find_variants_by_their_resolved_backend():
    from harness.data.ruler import PAPER_TASKS
    from harness.report.paper import Ours
    from harness.results import Record

    def rec(backend, accuracy, task):
        return Record(suite="p", cell=f"mamba2attn-2.7b/seed0/hylora/{backend}/ruler/{task}@8192", metric="ruler",
                      variant={"model": "mamba2attn-2.7b", "seed": 0}, stage="finetuned",
                      model={"name": "mamba2attn-2.7b"}, method="hylora", backend=backend, finetune_context=8192,
                      eval_context=8192, values={"accuracy": accuracy}, settings={"task": task})

    ours = Ours([rec(b, a, t) for b, a in (("se_attn(chunk_size=2048)", 40.0), ("se_attn(retrieval=none)", 0.0),
                                           ("se_attn_random", 30.0)) for t in PAPER_TASKS])
    assert [ours.ruler_average("hylora", b, 8192) for b in ("se_attn", "se_attn_nomem", "se_attn_random")] == [
        40.0, 0.0, 30.0]


def test_paper_ours_averages_each_tasks_seeds_and_leaves_out_previous_chunk_selection():
    from harness.data.ruler import PAPER_TASKS
    from harness.report.paper import Ours
    from harness.results import Record

    def rec(backend, accuracy, task, seed):
        return Record(suite="p", cell=f"mamba2attn-2.7b/seed{seed}/hylora/{backend}/ruler/{task}@8192", metric="ruler",
                      variant={"model": "mamba2attn-2.7b", "seed": seed}, stage="finetuned",
                      model={"name": "mamba2attn-2.7b"}, method="hylora", backend=backend, finetune_context=8192,
                      eval_context=8192, values={"accuracy": accuracy}, settings={"task": task})

    recs = [rec(b, a, t, seed) for b, a, seed in (("se_attn", 40.0, 0), ("se_attn", 20.0, 1),
                                                  ("se_attn(selection=previous)", 90.0, 0)) for t in PAPER_TASKS]
    assert Ours(recs).ruler_average("hylora", "se_attn", 8192) == 30.0
    # a seed that measured NaN is a failed seed, as in the RULER tables: the others' mean (it gave NaN)
    recs += [rec("se_attn", float("nan"), t, 2) for t in PAPER_TASKS]
    assert Ours(recs).ruler_average("hylora", "se_attn", 8192) == 30.0


def test_paper_table_rows_fit_their_columns_and_runtime_is_from_one_kind_of_device():
    r = asdict(ppl_record("finetuned", "hylora", 8192, 10.5, ft_ctx=8192))
    r["model"], r["backend"] = {"preset": "mamba2attn-2.7b", "finetune_data": "PG-19 train split"}, SE
    effs = [dict(eff_record(SE, 32768, 70.0, gpu=gpu), cell=f"{gpu}/efficiency@32768")  # two cells, both kept
            for gpu in ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB")]
    for e in effs:
        e["settings"]["backend_options"] = {"chunk_size": [2048, 4096], "block_size": 32, "top_k": 8}
    sec, _ = _section([r, *effs], "paper")
    tables = [b for b in sec["blocks"] if b["type"] == "table"]
    assert all(len(row) == len(t["columns"]) for t in tables for row in t["rows"])
    main_se = dict(zip(tables[0]["columns"], [c["text"] for c in tables[0]["rows"][-1]], strict=True))
    assert main_se["PPL 8K paper"] == "10.45" and main_se["RULER 8K paper"] == "40.5"
    assert (tables[-1]["rows"][-1][2]["text"], tables[-1]["rows"][-1][2]["note"]) == (
        "–", "not comparable: measured on NVIDIA A100-SXM4-80GB, NVIDIA H100 80GB, not an A100")


def test_comparison_of_runs_shows_a_relative_change_to_the_tolerance_s_precision():
    """Changes of +0.46% (within harness compare's 0.5% tolerance, not coloured) and +0.54% (beyond it, coloured
    worse) both read "(+0.5%)": the same number, one marked a regression and one not."""
    from harness.report import runs
    from harness.report.common import normalise

    shown = []
    for head in (30.138, 30.162):
        recs = [dict(asdict(ppl_record("finetuned", "hylora", 2048, ppl, ft_ctx=8192)), run=run)
                for run, ppl in (("a", 30.0), ("b", head))]
        table = next(x for x in runs.comparison_section(normalise(recs, ["a", "b"])[0])["blocks"]
                     if x["type"] == "table")
        shown.append((table["rows"][0][2]["note"], table["rows"][0][2]["cls"]))
    assert shown == [("+0.14 (+0.46%)", ""), ("+0.16 (+0.54%)", "worse")]


def test_comparison_of_runs_does_not_judge_cells_whose_settings_differ():
    """harness compare skips such cells; the report coloured their change a regression all the same."""
    from harness.report import runs
    from harness.report.common import normalise

    recs = [dict(asdict(ppl_record("finetuned", "hylora", 2048, ppl, ft_ctx=8192)), run=run, config_hash=run)
            for run, ppl in (("a", 30.0), ("b", 33.0))]
    table = next(x for x in runs.comparison_section(normalise(recs, ["a", "b"])[0])["blocks"] if x["type"] == "table")
    shown = table["rows"][0][2]
    assert (shown["text"], shown["cls"]) == ("33.00", "")
    assert shown["note"] == "+3.00 (+10.00%); not judged: settings differ (config hash)"


def test_comparison_of_runs_and_single_run_unchanged():
    a = [dict(r, run="base") for r in synthetic_records(failure=False)]
    b = [dict(r, run="head", values={**r["values"], "perplexity": r["values"]["perplexity"] * 1.1})
         if r["metric"] == "perplexity" else dict(r, run="head") for r in synthetic_records(failure=False)]
    sec, ctx = _section(a + b, "comparison", runs=["base", "head"])
    assert ("runs", "base (base) · head") in ctx["header"]["facts"]
    tbl = next(x for x in sec["blocks"] if x["type"] == "table")
    assert tbl["columns"] == ["cell", "base (base)", "head"]
    row = next(r for r in tbl["rows"] if r[0]["text"] == "ppl-pretrained-none-2048")
    assert row[1]["text"] == "31.25" and row[2]["text"] == "34.38" and row[2]["note"] == "+3.12 (+10.00%)"
    assert row[2]["cls"] == "worse"
    ppl = next(s for s in ctx["sections"] if s["id"] == "perplexity")
    labels = [r[0]["text"] for r in next(x for x in ppl["blocks"] if x["type"] == "table")["rows"]]
    assert "[base] pretrained" in labels and "[head] pretrained" in labels  # runs are never merged
    # runs given in another order: head is the base
    from harness.report.common import normalise
    from harness.report.runs import comparison_section

    sec = comparison_section(normalise(a + b, ["head", "base"])[0])
    assert next(x for x in sec["blocks"] if x["type"] == "table")["columns"] == ["cell", "head (base)", "base"]
    # one run, tagged or not: the same report, no comparison section
    single = build_context(a, title="t")
    plain = build_context(synthetic_records(failure=False), title="t")
    assert [s["id"] for s in single["sections"]] == [s["id"] for s in plain["sections"]]
    assert "comparison" not in [s["id"] for s in single["sections"]]
    assert single["sections"] == plain["sections"]


def test_comparison_plot_tells_apart_more_variants_than_colours(monkeypatch):
    """Past ten variants the colours cycled and nothing else told the variants of one run apart."""
    from harness.report import runs
    from harness.report.common import normalise

    drawn = []
    monkeypatch.setattr(runs.plots, "perplexity_vs_context", lambda series, *a, **k: drawn.extend(series) or "")
    recs = [dict(asdict(ppl_record("finetuned", f"m{i}", 2048, 30.0 + i, ft_ctx=4096)), cell=f"ppl-{i}", run=run)
            for i in range(12) for run in ("a", "b")]
    runs.comparison_section(normalise(recs, ["a", "b"])[0])
    looks = [(s.color, s.marker, s.linestyle) for s in drawn]
    assert len(drawn) == 24 and len(set(looks)) == 24 and len({lk[:2] for lk in looks}) == 12


def test_comparison_names_each_runs_line_style_as_drawn(monkeypatch):
    """A run with no records (an empty results directory) shifted the names: the text said "c: dashed" over c's
    dotted lines (a run's line style is that of its position among the runs given)."""
    from harness.report import runs
    from harness.report.common import normalise

    drawn = []
    monkeypatch.setattr(runs.plots, "perplexity_vs_context", lambda series, *a, **k: drawn.extend(series) or "")
    recs = [dict(asdict(ppl_record("pretrained", "none", 2048, 30.0)), run=run) for run in ("a", "c")]
    sec = runs.comparison_section(normalise(recs, ["a", "b", "c"])[0])
    assert sec["blocks"][0]["text"].endswith("(a: solid, c: dotted).")
    assert [s.linestyle for s in drawn] == ["-", ":"]


def test_comparison_of_runs_counts_a_nan_as_failed_and_says_what_a_ruler_ring_means(monkeypatch):
    """A NaN perplexity was a failed point in the plot but "+nan (+nan%), worse" in the table; a RULER point that
    misses a task was captioned as missing seeds."""
    from harness.report import runs
    from harness.report.common import normalise

    for a, b, cells in ((30.0, float("nan"), [("30.00", "", ""), ("ERROR", "fail", "it measured NaN")]),
                        (float("nan"), 30.0, [("ERROR", "fail", "it measured NaN"), ("30.00", "", "")])):
        recs = [dict(asdict(ppl_record("finetuned", "hylora", 2048, ppl, ft_ctx=8192)), run=run)
                for run, ppl in (("a", a), ("b", b))]
        table = next(x for x in runs.comparison_section(normalise(recs, ["a", "b"])[0])["blocks"]
                     if x["type"] == "table")
        assert [(c["text"], c["cls"], c["title"]) for c in table["rows"][0][1:]] == cells
        assert table["rows"][0][2]["note"] == ""  # no "+nan (+nan%)" difference either way
    monkeypatch.setattr(runs.plots, "line_vs_length", lambda series, **k: "")
    recs = [ruler_record("finetuned", "lora", task, 1024, 50.0, run=run) for run in ("a", "b")
            for task in ("niah_single_1", "vt")]
    recs[-1] = {**recs[-1], "status": "timeout", "values": {}}
    figure = next(b for b in runs.comparison_section(normalise(recs, ["a", "b"])[0])["blocks"]
                  if b["type"] == "figure")
    assert "the mean of fewer tasks or seeds than ran" in figure["caption"]


def test_comparison_of_runs_marks_a_failed_ruler_length_in_its_plot(monkeypatch):
    """A length where every RULER cell of a (run, variant) failed vanished from the run comparison's RULER plot: the
    line went from the length before to the one after, with no mark, where the perplexity plot draws a cross with
    the status."""
    from harness.report import runs
    from harness.report.common import normalise

    drawn = []
    monkeypatch.setattr(runs.plots, "line_vs_length", lambda series, **k: drawn.extend(series) or "")
    recs = [ruler_record("finetuned", "lora", "niah_single_1", n, 50.0, run=run) for run in ("a", "b")
            for n in (1024, 2048, 4096)]
    recs[4] = {**recs[4], "status": "timeout", "values": {}, "error": "no record within 3600 s"}  # b at 2048
    sec = runs.comparison_section(normalise(recs, ["a", "b"])[0])
    head = next(s for s in drawn if s.label.startswith("[b]"))
    assert head.x == [1024, 4096] and head.failed == [(2048, "timeout")]
    assert "\u2715 at the top" in next(b for b in sec["blocks"] if b["type"] == "figure")["caption"]


def test_ruler_comparison_uses_mcnemar():
    ps_a = {str(i): 1.0 for i in range(20)}
    ps_b = {str(i): float(i < 5) for i in range(20)}
    a = ruler_record("pretrained", "none", "vt", 1024, 100.0, run="base", per_sample=ps_a)
    b = ruler_record("pretrained", "none", "vt", 1024, 25.0, run="head", per_sample=ps_b)
    sec, _ = _section([a, b], "comparison")
    row = next(x for x in sec["blocks"] if x["type"] == "table")["rows"][0]
    assert row[2]["text"] == "25.0" and row[2]["note"] == "-75.0 pts" and row[2]["cls"] == "worse"
    assert "McNemar p=" in row[2]["title"]


def test_parent_written_failures_get_their_variant_and_no_env_is_fine():
    ok_rec = asdict(ppl_record("finetuned", "hylora", 2048, 30.0, ft_ctx=8192))
    ok_rec["cell"] = f"tiny-hybrid/seed0/hylora/{SE}/ppl@2048"
    ok_rec["backend"] = SE
    fail = parent_failure(f"tiny-hybrid/seed0/hylora/{SE}/ppl@4096", "perplexity", ctx=4096, ft_ctx=8192)
    orphan = parent_failure("tiny-hybrid/seed0/lora/full/ruler/vt@2048", "ruler", status="timeout", ctx=2048)
    ctx = build_context([ok_rec, fail, orphan], title="t")
    ppl = next(s for s in ctx["sections"] if s["id"] == "perplexity")
    assert len([b for b in ppl["blocks"] if b["type"] == "table"]) == 1  # same dataset/protocol group
    row = next(b for b in ppl["blocks"] if b["type"] == "table")["rows"][0]
    assert [c["text"] for c in row] == [f"finetuned: hylora / {SE} @ 8192", "30.00", "OOM"]
    fails = next(s for s in ctx["sections"] if s["id"] == "failures")
    labels = [r[2]["text"] for r in fails["blocks"][1]["rows"]]
    assert f"finetuned: hylora / {SE} @ 8192" in labels and "finetuned: lora / full" in labels
    ruler = next(s for s in ctx["sections"] if s["id"] == "ruler")
    assert "TIMEOUT" in [c["text"] for _, _, c in _cells(ruler)]
    env = next(s for s in ctx["sections"] if s["id"] == "environment")
    assert any(b["type"] == "paragraph" and b["text"].startswith("2 record(s) carry no environment")
               for b in env["blocks"])
    assert len(env["blocks"][0]["rows"]) == 8  # one environment: key/value rows, no "None" row


def test_environments_are_listed_by_run_in_run_order_then_most_records_first():
    """Runs were listed by name, so a base named "z-base" came after the run compared with it."""
    newer = dict(ENV, torch="2.14.0")
    recs = [dict(asdict(ppl_record("pretrained", "none", c, 30.0)), run="z-base") for c in (2048, 4096)]
    recs += [dict(asdict(ppl_record("pretrained", "none", c, 30.0)), run="a-head", env=env)
             for c, env in ((2048, ENV), (4096, newer), (8192, newer))]
    sec, _ = _section(recs, "environment", runs=["z-base", "a-head"])
    tbl = sec["blocks"][0]
    assert tbl["columns"][:3] == ["run", "python", "torch"] and tbl["columns"][-1] == "records"
    assert [(r[0]["text"], r[2]["text"], r[-1]["text"]) for r in tbl["rows"]] == [
        ("z-base", "2.13.0+cpu", "2"), ("a-head", "2.14.0", "2"), ("a-head", "2.13.0+cpu", "1")]


def test_models_with_different_tokenizers_compare_in_bits_per_byte():
    from dataclasses import replace

    recs = []
    for model, tokenizer, ppl, bpb in (("a", "tok-a", 20.0, 1.5), ("b", "tok-b", 30.0, 1.25)):
        for ctx in (2048, 4096):
            r = ppl_record("pretrained", "none", ctx, ppl)
            recs.append(replace(r, cell=f"{model}-{ctx}", model={"name": model, "hash": model},
                                values={**r.values, "bits_per_byte": bpb},
                                dataset={**DATASET, "tokenizer": tokenizer}))
    section, _ = _section(recs, "perplexity")
    text = " ".join(b.get("text", "") for b in section["blocks"])
    assert "Bits per byte (the models' tokenizers differ" in text
    shown = {(row, col): c["text"] for row, col, c in _cells(section) if col != "variant"}
    assert {v for (row, _), v in shown.items() if row != "tokens scored"} == {"1.500", "1.250"}
    same = [replace(r, dataset={**DATASET, "tokenizer": "tok-a"}) for r in recs]
    section, _ = _section(same, "perplexity")
    assert "Perplexity on" in " ".join(b.get("text", "") for b in section["blocks"])


def test_failures_from_before_measuring_join_their_one_group():
    """A job's failed cell (with env) has no dataset or protocol: it went to a group of its own, "dataset not
    recorded, protocol not recorded", with a note of different protocols; it belongs in the measured group."""
    from dataclasses import replace

    def job_failure(cell_id, ft_ctx=None):
        return replace(Record.from_dict(parent_failure(cell_id, "perplexity", status="error", ctx=4096,
                                                       ft_ctx=ft_ctx)), env=ENV)

    ok_rec = replace(ppl_record("pretrained", "none", 2048, 30.0), cell="tiny-hybrid/seed0/pretrained/ppl@2048")
    recs = [ok_rec, job_failure("tiny-hybrid/seed0/pretrained/ppl@4096"),  # a sibling of the same variant
            job_failure("tiny-hybrid/seed0/lora/full/ppl@4096", ft_ctx=2048)]  # a variant with no ok record
    section, ctx = _section(recs, "perplexity")
    header = dict(ctx["header"]["facts"])
    assert header["perplexity protocol"] == "longlora (step 256)" and not ctx["header"]["notes"]
    assert [b["type"] for b in section["blocks"]] == ["paragraph", "figure", "table"]
    assert "not recorded" not in section["blocks"][0]["text"]
    shown = {(row, col): c["text"] for row, col, c in _cells(section)}
    assert shown[("pretrained", "2K (2048)")] == "30.00" and shown[("pretrained", "4K (4096)")] == "ERROR"
    assert shown[("finetuned: lora / full @ 2048", "4K (4096)")] == "ERROR"
    # two measured groups: a failure could be in either, so it is in neither (and makes no group of its own)
    other = replace(ok_rec, cell="other", settings={"protocol": "stride", "stride": 1024})
    section, ctx = _section(recs + [other], "perplexity")
    assert sum(b["type"] == "table" for b in section["blocks"]) == 2
    assert "protocol not recorded" not in str(section) + str(ctx["header"])
    assert section["blocks"][-1]["text"].startswith("1 cell(s) failed before recording their dataset")


def test_an_efficiency_report_names_no_model_and_its_shape_whatever_failed():
    """The paper section said "this report's model(s): not recorded"; the shape was read off the first record,
    a failure, which has only its cell's settings."""
    failed = dict(eff_record("se_attn", 1024, None, status="oom"), settings={"eval_attention": "full"})
    recs = [failed, eff_record("full", 1024, 2.5)]
    paper, _ = _section(recs, "paper")
    assert "not recorded" not in str(paper) and "attention layers alone, no model" in str(paper)
    sec, _ = _section(recs, "efficiency")
    assert "(batch 1, heads 4, head_dim 32, repeats 3)" in sec["blocks"][0]["text"]


# ----------------------------------------------------------------------------- numbers as a reader sees them


def test_a_bool_is_not_a_number_and_a_record_without_stage_or_method_is_pretrained():
    from harness.report.common import number

    assert number(1) and number(2.5) and not number(True) and not number(float("nan")) and not number("3")
    bare = Record(suite="s", cell="c", metric="perplexity", model={"preset": "m"}, eval_context=2048, method="")
    assert variant_label(variant_key(bare)) == "pretrained"


def test_a_failure_that_measured_something_keeps_its_own_settings():
    from harness.report.common import normalise

    ok_rec = ppl_record("finetuned", "hylora", 2048, 30.0, ft_ctx=8192)
    # a job that failed after measuring: it has values and no dataset, and is not filled in from its sibling
    failed = replace(ok_rec, cell="ppl-late", status="error", values={"nll": 1.0}, dataset=None, settings={})
    (_, got), _, _ = normalise([ok_rec, failed])
    assert got.dataset is None and got.settings == {}


def test_fmt_count_picks_the_unit_of_the_number_as_shown():
    from harness.report.common import fmt_count

    # 3 significant digits: 999,999 shows as "1M", not "1e+03K" (a token count or parameter count in the tables)
    assert [fmt_count(n) for n in (999, 1000, 999_499, 999_999, 1_000_000, 1_234_567, 999_600_000, 2e9)] == [
        "999", "1K", "999K", "1M", "1M", "1.23M", "1B", "2B"]


def test_efficiency_speedup_is_over_full_of_the_same_run_and_a_place_shows_the_median(monkeypatch):
    from harness.report import plots

    drawn = []
    monkeypatch.setattr(plots, "line_vs_length", lambda series, **kw: drawn.append(series) or "x.svg")
    recs = [eff_record("full", 1024, 4.0, ideal=1.0, run="a"), eff_record("se_attn", 1024, 2.0, ideal=4.0, run="a"),
            eff_record("full", 1024, 8.0, ideal=1.0, run="b"), eff_record("se_attn", 1024, 2.0, ideal=4.0, run="b")]
    sec, _ = _section(recs, "efficiency")
    limits = [b for b in sec["blocks"] if b["type"] == "table"][1]
    assert [[c["text"] for c in row] for row in limits["rows"]] == [["[a] se_attn", "2.00x / 4.00x"],
                                                                    ["[b] se_attn", "4.00x / 4.00x"]]
    assert [s.y for s in drawn[-1]] == [[0.5], [1.0]]  # the fraction of the limit, measured / ideal
    assert [s.linestyle for s in drawn[0]] == ["-", "-", "--", "--"]  # a run's line style, as in the other plots
    # a backend's colour is the same in the time plot and the fraction-of-the-limit plot, which has no full
    assert [s.color for s in drawn[-1]] == [drawn[0][1].color, drawn[0][3].color]
    assert len({s.color for s in drawn[0]}) == 4
    # three records of one place (three cells timing it): the median, 2.00, not the mean, 4.00
    three = [dict(eff_record("se_attn", 1024, t), cell=f"attention/se_attn/efficiency@1024/{i}")
             for i, t in enumerate((1.0, 2.0, 9.0))]
    sec, _ = _section(three, "efficiency")
    row = next(b for b in sec["blocks"] if b["type"] == "table")["rows"][0]
    assert row[1]["text"] == "2.00" and row[1]["title"] == "repeats 0.90–9.90 ms"
    # one of them failed: the note counts measurements, not seeds
    three[2] = eff_record("se_attn", 1024, None, status="oom") | {"cell": "attention/se_attn/efficiency@1024/2"}
    row = next(b for b in _section(three, "efficiency")[0]["blocks"] if b["type"] == "table")["rows"][0]
    assert row[1]["note"] == "2 of 3 measurements (1 OOM)"


def test_ruler_bolds_a_best_only_among_two_and_needs_every_seeds_samples():
    one = [ruler_record("pretrained", "none", "niah_single_1", 1024, 30.0),
           ruler_record("finetuned", "hylora", "niah_single_1", 1024, 80.0)]
    sec, _ = _section(one, "ruler")
    row = next(r for r in [b for b in sec["blocks"] if b["type"] == "table"][-1]["rows"]
               if r[0]["text"] == "niah_single_1")
    assert [c["bold"] for c in row[1:]] == [False, False]  # one fine-tuned variant: nothing to rank
    # seed 1 was recorded without per-sample scores: no interval or mark from seed 0's alone
    outcomes = {f"s{i}": float(i < 16) for i in range(20)}
    recs = [ruler_record("pretrained", "none", "niah_single_1", 1024, 30.0, per_sample=dict.fromkeys(outcomes, 0.0)),
            ruler_record("finetuned", "hylora", "niah_single_1", 1024, 80.0, per_sample=outcomes),
            ruler_record("finetuned", "hylora", "niah_single_1", 1024, 70.0, seed=1)]
    sec, _ = _section(recs, "ruler")
    row = next(r for r in [b for b in sec["blocks"] if b["type"] == "table"][-1]["rows"]
               if r[0]["text"] == "niah_single_1")
    assert row[2]["text"] == "75.0" and row[2]["note"] == "" and "McNemar" not in row[2]["title"]


def test_fine_tuning_curve_of_seeds_is_the_mean_per_step_over_the_steps_all_have():
    from harness.report.training import _mean_curve

    # three seeds, two steps in common (step 10 only in one): (2 + 4 + 9) / 3 = 5 and (1 + 2 + 3) / 3 = 2
    assert _mean_curve([[[0, 2.0], [5, 1.0], [10, 0.5]], [[0, 4.0], [5, 2.0]], [[0, 9.0], [5, 3.0]]]) == [
        (0, 5.0), (5, 2.0)]


def test_a_group_is_uninformative_only_where_all_its_tasks_are():
    recs = []
    for i, task in enumerate(("niah_single_1", "niah_single_2", "niah_single_3")):
        recs.append(ruler_record("pretrained", "none", task, 1024, 3.0 if i == 0 else 60.0))  # one task at chance
        recs.append(ruler_record("finetuned", "lora", task, 1024, 40.0))
        recs.append(ruler_record("finetuned", "hylora", task, 1024, 50.0))
    sec, _ = _section(recs, "ruler")
    groups = next(b for b in sec["blocks"] if b["type"] == "table" and b["columns"][0] == "group")
    lora, hylora = (next(r for r in groups["rows"] if r[1]["text"].startswith(f"finetuned: {m} "))[2]
                    for m in ("lora", "hylora"))
    assert (lora["cls"], hylora["cls"], hylora["bold"], hylora["text"]) == ("", "", True, "50.0")


def test_training_steps_are_the_last_logged_step_of_a_sparse_curve(monkeypatch):
    """Curves are logged every N steps: a run of 300 steps logged every 100 has three points, and its row says 300
    steps (not 3); the plot gets the logged steps themselves."""
    from harness.report import training

    drawn = []
    monkeypatch.setattr(training.plots, "loss_curves", lambda curves, **k: drawn.extend(curves) or "")
    curve = [[100, 4.0], [200, 3.0], [300, 2.5]]
    pre = asdict(Record(suite="s", cell="tiny-hybrid/seed0/pretrain", metric="pretrain", stage="pretrained",
                        model={"preset": "tiny-hybrid"}, env=ENV, values={"loss_curve": curve, "seconds": 2.0}))
    ft = asdict(Record(suite="s", cell="tiny-hybrid/seed0/lora/full/train", metric="train", stage="finetuned",
                       model={"preset": "tiny-hybrid"}, method="lora", backend="full", finetune_context=2048,
                       env=ENV, values={"loss_curve": [[s, 5.0 - s / 1000] for s in range(25, 501, 25)],
                                        "seconds": 5.0}))
    sec, _ = _section([pre, ft], "training")
    p, t = next(b for b in sec["blocks"] if b["type"] == "table")["rows"]
    assert [c["text"] for c in p[1:3]] == ["300", "2.500"]
    assert [c["text"] for c in t[1:3]] == ["500", "4.500"]  # 20 points, every 25 steps
    assert drawn[0][1] == curve and [s for s, _ in drawn[1][1]][-1] == 500


def test_ruler_rows_follow_rulers_task_order_then_others_by_name():
    """Per-task rows in RULER's order (NIAH single, multikey, ..., vt, cwe, fwe, then the opt-in QA tasks), tasks the
    harness does not know after them by name; not alphabetical (which puts cwe first) nor in record order."""
    tasks = ["zz_custom", "qa_2", "fwe", "vt", "niah_multikey_1", "aa_custom", "qa_1", "cwe", "niah_single_1"]
    recs = [ruler_record("finetuned", "lora", t, 1024, 40.0) for t in tasks]
    sec, _ = _section(recs, "ruler")
    per_task = [b for b in sec["blocks"] if b["type"] == "table"][-1]
    assert [r[0]["text"] for r in per_task["rows"]] == [
        "niah_single_1", "niah_multikey_1", "vt", "cwe", "fwe", "qa_1", "qa_2", "aa_custom", "zz_custom"]


def test_ruler_pretrained_cells_carry_no_difference_from_themselves():
    """Only a fine-tuned variant is compared with the pretrained model: the pretrained cell's tooltip has no
    "vs pretrained: +0.0 pts, McNemar p=1" of the model against itself."""
    right = {f"s{i}": float(i < 6) for i in range(20)}
    recs = [ruler_record("pretrained", "none", "niah_single_1", 1024, 30.0, per_sample=right),
            ruler_record("finetuned", "lora", "niah_single_1", 1024, 30.0, per_sample=right)]
    sec, _ = _section(recs, "ruler")
    row = next(r for r in [b for b in sec["blocks"] if b["type"] == "table"][-1]["rows"]
               if r[0]["text"] == "niah_single_1")
    assert "vs pretrained" not in row[1]["title"] and "McNemar" not in row[1]["title"]
    assert "vs pretrained: +0.0 pts" in row[2]["title"] and "McNemar p=1 over 20 samples" in row[2]["title"]


def test_paper_ours_beside_the_paper_only_at_the_same_length_method_and_setting():
    """Each "ours" cell takes only our records of its own length, of HyLoRA (or the ablation row's method) at the
    paper's fine-tuning context of 8192, with full-attention evaluation, from the base run; Figure 4's time only at
    32K. Any other record left in would move the cell (the values below are chosen so each one would show)."""
    from harness.data.ruler import PAPER_TASKS
    from harness.report.common import normalise
    from harness.report.paper import paper_section

    def ppl(n, value, method="hylora", ft=8192, ev="full", run="base"):
        d = asdict(ppl_record("finetuned", method, n, value, ft_ctx=ft))
        d.update(model={"preset": "mamba2attn-2.7b"}, backend=SE, run=run, cell=f"{method}/{ft}/{ev}/{run}/ppl@{n}",
                 config_hash=f"{method}{ft}{ev}{run}{n}")
        d["settings"]["eval_attention"] = ev
        return d

    def ruler(task, n, acc, method="hylora"):
        d = ruler_record("finetuned", method, task, n, acc)
        d.update(model={"preset": "mamba2attn-2.7b"}, variant={"model": "mamba2attn-2.7b", "seed": 0},
                 finetune_context=8192, run="base", config_hash=f"{method}{task}{n}")
        return d

    def eff(n, ms):
        d = eff_record(SE, n, ms, gpu="NVIDIA A100-SXM4-80GB", run="base")
        d["settings"]["backend_options"] = {"chunk_size": [2048, 4096], "block_size": 32, "top_k": 8}
        return d

    recs = [ppl(2048, 12.0), ppl(8192, 10.5),
            ppl(16384, 99.0, ft=2048),  # fine-tuned at 2K, not the paper's 8K
            ppl(32768, 77.0, method="lora"), ppl(32768, 66.0, ev="finetune"), ppl(32768, 55.0, run="other"),
            eff(32768, 70.0), eff(16384, 10.0)]
    for task in PAPER_TASKS:
        recs += [ruler(task, 2048, 40.0), ruler(task, 8192, 30.0), ruler(task, 8192, 20.0, method="lora")]
    sec = paper_section(normalise(recs, ["base", "other"])[0])  # this section alone: no heatmaps drawn
    main, _, ablations, runtime = [b for b in sec["blocks"] if b["type"] == "table"][:4]
    se = dict(zip(main["columns"], [c["text"] for c in main["rows"][-1]], strict=True))
    assert se == {"method": "SE-Attn", "PPL 2K paper": "10.99", "PPL 2K ours": "12.00", "PPL 8K paper": "10.45",
                  "PPL 8K ours": "10.50", "PPL 16K paper": "11.14", "PPL 16K ours": "–", "PPL 32K paper": "12.64",
                  "PPL 32K ours": "–", "RULER 2K paper": "71.9", "RULER 2K ours": "40.0", "RULER 8K paper": "40.5",
                  "RULER 8K ours": "30.0", "RULER 16K paper": "28.2", "RULER 16K ours": "–"}
    abl = {r[0]["text"]: (r[1]["text"], r[2]["text"]) for r in ablations["rows"]}
    assert abl["LoRA (SE-Attn)"] == ("31.6", "20.0") and abl["HyLoRA (SE-Attn)"] == ("40.5", "30.0")
    assert [c["text"] for c in runtime["rows"][-1]] == ["SE-Attn", "71", "70"]


def test_names_in_plots_are_plain_text():
    """A name with two dollar signs (a run's directory, a model, a checkpoint) was parsed as TeX, and where that
    failed the report stopped."""
    from harness.report import plots

    name = r"ckpt $\nosuchmacro$"
    for src in (plots.line_vs_length([plots.Series(name, [1024], [3.0])], ylabel="y"),
                plots.loss_curves([(name, [[1, 2.0]])]), plots.accuracy_heatmap([name], [1024], [[50.0]])):
        assert src.startswith("data:image/png;base64,")


def test_comparison_plots_each_perplexity_protocol_apart(monkeypatch):
    """Runs measured with two protocols: a point of the plot was the mean of both protocols' perplexities, which the
    Perplexity section keeps apart as not comparable."""
    from harness.report import runs
    from harness.report.common import normalise

    drawn = []
    monkeypatch.setattr(runs.plots, "perplexity_vs_context", lambda series, *a, **k: drawn.append(series) or "")
    longlora = [dict(asdict(ppl_record("pretrained", "none", 2048, 30.0)), run=run) for run in ("a", "b")]
    stride = [dict(r, cell=r["cell"] + "-stride", settings={"protocol": "stride", "stride": 1024},
                   values={**r["values"], "perplexity": 20.0}) for r in longlora]
    sec = runs.comparison_section(normalise(longlora + stride, ["a", "b"])[0])
    assert [[s.y for s in series] for series in drawn] == [[[30.0], [30.0]], [[20.0], [20.0]]]
    captions = [b["caption"] for b in sec["blocks"] if b["type"] == "figure"]
    assert captions[0].endswith("longlora (step 256).") and captions[1].endswith("stride (stride 1024).")


# ----------------------------------------------------------------------------- what the tables and plots show


def _figures(monkeypatch):
    """The matplotlib figures the plots build, in order, instead of their PNGs."""
    from harness.report import plots

    figs = []
    monkeypatch.setattr(plots, "png_data_uri", lambda fig: figs.append(fig) or "")
    return figs


def test_a_place_with_a_value_is_ringed_not_marked_failed():
    from harness.report.common import Pivot

    recs = [ppl_record("pretrained", "none", 2048, 30.0), ppl_record("pretrained", "none", 2048, None, status="oom"),
            ppl_record("pretrained", "none", 4096, None, status="timeout")]
    pv = Pivot(recs, lambda r: r.values.get("perplexity"))
    (k,) = pv.rows
    assert pv.failures(k) == [(4096, "timeout")] and pv.partials(k) == [2048]


def test_header_counts_records_by_status_and_shortens_many_warnings():
    recs = [dict(asdict(ppl_record("pretrained", "none", 2048, 30.0)), warnings=[f"w{i}" for i in range(7)]),
            asdict(ppl_record("pretrained", "none", 4096, None, status="oom"))]
    header = build_context(recs, title="t")["header"]
    assert dict(header["facts"])["records"] == "2 (1 ok, 1 oom)"
    (note,) = header["notes"]
    assert note.startswith("7 warning(s)") and note.endswith("ppl-pretrained-none-2048: w4; and 2 more.")


def test_perplexity_footer_windows_note_spread_and_context_lines(monkeypatch):
    """Tokens scored: a range where variants scored different counts at a length; the max_windows note only where a
    cell evaluated fewer windows than it had; no spread or seed count on one seed's value, a spread on seeds of models
    without a recorded hash (nothing says they are one model); lines at the pretraining and fine-tuning contexts."""
    from harness.report import html

    drawn = []
    monkeypatch.setattr(html.plots, "perplexity_vs_context", lambda series, vlines=(): drawn.append(vlines) or "")
    recs = synthetic_records(train=False, failure=False)
    sec, _ = _section(recs, "perplexity")
    assert "max_windows" not in sec["blocks"][0]["text"]
    assert [(v.x, v.label) for v in drawn[-1]] == [(2048, "pretraining context (2K)"),
                                                   (8192, "fine-tuning context (8K)")]
    rows = next(b for b in sec["blocks"] if b["type"] == "table")["rows"]
    assert (rows[0][1]["text"], rows[0][1]["note"], rows[0][1]["title"]) == ("31.25", "", "")
    recs[-1] = dict(recs[-1], values={**recs[-1]["values"], "tokens_scored": 1000, "windows_total": 20})
    sec, _ = _section(recs, "perplexity")
    assert "evenly spaced subset of the windows (max_windows)" in sec["blocks"][0]["text"]
    footer = next(b for b in sec["blocks"] if b["type"] == "table")["rows"][-1]
    assert [c["text"] for c in footer] == ["tokens scored", "20,480", "40,960", "81,920", "1,000–163,840"]
    recs[-1] = dict(recs[-1], values={**recs[-1]["values"], "windows_total": None})  # stored as null: no crash
    assert "(max_windows)" not in _section(recs, "perplexity")[0]["blocks"][0]["text"]
    seeds = [dict(asdict(ppl_record("pretrained", "none", 2048, ppl)), cell=f"s{ppl}", model={"preset": "m"})
             for ppl in (30.0, 32.0)]
    sec, _ = _section(seeds, "perplexity")
    shown = next(b for b in sec["blocks"] if b["type"] == "table")["rows"][0][1]
    assert (shown["text"], shown["note"], shown["title"]) == ("31.00", "\u00b1 1.41", "mean \u00b1 sd of 2 seeds")


def test_failed_cells_in_order_with_the_errors_last_line_and_the_whole_message_folded():
    tb = 'Traceback (most recent call last):\n  File "x.py", line 1\ntorch.OutOfMemoryError: CUDA out of memory'
    recs = [asdict(ppl_record("pretrained", "none", 4096, None, status="oom", error=tb)),
            asdict(ppl_record("pretrained", "none", 2048, None, status="error", error="bad"))]
    sec, _ = _section(recs, "failures")
    rows = sec["blocks"][1]["rows"]
    assert [r[3]["text"] for r in rows] == ["2048", "4096"]
    assert [(r[5]["text"], r[5]["details"]) for r in rows] == [
        ("bad", ""), ("torch.OutOfMemoryError: CUDA out of memory", tb)]


def test_comparison_rows_by_variant_then_length_and_its_plot_marks_failures(monkeypatch):
    from harness.report import runs
    from harness.report.common import normalise

    drawn = []
    monkeypatch.setattr(runs.plots, "perplexity_vs_context", lambda series, *a, **k: drawn.extend(series) or "")
    recs = [dict(asdict(ppl_record("pretrained", "none", c, 30.0)), run=run) for run in ("a", "b")
            for c in (16384, 2048, 4096)]
    recs[0] = dict(asdict(ppl_record("pretrained", "none", 16384, None, status="oom")), run="a")
    tbl = next(b for b in runs.comparison_section(normalise(recs, ["a", "b"])[0])["blocks"] if b["type"] == "table")
    assert [r[0]["text"] for r in tbl["rows"]] == [f"ppl-pretrained-none-{c}" for c in (2048, 4096, 16384)]
    assert [s.failed for s in drawn] == [[(16384, "oom")], []]


def test_a_line_breaks_at_a_failed_length(monkeypatch):
    """It joined the lengths around a failure, drawing a line through a length that has no value."""
    import math

    from harness.report import plots

    figs = _figures(monkeypatch)
    plots.line_vs_length([plots.Series("a", [1024, 4096], [3.0, 4.0], failed=[(2048, "oom")])], ylabel="y")
    x, y = figs[-1].axes[0].get_lines()[0].get_data()
    assert list(x) == [1024, 2048, 4096] and y[0] == 3.0 and math.isnan(y[1]) and y[2] == 4.0


def test_line_plot_axes_legend_and_looks(monkeypatch):
    """log2 x with a tick at every length, a failed one too; each series in its own colour and line style, with
    its error bars; a legend entry for a series that only failed; a linear y where a value is not positive."""
    from harness.report import plots

    figs = _figures(monkeypatch)
    plots.line_vs_length([plots.Series("a", [1024, 2048], [3.0, 4.0], color="#123456", linestyle="--",
                                       yerr=[0.5, 0.25]),
                          plots.Series("b", [], [], failed=[(4096, "oom")])], ylabel="y")
    ax = figs[-1].axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log") and list(ax.get_xticks()) == [1024, 2048, 4096]
    assert (ax.get_lines()[0].get_color(), ax.get_lines()[0].get_linestyle()) == ("#123456", "--")
    assert len(ax.containers) == 1  # the error bars
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    plots.line_vs_length([plots.Series("a", [1024, 2048], [0.0, 4.0])], ylabel="y")
    assert figs[-1].axes[0].get_yscale() == "linear"


def test_loss_curves_heatmap_hatches_and_ten_series_colours(monkeypatch):
    from harness.report import plots

    figs = _figures(monkeypatch)
    plots.loss_curves([("a", [[1, 2.0]]), ("b", []), ("c", [[1, 1.0]])],
                      styles=[("#111111", "-", ""), ("#222222", "--", ""), ("#333333", ":", "")])
    assert [(ln.get_color(), ln.get_linestyle()) for ln in figs[-1].axes[0].get_lines()] == [("#111111", "-"),
                                                                                            ("#333333", ":")]
    plots.accuracy_heatmap(["vt", "cwe"], [1024], [[50.0], [60.0]], hatched=[[True], [False]])
    assert len(figs[-1].axes[0].patches) == 1
    # up to the palette's ten: a colour each, whatever their groups
    assert looks([("full", f"m{i}", "") for i in range(10)]) == [(c, "-", "o") for c in PALETTE]


def test_training_table_lists_ok_runs_by_variant_and_curves_take_looks_of_their_own(monkeypatch):
    """A failed pretraining is in Failed cells, not a row of dashes here; fine-tunes are listed by variant (as every
    other table), then by cell, whatever their cell ids' order; past ten variants each curve has a look of its own."""
    from harness.report import training

    styles = []
    monkeypatch.setattr(training.plots, "loss_curves", lambda curves, **k: styles.append(k.get("styles")) or "")

    def train(method, seed, ft=2048, backend="full"):
        return asdict(Record(suite="s", cell=f"c{seed}-{method}-{backend}-{ft}", metric="train", stage="finetuned",
                             model={"preset": "m"}, method=method, backend=backend, finetune_context=ft,
                             variant={"model": "m", "seed": seed}, values={"loss_curve": [[1, 4.0]]}))

    failed = asdict(Record(suite="s", cell="m/seed0/pretrain", metric="pretrain", stage="pretrained",
                           model={"preset": "m"}, status="oom", error="killed"))
    sec, _ = _section([failed, train("lora", 1), train("hylora", 0, 16384), train("lora", 0), train("hylora", 1)],
                      "training")
    rows = next(b for b in sec["blocks"] if b["type"] == "table")["rows"]
    assert [r[0]["text"] for r in rows] == ["finetuned: hylora / full @ 2048 · seed1",
                                            "finetuned: hylora / full @ 16384 · seed0",
                                            "finetuned: lora / full @ 2048 · seed0",
                                            "finetuned: lora / full @ 2048 · seed1"]
    _section([train("lora", 0, backend=f"b{i:02}") for i in range(12)], "training")
    assert len(styles[-1]) == 12 and len(set(styles[-1])) == 12


def test_the_demo_makes_every_section_with_what_it_says_it_holds(monkeypatch):
    """The demo's records are the browser check's, which needs Chromium: here without it (nor PNGs)."""
    from harness.report import demo
    from harness.report.ruler import UNINFORMATIVE

    _figures(monkeypatch)
    ctx = build_context(demo.records(runs=2), title="t")
    assert [s["id"] for s in ctx["sections"]] == ["perplexity", "ruler", "efficiency", "training", "comparison",
                                                   "paper", "failures", "environment"]
    failures = next(s for s in ctx["sections"] if s["id"] == "failures")["blocks"][1]["rows"]
    assert {(r[1]["text"], r[3]["text"], r[4]["text"]) for r in failures} == {("perplexity", "4096", "OOM"),
                                                                              ("efficiency", "8192", "OOM")}
    assert "1 older record(s) of rerun cells superseded" in dict(ctx["header"]["facts"])["records"]
    assert "eval: finetune attention" in str(ctx["sections"])
    ruler = next(s for s in ctx["sections"] if s["id"] == "ruler")
    assert set(demo.AT_CHANCE) <= {row for row, _, c in _cells(ruler) if UNINFORMATIVE in c["note"]}
    assert "comparison" not in [s["id"] for s in build_context(demo.records(runs=1), title="t")["sections"]]


def test_the_template_renders_every_block_and_every_part_of_a_cell(monkeypatch):
    from harness.report import html
    from harness.report.common import callouts, cell, figure, heading, paragraph, table

    blocks = [heading("h1"), paragraph("p1"), figure("data:,", "alt1", "fc1"),
              {"type": "figures", "items": [{"src": "data:,", "alt": "a2", "caption": "ft1"}], "caption": "fs1"},
              table(["a", "b"], [[cell("x", title="<t>", note="n1", details="d1"), cell("2", bold=True)]],
                    caption="cap1", summary="sum1"),
              {"type": "list", "mono": True, "items": ["li1"]}, callouts(["co1"])]
    ctx = {"header": {"title": "T", "generated": "now", "notes": [], "facts": [("k1", "v1")]},
           "sections": [{"id": "s1", "title": "S1", "blocks": blocks}]}
    monkeypatch.setattr(html, "build_context", lambda records, **kw: ctx)
    page = html.render_html([], title="T")
    for part in ("<h3>h1</h3>", "<p>p1</p>", 'alt="alt1"', "<figcaption>fc1</figcaption>", ">ft1</figcaption>",
                 '<p class="caption">fs1</p>', "<caption>cap1</caption>", "<summary>sum1</summary>",
                 ' title="&lt;t&gt;"', '<span class="note">n1</span>', "<pre>d1</pre>", "<strong>2</strong>",
                 "<li>li1</li>", "co1</div>", "<dt>k1</dt><dd>v1</dd>", '<a href="#s1">S1</a>', '<section id="s1">'):
        assert part in page, part
