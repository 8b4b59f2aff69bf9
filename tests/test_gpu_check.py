"""`harness check gpu`: on a CPU it says what it would run and exits 2; its summary of a run's records."""

import json

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


def _attention(backend, time_ms, memory, length=32768, status="ok"):
    return Record(suite="gpu-check", cell=f"attention/{backend}/efficiency@{length}", metric="efficiency",
                  backend=backend, eval_context=length, values={"time_ms": time_ms, "peak_memory_gib": memory},
                  status=status, kernel=f"{backend.split('(')[0]} via triton")


def test_the_summary_states_each_target_at_32k():
    records = [_attention("full", 90.0, 2.0), _attention("sliding_window(window=2304)", 20.0, 1.0),
               _attention("se_attn(chunk_size=2048,block_size=32,top_k=8)", 30.0, 2.6),
               Record(suite="gpu-check", cell="t", metric="train", method="lora", backend="full",
                      values={"tokens_per_s": 1e5, "peak_memory_gib": 1.5, "kernels": ["full via sdpa"]})]
    s = summarise(records)
    assert [(t["value"], t["met"], t["kernel_met"]) for t in s["targets"]] == [(3.0, True, False), (1.5, False, False),
                                                                              (1.3, False, False)]
    assert s["finetunes"][0]["kernels"] == ["full via sdpa"] and len(s["attention"]) == 3
    assert [t["met"] for t in summarise(records[:1])["targets"]] == [None, None, None]  # not measured
    shown = markdown({"device": "H200", "torch": "2.13", **s,
                      "steps": {"pytest -m gpu": {"ok": True, "result": "5 passed"}}})
    assert "| SE-Attn speed-up over dense SDPA | 3.0 | >= 3.0 | yes | >= 5.0 | NO |" in shown
    assert "| pytest -m gpu | yes | 5 passed |" in shown


def test_the_pytest_step_says_why_it_failed(tmp_path, monkeypatch):
    from harness import gpu_check

    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_broken.py").write_text("import a_module_this_image_lacks\n")
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    step = gpu_check._pytest(tmp_path)
    assert not step["ok"] and "error" in step["result"] and "a_module_this_image_lacks" in \
        (tmp_path / "pytest-gpu.log").read_text()
    find_spec = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None if name == "pytest" else
                        find_spec(name))
    step = gpu_check._pytest(tmp_path)
    assert not step["ok"] and step["result"].startswith("pytest is not installed for ")


@pytest.mark.parametrize("tests_ok, failed, code", [(True, {}, 0), (False, {}, 1), (True, {"oom": 1}, 1)])
def test_the_check_fails_where_the_gpu_tests_or_a_cell_failed(tmp_path, monkeypatch, tests_ok, failed, code):
    """0 only where `pytest -m gpu` and every cell of the suite passed; the suite's results are the device's own."""
    from harness import gpu_check, results, runner

    def run_suite(suite, out):
        results.append(out, _attention("full", 90.0, 2.0))
        return runner.Outcome(out / "report.md", 1, failed)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(gpu_check, "_pytest", lambda out: {"ok": tests_ok, "result": "1 passed"})
    monkeypatch.setattr(runner, "run_suite", run_suite)
    assert gpu_check.check_gpu(tmp_path) == code
    steps = json.loads((tmp_path / "gpu-check.json").read_text())["steps"]
    assert [(name, s["ok"]) for name, s in steps.items()] == [("pytest -m gpu", tests_ok),
                                                              ("suite gpu-check", not failed)]
    assert (tmp_path / "suite" / "NVIDIA-H100-80GB-HBM3" / results.RESULTS_FILE).is_file()


def test_a_target_is_met_at_its_bound_and_read_at_32k_from_cells_that_worked():
    records = [_attention("full", 90.0, 2.0), _attention("se_attn(chunk_size=2048,block_size=32,top_k=8)", 30.0, 2.4),
               _attention("full", 1.0, 0.1, length=16384),  # another length
               _attention("se_attn(chunk_size=4096,block_size=32,top_k=8)", None, None, status="oom")]
    speedup, _, memory = summarise(records)["targets"]
    assert (speedup["value"], speedup["met"]) == (3.0, True) and (memory["value"], memory["met"]) == (1.2, True)
