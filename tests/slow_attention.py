"""Test-only: make the `full` backend about 25% slower by doing its work plus a fixed extra matmul, to check that
the timing gate flags that backend's cells and no other's. Imported into a timing worker (`--inject`) or a run
(a suite's `plugins:`)."""

import torch

from harness.attention.backends import full

_sdpa = full.SPEC.kernels["sdpa"]
EXTRA = 1  # extra q @ k^T products per call; one is about a quarter of a forward+backward of full attention on CPU


def _slower(q, k, v, scale, opts, plan, mask):
    with torch.no_grad():
        for _ in range(EXTRA):
            torch.matmul(q, k.transpose(-1, -2))
    return _sdpa(q, k, v, scale, opts, plan, mask)


full.SPEC.kernels["sdpa"] = _slower
