"""How a job turns a cell's measurement, or its failure, into the cell's record."""

import pytest
import torch

from harness import job, results
from harness.metrics.base import Measurement

REC = results.Record(suite="s", cell="tiny-hybrid/seed0/pretrained/ruler/vt@512", metric="ruler",
                     model={"preset": "tiny-hybrid"}, settings={"eval_attention": "full", "task": "vt"})


def test_a_measurement_keeps_what_the_cell_said_of_itself_unless_it_says_more():
    rec = job._fill(REC, Measurement(values={"accuracy": 0.5}, settings={"samples": 8}))
    assert rec.settings == {"eval_attention": "full", "task": "vt", "samples": 8}
    assert rec.model == {"preset": "tiny-hybrid"} and rec.values == {"accuracy": 0.5}
    rec = job._fill(REC, Measurement(values={}, settings={"task": "vt2"}, model={"preset": "p", "hash": "k"}))
    assert rec.settings == {"eval_attention": "full", "task": "vt2"} and rec.model == {"preset": "p", "hash": "k"}


@pytest.mark.parametrize("error, status, message", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nsee the allocator's notes"), "oom",
     "CUDA out of memory. Tried to allocate 2 GiB"),
    (MemoryError("host"), "error", "MemoryError: host"),
    (RuntimeError("boom"), "error", "RuntimeError: boom"),
])
def test_a_failed_cell_is_recorded_as_an_oom_only_where_the_device_ran_out(error, status, message):
    rec = job._failed(REC, error)
    assert (rec.status, rec.error, rec.cell) == (status, message, REC.cell)


def test_an_oom_prints_no_traceback_it_is_a_result(capsys):
    try:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    except torch.OutOfMemoryError as e:
        job._print_failure(e)
    assert capsys.readouterr().err == ""


def test_a_measurement_keeps_its_own_time_and_kernel_and_one_process_records_no_ranks(tmp_path, monkeypatch):
    """A fine-tune's cell records its training time (a cached fine-tune's too), not the time the cell took."""
    from types import SimpleNamespace

    from harness.cells import Cell
    from harness.finetune import distributed

    measure = lambda ctx, cell, config: Measurement({}, kernel="se_attn via triton", seconds=123.0)  # noqa: E731
    monkeypatch.setattr(job, "get", lambda name: SimpleNamespace(name=name, ranks=True, measure=measure))
    cell = {**Cell("efficiency", length=8, backend="full").as_dict(), "hash": "h", "code": "c"}
    job._measure_cells(SimpleNamespace(name="s", metrics=SimpleNamespace()), {"out": str(tmp_path), "cells": [cell]},
                       distributed.SINGLE)
    (rec,) = results.load(tmp_path)
    assert (rec.status, rec.seconds, rec.kernel) == ("ok", 123.0, "se_attn via triton") and "ranks" not in rec.settings


@pytest.mark.parametrize("lr, trained", [(None, {"full": 2e-4, "s2_attn": 2e-5}),
                                         ({"default": 1e-4, "s2_attn": 3e-5}, {"full": 1e-4, "s2_attn": 3e-5})])
def test_a_train_record_states_the_lr_its_fine_tune_trained_at(tmp_path, lr, trained):
    """Not the suite's `lr` as written: unset (the paper's LR per backend) or a mapping by backend, which says no
    number, or not the record's backend's."""
    import json
    from types import SimpleNamespace

    from harness.artefacts import finetune_config
    from harness.metrics.plugins.train import Train
    from harness.suite import load_suite

    (tmp_path / "s.yaml").write_text(json.dumps({"name": "s", "backends": ["full", "s2_attn"], "methods": ["lora"],
                                                 "finetune": {"lr": lr}, "metrics": {"efficiency": {"lengths": [8]}}}))
    suite = load_suite(tmp_path / "s.yaml")
    for backend in suite.backends:
        ctx = SimpleNamespace(suite=suite, backend=backend, model=lambda: (None, {"train": {"seconds": 1.0}}))
        lr_recorded = Train().measure(ctx, {}, None).settings["lr"]
        assert lr_recorded == trained[backend.name] == finetune_config(suite, "lora", backend, 0).lr
