"""Metrics: perplexity, RULER (scoring, evaluation), lm-eval, and the decoding self-check; one module each.

The perplexity names are imported lazily so that ``import harness.metrics.<sibling>`` does not pull in torch.
"""

from __future__ import annotations

__all__ = ["PROTOCOLS", "PerplexityResult", "Protocol", "evaluate_perplexity"]


def __getattr__(name: str):
    if name in __all__:
        from harness.metrics import perplexity

        return getattr(perplexity, name)
    raise AttributeError(f"module 'harness.metrics' has no attribute {name!r}")
