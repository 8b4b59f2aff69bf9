"""RULER evaluation: KV-cache greedy generation equals a cache-free greedy decode, on our hybrid and on Llama;
the self-check before generation metrics passes on working models and fails a cell whose cache is dropped."""

import pytest
import torch
import transformers

from harness.attention import recording, register
from harness.data import default_tokenizer
from harness.data.ruler import generate
from harness.finetune.methods import apply_method
from harness.metrics.decode_check import CacheMismatchError, check_cached_decoding
from harness.metrics.ruler_eval import evaluate_ruler
from harness.models import HybridForCausalLM, preset_config

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


def test_prompts_carry_the_tokenizers_special_tokens_as_rulers_do():
    # RULER's HF predictor calls tokenizer(prompt), which puts a Llama tokenizer's BOS first; lengths count without
    from tokenizers import Tokenizer, processors

    base = default_tokenizer()
    backend = Tokenizer.from_str(base.backend_tokenizer.to_str())
    bos = base.eos_token_id  # the tokenizer's one special token, as the BOS of this Llama-like tokenizer
    backend.post_processor = processors.TemplateProcessing(single=f"{base.eos_token} $A",
                                                           special_tokens=[(base.eos_token, bos)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=base.eos_token,
                                               pad_token=base.eos_token)
    model, prompts = _hybrid().eval(), []
    generate_ = model.generate
    model.generate = lambda input_ids, **kw: prompts.append(input_ids[0].tolist()) or generate_(input_ids, **kw)
    evaluate_ruler(model, tok, "niah_single_1", LENGTH, N, seed=0)
    samples = generate("niah_single_1", LENGTH, tok, N, 0)
    assert prompts[-N:] == [[bos, *tok.encode(s.input, add_special_tokens=False)] for s in samples]  # after the check


def test_a_dropped_cache_fails_the_check_even_when_the_first_token_is_eos(drop_cache):
    """The check decodes all its steps: stopped at an end-of-text token, it would compare only the first, which
    the prompt's forward gives whatever the cache does."""
    from harness.metrics.decode_check import PROMPT, PROMPT_TOKENS

    torch.manual_seed(0)
    model, tok = drop_cache(_llama().eval()), default_tokenizer()
    ids = torch.tensor([tok.encode(PROMPT, add_special_tokens=False)[:PROMPT_TOKENS]])
    with torch.inference_mode():
        model.generation_config.eos_token_id = int(model(input_ids=ids).logits[0, -1].argmax())
    with pytest.raises(CacheMismatchError):
        check_cached_decoding(model, tok)

@pytest.mark.parametrize("dtype, scale, fails", [(torch.float32, 2e-2, True), (torch.float32, 2e-3, True),
                                                (torch.float32, 1e-5, False), (torch.bfloat16, 1.0, True),
                                                (torch.bfloat16, 0.4, True), (torch.bfloat16, 0.1, False)])
def test_a_single_logit_off_by_more_than_the_tolerance_fails_the_check(dtype, scale, fails):
    # one logit of one step off by `scale` standard deviations of the step's logits: fp32 allows 1e-3, 16-bit 0.25
    # (the unaltered model's error is 0 in both on the CPU)
    torch.manual_seed(0)
    model = _llama().eval().to(dtype)
    generate_ = model.generate

    def off_by_one_logit(*args, **kw):
        out = generate_(*args, **kw)
        logits = list(out.logits)
        logits[3] = logits[3].clone()
        logits[3][0, 7] += scale * logits[3].float().std()
        out.logits = tuple(logits)
        return out

    model.generate = off_by_one_logit
    if fails:
        with pytest.raises(CacheMismatchError, match=r"step 4 of 8"):
            check_cached_decoding(model, default_tokenizer())
    else:
        assert check_cached_decoding(model, default_tokenizer()) == pytest.approx(scale, rel=0.1)


def test_on_two_ranks_each_decodes_its_share_and_the_records_keep_the_samples_order():
    from harness.metrics.base import Ranks

    torch.manual_seed(0)
    model, tok = _llama().eval(), default_tokenizer()
    samples = generate("niah_single_1", LENGTH, tok, 3, 0)
    other = [samples[1].outputs[0]]  # rank 1's share (sample 1): a correct answer
    values, records = evaluate_ruler(model, tok, "niah_single_1", LENGTH, 3, seed=0,
                                     ranks=Ranks(0, 2, gather=lambda part: [part, other]))
    assert values["samples"] == len(records) == 3
    assert [r["prompt_sha256"] for r in records] == [s.metadata["prompt_sha256"] for s in samples]
    assert [r["depth"] for r in records] == [s.metadata["depth"] for s in samples]
    assert records[1]["predicted"] == other[0] and records[1]["correct"] == 1.0
    assert values["per_sample"] == {r["prompt_sha256"]: r["correct"] for r in records}
    assert values["accuracy"] == round(100 * sum(r["correct"] for r in records) / 3, 2)


def test_a_prediction_ends_at_the_tokenizers_eos_and_leaves_it_out():
    # a model that answers eos first, and after an eos some other token: the prediction is empty, neither the eos
    # text nor what a decoder that did not stop there would go on with
    torch.manual_seed(0)
    model, tok = _llama().eval(), default_tokenizer()
    eos, other = tok.eos_token_id, tok.encode("7", add_special_tokens=False)[0]
    forward = model.forward

    def eos_then_other(*args, **kw):
        out = forward(*args, **kw)
        ids = kw["input_ids"][:, -out.logits.shape[1]:]
        out.logits.scatter_(-1, torch.where(ids == eos, other, eos)[..., None], 1e4)
        return out

    model.forward = eos_then_other
    book = "The grass is green. The sky is blue. " * 200  # an essay haystack of book text: a deviation, recorded
    values, records = evaluate_ruler(model, tok, "niah_single_2", LENGTH, 1, seed=0, haystack_text=book)
    assert [r["predicted"] for r in records] == [""] and values["accuracy"] == 0.0
    assert values["haystack_deviation"] == "book text instead of Paul Graham essays"
