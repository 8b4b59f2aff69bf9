"""The built-in metrics, one plugin module each (harness.metrics.base); `BUILTIN` is their report order."""

BUILTIN = ("perplexity", "ruler", "lm_eval", "efficiency", "train")
