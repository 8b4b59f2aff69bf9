"""Perplexity against context length (harness.metrics.perplexity): one cell per evaluation context."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from harness.cells import Cell
from harness.metrics.base import (
    EVAL_DATA,
    EvalAttention,
    Measurement,
    Metric,
    Strict,
    distinct,
    eval_attentions,
    register,
)


class PerplexityConfig(Strict):
    protocol: Literal["longlora", "stride"] = "longlora"
    contexts: list[int] = Field(default_factory=lambda: [256, 512, 1024, 2048, 4096], min_length=1)
    # Windows per length = max(1, tokens_per_length // context), evenly spaced over the stream, so every
    # length scores about the same number of tokens (a fixed window count starves the short contexts).
    tokens_per_length: int = Field(65_536, ge=1)
    max_tokens: int = Field(1_000_000, ge=1)  # evaluation stream cap (first tokens of the split)
    eval_attention: EvalAttention = "full"  # paper default: full; "both": also the fine-tuning attention

    @field_validator("contexts")
    @classmethod
    def _at_least_two(cls, v: list[int]) -> list[int]:
        if any(c < 2 for c in v):
            raise ValueError("every context must be >= 2")
        return distinct(v)

    @model_validator(mode="after")
    def _fits_the_stream(self) -> PerplexityConfig:
        if max(self.contexts) > self.max_tokens:
            raise ValueError(f"contexts: {max(self.contexts)} is longer than the evaluation stream (max_tokens "
                             f"{self.max_tokens}); raise max_tokens or drop the length")
        return self


PER_BYTE_UNITS = {"bits_per_byte": "bits/byte", "bytes_per_token": "bytes/token"}


def suspect(res, windows: int, config: PerplexityConfig, vocab_size: int | None) -> list[str]:
    """What makes a perplexity one to read with care: fewer windows scored than asked for (the stream is too
    short at this context), or a value above the vocabulary's size (worse than guessing uniformly)."""
    out = []
    if res.windows < windows:
        out.append(f"scored {res.tokens_scored} tokens in {res.windows} window(s) of the {windows} that "
                   f"tokens_per_length {config.tokens_per_length} asks for at {res.context}: the evaluation stream "
                   "holds no more, so this value is noisier than the others; fix: a longer corpus (data.eval, or "
                   "max_tokens) or a shorter context")
    if vocab_size and res.perplexity > vocab_size:
        out.append(f"perplexity {res.perplexity:.4g} is above the vocabulary's {vocab_size} tokens: worse than "
                   "guessing uniformly. An untrained model, or text it misreads: check that the tokenizer is the "
                   "model's own")
    return out


@register
class Perplexity(Metric):
    name = "perplexity"
    config = PerplexityConfig
    modules = ("harness.metrics.perplexity", *EVAL_DATA)
    ranks = True

    def cells(self, config: PerplexityConfig, variant, plan):
        hashed = {"metric": config.model_dump(exclude={"contexts", "eval_attention"}), "data": plan.data_fingerprint}
        return [(Cell(self.name, variant, c, eval_attention=ev), hashed)
                for ev in eval_attentions(config, variant) for c in config.contexts]

    def measure(self, ctx, cell: dict, config: PerplexityConfig) -> Measurement:
        from harness.data.tokenizer import text_bytes
        from harness.metrics.perplexity import evaluate_perplexity

        model, info = ctx.model()
        ctx.use_attention(cell["eval_attention"])
        stream, dataset = ctx.eval_stream(config.max_tokens)
        windows = max(1, config.tokens_per_length // cell["length"])
        res = evaluate_perplexity(model, stream, cell["length"], config.protocol, max_windows=windows, progress=True,
                                  ranks=ctx.ranks)
        settings = {**res.as_settings(), "max_windows": windows, "eval_attention": cell["eval_attention"],
                    "pretrain_context": ctx.pretrain_context, "seed": ctx.seed}
        # Per byte, models with different tokenizers compare: the NLL in bits over the UTF-8 bytes of the scored
        # tokens' text. Counted window by window: the stream's bytes per token is not the windows' (on PG-19, 1.3%
        # off at 4K with 16 windows, which moved bits per byte as much as a fine-tune does)
        tok = ctx.tokenizer()
        scored_bytes = sum(text_bytes(tok, stream[a:b]) for a, b in res.scored_spans)
        per_byte = {"bits_per_byte": res.nll / math.log(2) * res.tokens_scored / scored_bytes,
                    "bytes_per_token": scored_bytes / res.tokens_scored} if scored_bytes else {}
        units = {**res.units(), **{k: PER_BYTE_UNITS[k] for k in per_byte}}
        return Measurement({**res.as_values(), **per_byte}, units, settings, dataset, info,
                           warnings=suspect(res, windows, config, getattr(model.config, "vocab_size", None)))

    def section(self, records):
        from harness.report.html import perplexity_section

        return perplexity_section(records)
