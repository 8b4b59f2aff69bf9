"""RULER evaluation: KV-cache greedy generation equals a cache-free greedy decode, on our hybrid and on Llama."""

import pytest
import torch
import transformers

from harness.data import default_tokenizer
from harness.data.ruler import generate
from harness.metrics.ruler_eval import evaluate_ruler
from harness.models import HybridForCausalLM, preset_config

pytestmark = pytest.mark.usefixtures("one_thread")
LENGTH, N = 320, 2


def _hybrid():
    cfg = preset_config("tiny-hybrid")
    cfg.vocab_size = len(default_tokenizer())
    return HybridForCausalLM(cfg)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=len(default_tokenizer()), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(cfg)


@torch.inference_mode()
def _greedy_without_cache(model, ids: list[int], max_new: int, eos: int) -> list[int]:
    out = []
    for _ in range(max_new):
        nxt = int(model(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
    return out


@pytest.mark.parametrize("build", [_hybrid, _llama], ids=["hybrid", "llama"])
def test_generation_and_records(build):
    torch.manual_seed(0)
    model, tok = build().eval(), default_tokenizer()
    values, records = evaluate_ruler(model, tok, "niah_single_1", LENGTH, N, seed=0)
    samples = generate("niah_single_1", LENGTH, tok, N, 0)
    assert values["samples"] == N and len(records) == N and 0 <= values["accuracy"] <= 100
    for sample, rec in zip(samples, records, strict=True):
        assert rec["prompt_sha256"] == sample.metadata["prompt_sha256"] and rec["expected"] == sample.outputs
        ids = tok.encode(sample.input, add_special_tokens=False)
        reference = _greedy_without_cache(model, ids, sample.max_new_tokens, tok.eos_token_id)
        assert rec["predicted"] == tok.decode(reference, skip_special_tokens=True)
        assert rec["correct"] == float(sample.outputs[0].lower() in rec["predicted"].lower())
