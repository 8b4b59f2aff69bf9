"""Built model variants: a fine-tune is a function of the suite and seed, not of the process that ran it."""

import shutil

import pytest
import torch

from harness import artefacts, cache, hardware, results
from harness.errors import UserError
from harness.plan import documents
from harness.suite import load_suite

SUITE = """
name: tiny
methods: [lora]
backends: [full]
pretrain: {context: 64, steps: 2, batch_size: 2, warmup_steps: 1}
finetune: {context: 128, steps: 3, warmup_steps: 1}
metrics:
  perplexity: {contexts: [64]}
"""


def test_finetune_is_reproducible_whatever_the_global_rng_state(tmp_path, monkeypatch):
    (tmp_path / "s.yaml").write_text(SUITE)
    suite = load_suite(tmp_path / "s.yaml")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    artefacts.pretrained(suite, "tiny-hybrid", 0)
    built = []
    for global_seed in (1, 2):
        # The pretrained model comes from the cache and the global RNG starts elsewhere, as in a new process.
        shutil.rmtree(cache.cache_root() / artefacts.ADAPTER, ignore_errors=True)
        torch.manual_seed(global_seed)
        model, info = artefacts.finetuned(suite, "tiny-hybrid", 0, "lora", suite.backends[0],
                                          documents(suite, "train"))
        built.append((model.state_dict(), info["train"]["loss_curve"]))
        assert info["trained_on"] == hardware.describe(results.environment())  # the builder: its CPU, or its GPU
    (a, curve_a), (b, curve_b) = built
    assert curve_a == curve_b
    adapters = [e["what"] for e in cache.entries() if e["kind"] == artefacts.ADAPTER]  # as `harness cache ls` shows
    assert adapters == [f"tiny-hybrid seed 0: lora/full @ {suite.finetune.context}"], adapters
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_fixed_pretrain_seed_shares_one_pretrained_model_over_seeds(tmp_path):
    (tmp_path / "s.yaml").write_text(SUITE + "seeds: [0, 1]\n")
    own = load_suite(tmp_path / "s.yaml")
    assert artefacts.base_info(own, "tiny-hybrid", 0)["hash"] != artefacts.base_info(own, "tiny-hybrid", 1)["hash"]
    (tmp_path / "s.yaml").write_text(SUITE.replace("warmup_steps: 1}", "warmup_steps: 1, seed: 0}", 1)
                                     + "seeds: [0, 1]\n")
    shared = load_suite(tmp_path / "s.yaml")
    assert artefacts.base_info(shared, "tiny-hybrid", 1) == artefacts.base_info(own, "tiny-hybrid", 0)
    a, b = (artefacts.adapter_key(shared, "tiny-hybrid", s, "lora", shared.backends[0],
                                  documents(shared, "train"))[0] for s in (0, 1))
    assert a != b  # the fine-tunes still differ by seed


def test_how_often_a_finetune_checkpoints_is_a_run_setting_outside_its_key(tmp_path):
    (tmp_path / "often.yaml").write_text(SUITE + "run: {checkpoint_every: 1}\n")
    (tmp_path / "s.yaml").write_text(SUITE)
    often, default = (load_suite(tmp_path / f) for f in ("often.yaml", "s.yaml"))
    assert [artefacts.finetune_config(s, s.backends[0], 0).checkpoint_every for s in (often, default)] == [1, 50]
    data = documents(default, "train")
    a, b = (artefacts.adapter_key(s, "tiny-hybrid", 0, "lora", s.backends[0], data)[0] for s in (often, default))
    assert a == b  # the same fine-tune: an interrupted one resumes whichever was set when it stopped


def test_a_finetune_with_spread_recall_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    text = SUITE.replace("finetune: {context: 128, steps: 3, warmup_steps: 1}",
                         "finetune: {context: 256, steps: 2, warmup_steps: 1, recall: 0.5}")
    (tmp_path / "s.yaml").write_text(text)
    suite = load_suite(tmp_path / "s.yaml")
    (tmp_path / "plain.yaml").write_text(text.replace(", recall: 0.5", ""))
    plain = load_suite(tmp_path / "plain.yaml")
    data = documents(suite, "train")
    key, info = artefacts.adapter_key(suite, "tiny-hybrid", 0, "lora", suite.backends[0], data)
    assert key != artefacts.adapter_key(plain, "tiny-hybrid", 0, "lora", plain.backends[0], data)[0]
    assert info["finetune_recall"] == 0.5 and "finetune_recall" not in artefacts.adapter_key(
        plain, "tiny-hybrid", 0, "lora", plain.backends[0], data)[1]
    assert "recall" not in plain.finetune.recipe() and suite.finetune.recipe()["recall"] == 0.5
    _, built = artefacts.finetuned(suite, "tiny-hybrid", 0, "lora", suite.backends[0], data)
    assert len(built["train"]["loss_curve"]) == 2


def test_compiled_pretraining_without_a_compiler_names_the_field_and_the_fix(tmp_path, monkeypatch):
    (tmp_path / "s.yaml").write_text(SUITE.replace("warmup_steps: 1}", "warmup_steps: 1, compile: true}", 1))
    suite = load_suite(tmp_path / "s.yaml")
    assert artefacts.pretrain_config(suite, 0).compile
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(UserError, match=r"pretrain\.compile.*'no-such-compiler'.*compile: false"):
        artefacts.pretrained(suite, "tiny-hybrid", 0)
