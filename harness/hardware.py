"""Where a run's jobs measure, as one string: part of the hash of the cells whose values depend on the machine
(timings, peak memory), so that a results directory moved to another machine, or rerun with other Slurm
settings, measures them again instead of passing another machine's timings off as this one's.

    cuda: NVIDIA H100 80GB HBM3                      this machine's visible GPUs (local, submitit-local)
    cpu: Intel(R) Xeon(R) CPU @ 2.20GHz, 2 thread(s) this machine's CPU and torch's intra-op threads
    slurm: partition gpu, 8 GPU(s) per node, ...     the allocation's request (its nodes are not known here)

`describe` writes a recorded environment (one job's: its GPU, not the machine's count of them) the same way: a
cached model's meta names the machine that trained it.
"""

from __future__ import annotations

import functools
import json
import platform
import subprocess
import sys
from collections import Counter
from pathlib import Path

from harness.errors import UserError

_GPU_NAMES = "import json, torch; print(json.dumps([torch.cuda.get_device_name(i) for i in " \
             "range(torch.cuda.device_count())]))"


def target(run) -> str:
    """The hardware the jobs of a run with `run` settings (harness.suite.Run) measure on."""
    if run.executor == "slurm":
        s = run.slurm
        request = [f"partition {s.partition or '(default)'}", f"{s.gpus_per_node or 0} GPU(s) per node",
                   f"{s.cpus_per_task or 1} CPU(s) per task"]
        request += [f"{k} {v}" for k, v in sorted(s.additional.items())]
        return "slurm: " + ", ".join(request)
    return this_machine()


@functools.cache
def this_machine() -> str:
    """This machine's visible CUDA devices by name, or its CPU model and torch's thread count."""
    from harness.executors import visible_gpus

    if visible_gpus():
        # a fresh interpreter asks: a CUDA context in the runner would hold GPU memory while its jobs measure
        try:
            probe = subprocess.run([sys.executable, "-c", _GPU_NAMES], capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise UserError("could not name this machine's CUDA devices: the probe (torch.cuda) did not answer in "
                            "120 s; check the GPUs with nvidia-smi") from None
        if probe.returncode != 0:
            raise UserError(f"could not name this machine's CUDA devices: {probe.stderr.strip()[-500:]}")
        names = Counter(json.loads(probe.stdout))
        return "cuda: " + ", ".join(n if k == 1 else f"{k} x {n}" for n, k in sorted(names.items()))
    import torch

    return describe({"cpu": cpu_model(), "threads": torch.get_num_threads()})


def describe(env: dict) -> str:
    """The machine a `harness.results.environment()` dict names, as this_machine writes it: its GPU, or its CPU
    model and threads."""
    if env.get("gpu") or env.get("device") == "cuda":
        return f"cuda: {env.get('gpu') or 'unknown GPU'}"
    return f"cpu: {env.get('cpu') or 'unknown CPU'}, {env.get('threads', '?')} thread(s)"


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
