"""Benchmark-only: make the `full` backend about 25% slower on CPU, by doing its work plus one extra no-grad
forward pass, to check that the timing gate flags that backend's cells and no other's. Imported into a timing
worker (`harness compare --inject benchmarks.slow_attention`) or a run (a suite's `plugins:`)."""

import torch

from harness.attention.backends import full

_sdpa = full.SPEC.kernels["sdpa"]


def _slower(q, k, v, scale, opts, plan, mask):
    with torch.no_grad():
        _sdpa(q, k, v, scale, opts, plan, mask)
    return _sdpa(q, k, v, scale, opts, plan, mask)


full.SPEC.kernels["sdpa"] = _slower
