"""`harness check gpu`: on a CPU it says what it would run and exits 2; its summary of a run's records."""

import pytest
import torch

from harness.cli import main
from harness.gpu_check import markdown, summarise
from harness.results import Record


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-machine behaviour")
def test_on_a_cpu_it_says_what_it_would_run_and_exits_non_zero(capsys, tmp_path):
    assert main(["check", "gpu", "--out", str(tmp_path / "gc")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device here" in err and "pytest -m gpu" in err and "suites/gpu-check.yaml" in err
    assert not (tmp_path / "gc").exists()


def _attention(backend, time_ms, memory):
    return Record(suite="gpu-check", cell=f"attention/{backend}/efficiency@32768", metric="efficiency",
                  backend=backend, eval_context=32768, values={"time_ms": time_ms, "peak_memory_gib": memory},
                  kernel=f"{backend.split('(')[0]} via triton")


def test_the_summary_states_each_target_at_32k():
    records = [_attention("full", 90.0, 2.0), _attention("sliding_window(window=2304)", 20.0, 1.0),
               _attention("se_attn(chunk_size=2048,block_size=32,top_k=8)", 30.0, 2.6),
               Record(suite="gpu-check", cell="t", metric="train", method="lora", backend="full",
                      values={"tokens_per_s": 1e5, "peak_memory_gib": 1.5, "kernels": ["full via sdpa"]})]
    s = summarise(records)
    assert [(t["value"], t["met"]) for t in s["targets"]] == [(3.0, True), (1.5, False), (1.3, False)]
    assert s["finetunes"][0]["kernels"] == ["full via sdpa"] and len(s["attention"]) == 3
    assert [t["met"] for t in summarise(records[:1])["targets"]] == [None, None, None]  # not measured
    shown = markdown({"device": "H200", "torch": "2.13", **s,
                      "steps": {"pytest -m gpu": {"ok": True, "result": "5 passed"}}})
    assert "| SE-Attn speed-up over dense SDPA | 3.0 | >= 3.0 | yes |" in shown
    assert "| pytest -m gpu | yes | 5 passed |" in shown
