"""Whether a planned cell is done: its current record against the cell's settings hash and code fingerprint."""

import pytest

from harness.plan import cell_state, to_measure
from harness.results import Record

CELL = {"id": "tiny-hybrid/seed0/pretrained/ppl@64", "hash": "h1", "code": "c1"}
TIMED = {**CELL, "id": "attention/full/efficiency@64", "hardware": "cpu: EPYC x2"}


def record(config_hash="h1", fingerprint="c1", status="ok", **settings):
    return Record(suite="s", cell=CELL["id"], metric="perplexity", status=status, config_hash=config_hash,
                  code={"fingerprint": fingerprint}, settings=settings)


@pytest.mark.parametrize("cell, rec, state", [
    (CELL, None, "todo"),
    (CELL, record(), "done"),
    (CELL, record(status="oom"), "failed"),  # an OOM at one length is a result, kept
    (CELL, record(status="error"), "failed"),
    (CELL, record(config_hash="h0"), "changed"),
    (CELL, record(config_hash="h0", status="oom"), "changed"),  # new settings: a failure under old ones is no result
    (CELL, record(fingerprint="c0"), "stale"),
    (CELL, record(fingerprint="c0", status="error"), "stale"),
    (TIMED, record(config_hash="h0", hardware="gpu: H100"), "moved"),
    (TIMED, record(config_hash="h0"), "moved"),  # recorded without hardware
    (TIMED, record(config_hash="h0", hardware="cpu: EPYC x2"), "changed"),  # same machine: its settings changed
    (TIMED, record(config_hash="h0", fingerprint="c0", hardware="gpu: H100"), "moved"),  # moved says more than stale
], ids=["never", "done", "oom", "error", "changed", "changed-failed", "stale", "stale-failed", "moved",
        "moved-unrecorded", "changed-same-hardware", "moved-and-stale"])
def test_cell_state_compares_the_current_record_with_the_cell(cell, rec, state):
    assert cell_state(cell, rec) == state


@pytest.mark.parametrize("state", ["todo", "changed", "stale", "moved"])
def test_cells_not_measured_as_they_are_planned_are_measured(state):
    assert to_measure(state, retry_failed=False) and to_measure(state, retry_failed=True)


def test_done_cells_are_kept_and_failed_ones_measured_only_with_retry_failed():
    assert not to_measure("done", retry_failed=False) and not to_measure("done", retry_failed=True)
    assert not to_measure("failed", retry_failed=False) and to_measure("failed", retry_failed=True)


SUITE = """name: x
backends: [full]
pretrain: {context: 64, steps: 2, batch_size: 2, warmup_steps: 1}
finetune: {context: 128, steps: 3, warmup_steps: 1}
metrics:
  perplexity: {contexts: [64]}
"""


def hashes(tmp_path, text=SUITE):
    from harness.plan import plan
    from harness.suite import load_suite

    (tmp_path / "s.yaml").write_text(text)
    return {c["id"]: c["hash"] for j in plan(load_suite(tmp_path / "s.yaml"), "data", "train") for c in j.cells}


def test_cell_hashes_stay_as_they_were_recorded(tmp_path):
    """A cell's hash is compared with the one its record holds: a change to how hashes are made (a field added to
    what is hashed, a default hashed that was not) turns every recorded cell of every study into one to measure
    again. Where that is meant, update these."""
    assert hashes(tmp_path) == {
        "tiny-hybrid/seed0/pretrain": "15877945ac28be9d",
        "tiny-hybrid/seed0/pretrained/ppl@64": "c749414168a2e2b3",
        "tiny-hybrid/seed0/lora/full/train": "b5804dbdc968b7f5",
        "tiny-hybrid/seed0/lora/full/ppl@64": "c4f78986220eb4a0",
    }


def test_a_fixed_pretrain_seed_moves_the_cells_of_the_models_it_trains(tmp_path):
    unset = hashes(tmp_path)
    fixed = hashes(tmp_path, SUITE.replace("warmup_steps: 1}", "warmup_steps: 1, seed: 7}", 1))
    assert unset.keys() == fixed.keys() and all(unset[c] != fixed[c] for c in unset)


def test_a_checkpoints_content_is_in_the_hash_of_each_of_its_cells(tmp_path):
    """Another checkpoint under the same name (a new revision, retrained weights) measures every cell again."""
    from harness.plan import plan
    from harness.suite import load_suite

    (tmp_path / "s.yaml").write_text(SUITE + "models: [{name: m, path: /ckpt/m}]\n")
    suite = load_suite(tmp_path / "s.yaml")
    a, b = ({c["id"]: c["hash"] for j in plan(suite, "data", "train", {"m": fingerprint}) for c in j.cells}
            for fingerprint in ("weights-1", "weights-2"))
    assert a.keys() == b.keys() == {"m/seed0/pretrained/ppl@64", "m/seed0/lora/full/train", "m/seed0/lora/full/ppl@64"}
    assert all(a[c] != b[c] for c in a)


def test_a_suite_that_times_attention_alone_plans_no_model(tmp_path):
    """Efficiency cells time attention layers on random tensors: no pretraining, no fine-tune, no model job."""
    from harness.plan import plan
    from harness.suite import load_suite

    (tmp_path / "s.yaml").write_text(SUITE.replace("perplexity: {contexts: [64]}", "efficiency: {lengths: [64]}"))
    assert [(j.kind, j.name) for j in plan(load_suite(tmp_path / "s.yaml"), "data", "train")] == [
        ("backend", "attention/full")]


def test_a_fine_tunes_own_cell_comes_first_in_its_job(tmp_path):
    """Its record is written as soon as the fine-tuning ends, before an evaluation that may crash the job."""
    from harness.plan import plan
    from harness.suite import load_suite

    (tmp_path / "s.yaml").write_text(SUITE)
    (job,) = [j for j in plan(load_suite(tmp_path / "s.yaml"), "data", "train") if j.spec.get("stage") == "finetuned"]
    assert [c["metric"] for c in job.cells] == ["train", "perplexity"]


def test_efficiency_cell_hashes_stay_as_they_were_recorded(tmp_path, monkeypatch):
    """As test_cell_hashes_stay_as_they_were_recorded, for an attention backend's cells on a given machine."""
    from harness import hardware

    monkeypatch.setattr(hardware, "this_machine", lambda: "cpu: EPYC x2")
    assert hashes(tmp_path, SUITE.replace("perplexity: {contexts: [64]}", "efficiency: {lengths: [64]}")) == {
        "attention/full/efficiency@64": "d2819aec6d7716c7",
    }


def test_a_suite_without_a_backend_metric_plans_no_attention_job(tmp_path):
    from harness.plan import plan
    from harness.suite import load_suite

    (tmp_path / "s.yaml").write_text(SUITE)
    jobs = plan(load_suite(tmp_path / "s.yaml"), "data", "train")
    assert [j.kind for j in jobs] == ["pretrain", "variant", "variant"]
