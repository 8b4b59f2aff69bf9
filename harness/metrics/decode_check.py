"""A cheap self-check before a generation metric: greedy decoding with the cache equals a cache-free forward.

When a transformers release passes the cache to the model under a name the model does not read, every
decoding step starts from an empty cache: the model sees only its newest token, generation produces garbage
and RULER reads 0% with no error anywhere (transformers 5.24 did this to the hybrid). This check runs a few
greedy steps through `generate` and compares each step's logits with one cache-free forward over the same
tokens; a mismatch fails the cell with a message naming the versions, instead of recording a wrong number.

The check switches the model to full attention for its duration (decoding on a cache attends fully under most
backends; harness.attention.backend): it tests the cache plumbing, not the evaluation backend. The kernels it
runs are left out of the cell's record of what ran.
"""

from __future__ import annotations

import contextlib

import torch
import transformers

PROMPT = ("In the beginning of the long book the travellers met at the old gate of the city, and each of them "
          "told the others the number that the keeper had given him, so that none would forget it on the road.")
PROMPT_TOKENS, NEW_TOKENS = 32, 8
# Largest step error allowed, in standard deviations of the reference logits. The cached and cache-free
# paths round differently (about 1e-6 std in fp32, a few 1e-2 in 16-bit floats); a dropped cache shifts the
# logits by about their whole spread.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_TOLERANCE = 0.25


class CacheMismatchError(RuntimeError):
    """Cached generation disagrees with a cache-free forward: a harness/transformers incompatibility."""


@contextlib.contextmanager
def _full_attention(model):
    from harness.attention import register
    from harness.attention.recording import unrecorded

    before = model.config._attn_implementation
    model.set_attn_implementation(register("full"))
    try:
        with unrecorded():
            yield
    finally:
        model.set_attn_implementation(before)


@torch.inference_mode()
def check_cached_decoding(model, tokenizer) -> float:
    """Raise CacheMismatchError unless `NEW_TOKENS` greedy steps of `model.generate` (with its cache) after
    `PROMPT` give the logits of a cache-free forward over the same tokens; return the largest error (in std
    units of the logits)."""
    param = next(model.parameters())
    ids = torch.tensor([tokenizer.encode(PROMPT, add_special_tokens=False)[:PROMPT_TOKENS]], device=param.device)
    with _full_attention(model):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        cached = torch.stack(out.logits, dim=1)[0].float()  # (steps, vocab), before any logits processor
        full = model(input_ids=out.sequences, use_cache=False).logits[0, ids.shape[1] - 1 : -1].float()
    errors = (cached - full).abs().amax(-1) / full.std(-1).clamp_min(1e-12)
    worst, step = float(errors.max()), int(errors.argmax())
    allowed = TOLERANCE.get(param.dtype, HALF_TOLERANCE)
    if worst > allowed:
        raise CacheMismatchError(
            f"cached greedy decoding disagrees with a cache-free forward of the same tokens (step {step + 1} of "
            f"{NEW_TOKENS}: max logit error {worst:.3g} std, allowed {allowed} for {param.dtype}). The cache is not "
            f"reaching {type(model).__name__}, so generation would score garbage. "
            f"transformers {transformers.__version__}, torch {torch.__version__}: install the pinned versions "
            "(pip install -c constraints.txt ...; nox does this) or report the incompatibility")
    return worst
