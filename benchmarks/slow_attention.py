"""Benchmark-only: make the `full` backend 25% slower, to check that the timing gate flags that backend's cells and
no other's. Each of its kernels (sdpa, flash: whichever runs) does the same work and then busy-spins: a quarter of
the time its forward took, and in the backward a quarter of the time the backward through it took, at every length.
On CUDA the clock is read after a synchronize, so it times the device's work, not the launch, and the spin holds
back the next launch. Imported into a timing worker (`harness compare --inject benchmarks.slow_attention`) or a
run (a suite's `plugins:`)."""

import time

import torch

from harness.attention.backends import full

SLOWDOWN = 0.25


def _now(x: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


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
        _spin(SLOWDOWN * (_now(gq) - ctx.clock["backward"]))
        return None, gq, gk, gv


class _Leave(torch.autograd.Function):
    """Identity on the output; its backward (reached first) starts the backward's clock."""

    @staticmethod
    def forward(ctx, clock, out):
        ctx.clock = clock
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.clock["backward"] = _now(grad)
        return None, grad


def _slower(kernel):
    def slower(q, k, v, scale, opts, plan, mask):
        clock = {}
        q, k, v = _Enter.apply(clock, q, k, v)
        t0 = _now(q)
        out = kernel(q, k, v, scale, opts, plan, mask)
        _spin(SLOWDOWN * (_now(out) - t0))
        return _Leave.apply(clock, out)

    return slower


for _name, _kernel in list(full.SPEC.kernels.items()):
    full.SPEC.kernels[_name] = _slower(_kernel)
