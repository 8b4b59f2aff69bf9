"""Speed/memory of attention backends: forward+backward of one attention call on random q, k, v.

Time is the median over `repeats` timed runs after `warmup` untimed ones (CUDA events on GPU,
time.perf_counter on CPU). Peak memory is the allocator's peak during one forward+backward, in GiB: on CUDA its
own counter over the first timed run; on CPU, which keeps no such counter, what q, k and v hold plus the most
that one more, untimed, run held at once beyond them, from the memory events of torch's profiler. Not a test:
numbers depend on the machine.

Each row also counts the query-key pairs the backend's pattern holds (Spec.pairs) and the limit they set: the
speed-up over dense causal attention that a kernel doing only those pairs, as fast per pair, would reach.

A backend whose training calls each draw one of several chunk sizes (se_attn with a set of them) holds the mean of
the sizes' pairs; so each of its repeats is one call of every size, timed as their mean (a training call's expected
time), and its peak is the largest size's. Timing the draws instead, the median of a few repeats is the time of
whichever size most of them drew, set against the limit of the mean.
"""

import contextlib
import os
import statistics
import time

import torch

from .backend import Backend
from .spec import triangle


def _one(backend: Backend, q, k, v):
    for t in (q, k, v):
        t.grad = None
    out, kernel = backend(q, k, v, training=True)
    out.backward(torch.ones_like(out))
    return kernel


def _timed(backend: Backend, q, k, v, device) -> tuple[float, str]:
    """(seconds, kernel string) of one forward+backward."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        kernel = _one(backend, q, k, v)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3, kernel
    t0 = time.perf_counter()
    kernel = _one(backend, q, k, v)
    return time.perf_counter() - t0, kernel


def _cpu_peak_gib(backend: Backend, q, k, v) -> float:
    """What q, k and v hold plus the most one forward+backward held at once beyond them, in GiB (the same as the
    CUDA allocator's peak over a run, counted from the profiler's allocation and free events)."""
    from torch.profiler import ProfilerActivity, profile

    for t in (q, k, v):
        t.grad = None  # freed before the profile: a free of a block allocated outside it has no size there
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _one(backend, q, k, v)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()  # negative for a free
        peak = max(peak, held)
    return (sum(t.untyped_storage().nbytes() for t in (q, k, v)) + peak) / 2**30


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null: the profiler's C++ side logs two lines per profile there, whatever the
    log level (the call ran unprofiled before, so its warnings were seen)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def bench_attention(backends: list[tuple[str, dict]], lengths: list[int], heads: int = 4, head_dim: int = 32,
                    batch: int = 1, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    repeats: int = 5, warmup: int = 1, kv_heads: int | None = None, seed: int = 0) -> list[dict]:
    """One row per (backend, length): backend, options, length, kernel, time_ms (median), times_ms, peak_gib,
    pairs (query-key pairs of one forward over the batch and heads) and ideal_speedup (dense causal pairs / pairs)."""
    device = torch.device(device)
    rows = []
    for name, options in backends:
        impl = Backend(name, **options)
        draws = [Backend(name, **{**options, **choice}) for choice in draw_choices(impl)]
        for length in lengths:
            g = torch.Generator().manual_seed(seed)

            def rand(h, g=g, length=length):
                x = torch.randn(batch, h, length, head_dim, generator=g, dtype=torch.float32)
                return x.to(device=device, dtype=dtype).requires_grad_()

            q, k, v = rand(heads), rand(kv_heads or heads), rand(kv_heads or heads)
            kernel = None
            for _ in range(warmup):
                for one in draws:
                    kernel = _one(one, q, k, v)
            times = []
            peak = None
            for i in range(repeats):
                if device.type == "cuda" and i == 0:
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                took = []
                for one in draws:
                    seconds, kernel = _timed(one, q, k, v, device)
                    took.append(seconds)
                times.append(statistics.fmean(took))
                if device.type == "cuda" and i == 0:
                    peak = torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cpu":
                peak = max(_cpu_peak_gib(one, q, k, v) for one in draws)
            pairs = batch * impl.spec.pairs(impl.options, length, heads)
            rows.append({"backend": name, "options": dict(options), "length": length, "heads": heads,
                         "head_dim": head_dim, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
                         "device": str(device), "kernel": kernel, "time_ms": statistics.median(times) * 1e3,
                         "times_ms": [t * 1e3 for t in times], "peak_gib": peak, "pairs": pairs,
                         "ideal_speedup": batch * heads * triangle(length) / pairs})
    return rows


def draw_choices(impl: Backend) -> list[dict]:
    """The per-call choices impl's training calls draw among uniformly, as option overrides (se_attn with several
    chunk sizes: one per size, whose pairs' mean is impl's); [{}] for a backend that draws none."""
    sizes = impl.options.get("chunk_size") if impl.name == "se_attn" else None
    return [{"chunk_size": m} for m in sizes] if isinstance(sizes, tuple) else [{}]


def format_rows(rows: list[dict]) -> str:
    """A table of the rows; where the run holds a `full` row at the length, the measured speed-up over it, the
    limit (ideal_speedup) and their ratio, the fraction of the limit."""
    dense = {r["length"]: r["time_ms"] for r in rows if r["backend"] == "full"}
    lines = [f"{'backend':<16} {'length':>7} {'ms':>10} {'peak GiB':>9} {'speed-up':>9} {'limit':>7} "
             f"{'of limit':>9}  kernel"]
    for r in rows:
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.3f}"
        speedup = dense[r["length"]] / r["time_ms"] if r["length"] in dense else None
        shown = ("–", "–") if speedup is None else (f"{speedup:.2f}x", f"{speedup / r['ideal_speedup']:.0%}")
        lines.append(f"{r['backend']:<16} {r['length']:>7} {r['time_ms']:>10.1f} {peak:>9} {shown[0]:>9} "
                     f"{r['ideal_speedup']:>6.2f}x {shown[1]:>9}  {r['kernel']}")
    return "\n".join(lines)
