"""Cells whose values are the machine's (efficiency: timings, peaks) are keyed by the hardware they are measured
on: a results directory rerun on another machine, or with another Slurm request, measures them again."""

import pytest

from harness import hardware, results
from harness.errors import UserError
from harness.runner import run_suite
from harness.suite import load_suite

SUITE = """
name: hw
backends: [full]
metrics:
  efficiency: {lengths: [64], repeats: 1, warmup: 0}
"""


def test_efficiency_cells_recorded_on_other_hardware_are_measured_again(tmp_path, isolated_cache, monkeypatch,
                                                                         capsys):
    (tmp_path / "s.yaml").write_text(SUITE)
    out = tmp_path / "out"
    assert run_suite(tmp_path / "s.yaml", out).failed == {}
    (first,) = results.load(out)
    assert first.settings["hardware"] == hardware.this_machine() and hardware.this_machine().startswith("cpu: ")
    assert "PG-19 not configured" not in (out / "index.html").read_text()  # no text was read, none stood in
    capsys.readouterr()
    monkeypatch.setenv("HARNESS_PG19_DIR", str(tmp_path / "nowhere"))  # evaluation data that a timing never reads
    run_suite(tmp_path / "s.yaml", out, dry_run=True)
    shown = capsys.readouterr().out
    assert "  done     attention/full/efficiency@64\n" in shown and "evaluating on" not in shown, shown

    monkeypatch.setattr(hardware, "this_machine", lambda: "cuda: another machine's GPU")
    run_suite(tmp_path / "s.yaml", out, dry_run=True)
    shown = capsys.readouterr().out
    assert "1 measured on other (or unrecorded) hardware (measured again)" in shown, shown
    assert "; timing on cuda: another machine's GPU; results in " in shown, shown
    assert "  moved    attention/full/efficiency@64\n" in shown, shown
    assert run_suite(tmp_path / "s.yaml", out).failed == {}
    (now,) = results.current(results.load(out))
    assert now.settings["hardware"] == "cuda: another machine's GPU" and now.config_hash != first.config_hash


def test_slurm_cells_are_keyed_by_the_request_that_picks_their_nodes(tmp_path):
    (tmp_path / "s.yaml").write_text(SUITE + "run: {executor: slurm, slurm: {partition: gpu, gpus_per_node: 8, "
                                             "additional: {constraint: h100}}}\n")
    run = load_suite(tmp_path / "s.yaml").run
    assert hardware.target(run) == "slurm: partition gpu, 8 GPU(s) per node, 1 CPU(s) per task, constraint h100"
    other = run.model_copy(update={"slurm": run.slurm.model_copy(update={"additional": {"constraint": "a100"}})})
    assert hardware.target(other) != hardware.target(run)


def test_a_cpu_is_named_by_its_model():
    assert hardware.cpu_model() not in ("", "x86_64", "unknown CPU")  # /proc/cpuinfo's model name on Linux
    assert results.environment()["cpu"] == hardware.cpu_model()


def test_a_gpu_machine_is_named_by_its_visible_devices_asked_in_a_fresh_interpreter(monkeypatch):
    import subprocess

    import harness.executors

    asked, run = [], subprocess.run

    def probe(cmd, **kw):  # the real probe, in a fresh interpreter; its answer as a machine with three GPUs
        asked.append(run(cmd, **kw))
        return subprocess.CompletedProcess(cmd, 0, '["NVIDIA H100 80GB HBM3", "NVIDIA A100", "NVIDIA H100 80GB HBM3"]')

    monkeypatch.setattr(harness.executors, "visible_gpus", lambda: 3)
    monkeypatch.setattr(hardware.subprocess, "run", probe)
    assert hardware.this_machine.__wrapped__() == "cuda: NVIDIA A100, 2 x NVIDIA H100 80GB HBM3"
    assert asked[0].returncode == 0 and asked[0].stdout.strip() == "[]", asked[0].stderr  # no GPU here


def test_a_cpu_is_named_by_its_model_name_line_not_its_model_number(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 85\nmodel name\t: Intel(R) Xeon(R) CPU @ "
                    "2.20GHz\n")
    monkeypatch.setattr(hardware, "Path", lambda _: info)
    assert hardware.cpu_model() == "Intel(R) Xeon(R) CPU @ 2.20GHz"


def test_a_recorded_cpu_is_described_with_its_thread_count():
    # torch's intra-op threads set a CPU's speed: two runs with different counts are not on the same device
    assert hardware.describe({"device": "cpu", "cpu": "EPYC", "threads": 2}) == "cpu: EPYC, 2 thread(s)"
    assert hardware.describe({"device": "cuda", "gpu": "NVIDIA H100"}) == "cuda: NVIDIA H100"


def test_a_gpu_machine_whose_devices_cannot_be_named_says_why(monkeypatch):
    import subprocess

    import harness.executors

    monkeypatch.setattr(harness.executors, "visible_gpus", lambda: 1)
    monkeypatch.setattr(hardware.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "RuntimeError: CUDA driver too old"))
    with pytest.raises(UserError, match="could not name this machine's CUDA devices: RuntimeError: CUDA driver"):
        hardware.this_machine.__wrapped__()


def test_a_gpu_probe_that_hangs_says_so(monkeypatch):
    import subprocess

    import harness.executors

    def hang(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(harness.executors, "visible_gpus", lambda: 1)
    monkeypatch.setattr(hardware.subprocess, "run", hang)
    with pytest.raises(UserError, match=r"the probe \(torch.cuda\) did not answer in 120 s; check the GPUs"):
        hardware.this_machine.__wrapped__()
