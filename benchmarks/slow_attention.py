"""Benchmark-only: make the `full` backend 25% slower, to check that the timing gate flags that backend's cells and
no other's. Its kernel does the same work and then as much again busy-spinning: a quarter of the time its forward
took, and in the backward a quarter of the time the backward through it took, at every length. Imported into a
timing worker (`harness compare --inject benchmarks.slow_attention`) or a run (a suite's `plugins:`)."""

import time

import torch

from harness.attention.backends import full

_sdpa = full.SPEC.kernels["sdpa"]
SLOWDOWN = 0.25


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class _Enter(torch.autograd.Function):
    """Identity on the inputs; in the backward (reached last) it spins for a quarter of the backward's time."""

    @staticmethod
    def forward(ctx, clock, q, k, v):
        ctx.clock = clock
        return q.view_as(q), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, gq, gk, gv):
        _spin(SLOWDOWN * (time.perf_counter() - ctx.clock["backward"]))
        return None, gq, gk, gv


class _Leave(torch.autograd.Function):
    """Identity on the output; its backward (reached first) starts the backward's clock."""

    @staticmethod
    def forward(ctx, clock, out):
        ctx.clock = clock
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.clock["backward"] = time.perf_counter()
        return None, grad


def _slower(q, k, v, scale, opts, plan, mask):
    clock = {}
    q, k, v = _Enter.apply(clock, q, k, v)
    t0 = time.perf_counter()
    out = _sdpa(q, k, v, scale, opts, plan, mask)
    _spin(SLOWDOWN * (time.perf_counter() - t0))
    return _Leave.apply(clock, out)


full.SPEC.kernels["sdpa"] = _slower
