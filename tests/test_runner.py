"""End to end on a shrunken suite: pretrain, fine-tune, evaluate, report; then resume does nothing new."""

import json

import pytest

from harness import results
from harness.runner import run_suite
from harness.suite import load_suite

SMALL = """
name: small
pretrain: {context: 64, steps: 3, batch_size: 2, warmup_steps: 1}
finetune: {context: 256, steps: 2, warmup_steps: 1}
eval: {contexts: [64, 256], tokens_per_length: 512, max_tokens: 20000}
"""


@pytest.fixture
def suite(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARNESS_PG19_DIR", raising=False)
    (tmp_path / "s.yaml").write_text(SMALL)
    return load_suite(tmp_path / "s.yaml")


def test_run_writes_records_and_report_then_resumes(suite, tmp_path, capsys):
    out = tmp_path / "out"
    report = run_suite(suite, out)
    recs = results.load(out)
    ppl = [r for r in recs if r["metric"] == "perplexity"]
    assert len(ppl) == 4 and all(r["status"] == "ok" and r["values"]["perplexity"] > 1 for r in ppl)
    assert {r["stage"] for r in ppl} == {"pretrained", "finetuned"}
    assert {r["eval_context"]: r["values"]["windows"] for r in ppl} == {64: 8, 256: 2}  # 512 tokens per length
    train = [r for r in recs if r["metric"] == "train"]
    assert len(train) == 1 and train[0]["values"]["trainable_params"] > 0
    assert ppl[0]["dataset"]["embedded"] and ppl[0]["kernel"] == "full via sdpa"
    html = report.read_text()
    assert "embedded corpus" in html and "data:image/png;base64" in html

    capsys.readouterr()
    run_suite(suite, out)  # everything cached and recorded: nothing new runs
    assert "4 cells, 4 already done" in capsys.readouterr().out
    assert len(results.load(out)) == len(recs)

    other = tmp_path / "other"  # a new results dir reuses cached artefacts and still records the fine-tune
    run_suite(suite, other)
    assert "pretrain" not in capsys.readouterr().err
    assert [r["values"]["trainable_params"] for r in results.load(other) if r["metric"] == "train"] == [
        train[0]["values"]["trainable_params"]]


def test_dry_run_lists_cells_without_running(suite, tmp_path, capsys):
    assert run_suite(suite, tmp_path / "out", dry_run=True) is None
    out = capsys.readouterr().out
    assert "todo  tiny-hybrid/seed0/finetuned-lora-full/ppl@256" in out
    assert not (tmp_path / "out").exists()
    json.dumps(suite.model_dump())  # settings are serialisable for the config hash
