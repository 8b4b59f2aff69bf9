"""What scale-out costs on this machine (issue: torchrun / submitit).

1. Fine-tune throughput of the tiny-hybrid preset (LoRA, context 2048, batch 1, a global batch of 2 windows): 1
   process with grad_accum 2 against N gloo processes (torchrun) with grad_accum 2/N. On a 2-core CPU this shows
   the overhead, not a speed-up. Median tokens/s over repeats, after a warm-up step.
2. Wall time of a tiny suite (pretrain 3 steps, perplexity and efficiency cells) through the local runner and
   through `executor: submitit-local`, alternating, each from an empty cache. Median seconds.

    python benchmarks/scale_out.py [--repeats 3] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = """
name: scale
methods: []
backends: [full]
pretrain: {context: 64, steps: 3, batch_size: 2, warmup_steps: 1}
metrics:
  perplexity: {contexts: [64], tokens_per_length: 256, max_tokens: 20000}
  efficiency: {lengths: [64], repeats: 2, warmup: 0}
"""


def fine_tune_tokens_per_s(steps: int, nproc: int) -> float:
    """One timed fine-tune on this process (nproc 1) or as a rank of torchrun's; returns rank 0's tokens/s."""
    import torch

    from harness.data import default_tokenizer
    from harness.finetune.distributed import SINGLE, join, wrap
    from harness.finetune.loop import TrainConfig, train
    from harness.finetune.methods import apply_method
    from harness.models import HybridForCausalLM, preset_config

    world = join("ddp") if nproc > 1 else SINGLE
    config = preset_config("tiny-hybrid")
    config.vocab_size = len(default_tokenizer())
    torch.manual_seed(0)
    model, _ = apply_method(HybridForCausalLM(config), "lora", rank=8, alpha=16)
    model = wrap(model, world)
    windows = world.shard(lambda g, step: torch.randint(0, config.vocab_size, (1, 2048), generator=g))
    train(model, windows, TrainConfig(steps=1, context=2048, grad_accum=2 // nproc, warmup_steps=1), world=world)
    log = train(model, windows, TrainConfig(steps=steps, context=2048, grad_accum=2 // nproc, warmup_steps=1),
                world=world)  # timed after that warm-up step
    if world.size > 1:
        torch.distributed.destroy_process_group()
    return log.tokens_per_s


def _rank(steps: int, nproc: int, result: str) -> None:
    rate = fine_tune_tokens_per_s(steps, nproc)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(result).write_text(json.dumps(rate))


def throughput(repeats: int, steps: int) -> dict[int, list[float]]:
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for nproc in (1, 2):
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [sys.executable, __file__, "--rank", str(steps), str(nproc), f.name]
                if nproc > 1:
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", *cmd[1:]]
                threads = str(max(1, (os.cpu_count() or 1) // nproc))
                subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": threads})
                rates[nproc].append(json.loads(Path(f.name).read_text()))
    return rates


def suite_wall_time(repeats: int) -> dict[str, list[float]]:
    from harness.runner import run_suite

    times: dict[str, list[float]] = {"local": [], "submitit-local": []}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "s.yaml").write_text(SUITE)
        for i in range(repeats):
            for executor in times:
                os.environ["HARNESS_CACHE"] = f"{tmp}/cache-{executor}-{i}"
                t0 = time.perf_counter()
                outcome = run_suite(Path(tmp) / "s.yaml", Path(tmp) / f"out-{executor}-{i}", run={"executor": executor})
                times[executor].append(time.perf_counter() - t0)
                assert not outcome.failed, outcome.failed
    return times


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        _rank(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    rates = throughput(args.repeats, args.steps)
    times = suite_wall_time(args.repeats)
    print(f"\nfine-tune, tiny-hybrid LoRA @ 2048, global batch 2, {args.steps} steps, {args.repeats} repeats:")
    for nproc, r in rates.items():
        runs = ", ".join(f"{x:,.0f}" for x in r)
        print(f"  {nproc} process(es): {statistics.median(r):,.0f} tokens/s (runs: {runs})")
    print(f"tiny suite from an empty cache, {args.repeats} repeats:")
    for executor, t in times.items():
        print(f"  {executor:<15} {statistics.median(t):.1f} s (runs: {', '.join(f'{x:.1f}' for x in t)})")


if __name__ == "__main__":
    main()
