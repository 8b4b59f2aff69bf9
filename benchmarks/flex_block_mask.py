"""The cost of FlexAttention's block mask for SE-Attn and the sliding window: built from pair counts per tile
(harness.attention.gpu, what the flex kernels use) against `create_block_mask`, which evaluates the mask on the
dense B x H x L x L grid. Each construction runs in a fresh process, so its peak memory is its own.

Prints, per length: median seconds over `--repeats` after one untimed call, and the process's extra peak memory
(CUDA: the allocator's peak; CPU: peak RSS, reset before, over the RSS before), in GiB. `create_block_mask` is
skipped where its dense grid alone would exceed `--dense-limit-gib`.

    python benchmarks/flex_block_mask.py [--lengths 8192 32768] [--heads 32] [--device cpu|cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def one(kind: str, backend: str, length: int, heads: int, device: str, repeats: int) -> dict:
    """Time and peak memory of one construction, in this process."""
    from torch.nn.attention.flex_attention import create_block_mask

    from harness.attention.blockwise import se_attn_select
    from harness.attention.gpu import se_attn_block_mask, se_attn_retrieved, sliding_window_block_mask

    m, s, top_k, window = 2048, 32, 8, 4096
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, 16, generator=g, device=device) for _ in range(3))
    retrieved = se_attn_retrieved(q, *se_attn_select(q, k, v, 0.25, m, s, top_k, "relevancy", True, 0), m, s)
    del q, k, v

    def se_mod(b, h, qi, kj):
        return ((kj // m == qi // m) & (kj <= qi)) | retrieved[b, h, qi // m, kj // s]

    def sw_mod(b, h, qi, kj):
        return (kj <= qi) & (kj > qi - window)

    build = {("counts", "se_attn"): lambda: se_attn_block_mask(retrieved, length, m, s, se_mod),
             ("dense", "se_attn"): lambda: create_block_mask(se_mod, 1, heads, length, length, device=device),
             ("counts", "sliding_window"): lambda: sliding_window_block_mask(length, window, sw_mod, device),
             ("dense", "sliding_window"): lambda: create_block_mask(sw_mod, None, None, length, length,
                                                                     device=device)}[kind, backend]
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()  # else the peak would be the retrieval's above, not the construction's
        before = _rss_gib()
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        mask = build()
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        del mask
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else _peak_rss_gib() - before
    return {"kind": kind, "backend": backend, "length": length, "seconds": statistics.median(times),
            "peak_gib": round(peak, 3)}


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def _reset_peak_rss() -> None:
    """Set the process's peak RSS (VmHWM) to its current RSS (Linux: 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_gib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-limit-gib", type=float, default=8.0)
    ap.add_argument("--one", nargs=3, metavar=("KIND", "BACKEND", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, backend, length = args.one
        print(json.dumps(one(kind, backend, int(length), args.heads, args.device, args.repeats)))
        return
    print(f"{'backend':<15} {'length':>7} {'counts s':>9} {'GiB':>6} {'dense s':>9} {'GiB':>6}   "
          f"({args.heads} heads, {args.device})")
    for backend in ("se_attn", "sliding_window"):
        for length in args.lengths:
            row = {}
            for kind in ("counts", "dense"):
                grid = (args.heads if backend == "se_attn" else 1) * length**2 / 2**30  # bool bytes
                if kind == "dense" and grid > args.dense_limit_gib:
                    row[kind] = None
                    continue
                out = subprocess.run([sys.executable, __file__, "--one", kind, backend, str(length), "--heads",
                                      str(args.heads), "--device", args.device, "--repeats", str(args.repeats)],
                                     capture_output=True, text=True, check=True).stdout
                row[kind] = json.loads(out.strip().splitlines()[-1])
            skipped = f"(grid > {args.dense_limit_gib:g} GiB)"
            cells = [f"{r['seconds']:>9.3f} {r['peak_gib']:>6.2f}" if r else f"{skipped:>16}"
                     for r in (row["counts"], row["dense"])]
            print(f"{backend:<15} {length:>7} {cells[0]} {cells[1]}", flush=True)


if __name__ == "__main__":
    main()
