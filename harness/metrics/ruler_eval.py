"""RULER accuracy of a model: generate samples, decode greedily with the KV cache, score as RULER does."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from harness.data.ruler import generate
from harness.metrics.base import ONE, Ranks
from harness.metrics.decode_check import check_cached_decoding
from harness.metrics.ruler import per_sample, score


@torch.inference_mode()
def evaluate_ruler(model, tokenizer, task: str, length: int, n: int, seed: int, haystack_text: str | None = None,
                   essay_file: str | None = None, qa_file: str | None = None, ranks: Ranks = ONE
                   ) -> tuple[dict, list[dict]]:
    """(values for a Record, one dict per sample: prompt hash, expected, predicted, correct). Every rank of
    `ranks` builds the same samples and decodes its share of them.

    A CacheMismatchError first if cached decoding is broken for this model (harness.metrics.decode_check)."""
    check_cached_decoding(model, tokenizer)
    samples = generate(task, length, tokenizer, n, seed, haystack_text, essay_file=essay_file, qa_file=qa_file)
    device = next(model.parameters()).device
    mine = []
    for s in tqdm(ranks.share(samples), desc=f"ruler {task} @ {length}", unit="sample", mininterval=2.0,
                  disable=ranks.rank != 0):
        # with the tokenizer's special tokens (a Llama BOS), as RULER's HF predictor prompts; lengths count without
        ids = torch.tensor([tokenizer.encode(s.input)], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        mine.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    predictions = ranks.join(ranks.gather(mine))
    references = [s.outputs for s in samples]
    correct = per_sample(task, predictions, references)
    records = [{"prompt_sha256": s.metadata["prompt_sha256"], "depth": s.metadata.get("depth"),
                "expected": s.outputs, "predicted": p, "correct": c}
               for s, p, c in zip(samples, predictions, correct, strict=True)]
    values = {"accuracy": score(task, predictions, references), "samples": len(samples),
              "per_sample": {r["prompt_sha256"]: r["correct"] for r in records},
              "haystack_deviation": samples[0].metadata.get("haystack_deviation")}
    return values, records
