"""Built model variants: a fine-tune is a function of the suite and seed, not of the process that ran it."""

import shutil

import pytest
import torch

from harness import artefacts, cache
from harness.plan import documents
from harness.suite import load_suite

pytestmark = pytest.mark.usefixtures("one_thread")

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
    (a, curve_a), (b, curve_b) = built
    assert curve_a == curve_b
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
