"""The self-check before generation metrics: it passes on working models and fails a cell whose cache is dropped."""

import pytest
import torch
import transformers

from harness.attention import recording, register
from harness.data import default_tokenizer
from harness.finetune.methods import apply_method
from harness.metrics.decode_check import CacheMismatchError, check_cached_decoding
from harness.metrics.ruler_eval import evaluate_ruler
from harness.models import HybridForCausalLM, preset_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _hybrid():
    cfg = preset_config("tiny-hybrid")
    cfg.vocab_size = len(default_tokenizer())
    return HybridForCausalLM(cfg)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=len(default_tokenizer()), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("build", [_hybrid, _llama], ids=["hybrid", "llama"])
def test_working_cache_passes(build):
    torch.manual_seed(0)
    assert check_cached_decoding(build().eval(), default_tokenizer()) < 1e-4


def test_passes_on_a_lora_model_under_another_backend_restores_it_and_records_no_kernel():
    torch.manual_seed(0)
    model, _ = apply_method(_hybrid(), "lora", rank=4, alpha=8)
    name = register("sliding_window", window=16)  # prefill 32 > 16: cached decoding (full) would differ
    model.set_attn_implementation(name)
    with recording() as kernels:
        assert check_cached_decoding(model.eval(), default_tokenizer()) < 1e-4
    assert model.config._attn_implementation == name and kernels == set()


@pytest.mark.parametrize("build", [_hybrid, _llama], ids=["hybrid", "llama"])
def test_dropped_cache_fails_the_ruler_cell(build, drop_cache):
    torch.manual_seed(0)
    model = drop_cache(build().eval())
    with pytest.raises(CacheMismatchError, match=rf"transformers {transformers.__version__}.*constraints"):
        evaluate_ruler(model, default_tokenizer(), "niah_single_1", 320, 1, seed=0)
