import re
from dataclasses import asdict

import pytest

from harness.report import render_report
from harness.report.html import build_context, variant_key, variant_label
from harness.report.plots import tokens_label
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
    assert len(to_frame(records)) == len(records)  # the records are what the store produces
    path = render_report(records, tmp_path / "rep", title="Smoke report", notes=[NOTE])
    assert path == tmp_path / "rep" / "index.html" and path.is_file()
    html = path.read_text()
    for heading in ("Smoke report", "Perplexity", "Fine-tuning", "Failed cells", "Environment", "Kernels that ran"):
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
    assert "Fine-tuning" not in html and "Failed cells" not in html
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


def test_mixed_protocols_are_split_and_flagged():
    a = synthetic_records(train=False, failure=False)
    b = [dict(r, settings={"protocol": "stride", "stride": 1024}) for r in a]
    ctx = build_context(a + b, title="t")
    assert any("not comparable" in n for n in ctx["header"]["notes"])
    ppl = next(s for s in ctx["sections"] if s["id"] == "perplexity")
    assert sum(b["type"] == "figure" for b in ppl["blocks"]) == 2


@pytest.mark.parametrize("n,label", [(2048, "2K"), (1536, "1.5K"), (32768, "32K"), (300, "300"), (1 << 20, "1M")])
def test_tokens_label(n, label):
    assert tokens_label(n) == label


def test_variant_labels():
    rec = synthetic_records(train=False, failure=False)
    assert variant_label(variant_key(rec[0])) == "pretrained"
    assert variant_label(variant_key(rec[-1])) == "finetuned: hylora / se_attn @ 8192"
