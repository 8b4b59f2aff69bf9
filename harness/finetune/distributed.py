"""Fine-tuning on several processes with torchrun (torch.distributed.run): DDP, or FSDP2 with one unit per decoder
block.

With `run.nproc` > 1 a job whose adapter is not cached launches
`python -m torch.distributed.run --standalone --nproc-per-node N -m harness.finetune.distributed SPEC.json`; every
rank builds the same base and method, reads its share of each global batch (`World.shard`), and rank 0 alone
writes the adapter into the cache. The job then evaluates the variant on as many ranks (harness.job).

The global batch is batch_size x grad_accum x nproc micro-batches; every rank draws all of them from the same
generator and keeps its own, so changing nproc at the same global batch trains on the same windows, in the same
steps, with the same gradients up to the order of the sums.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import UserError

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class World:
    """This process's place among the fine-tune's processes (the default: one process, no process group)."""

    rank: int = 0
    size: int = 1
    strategy: str = "ddp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float, device: torch.device) -> float:
        """The mean of `value` over the ranks."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.item() / self.size

    def sync(self, model: torch.nn.Module, last: bool):
        """Context for one micro-batch's backward: gradients are reduced across ranks only on the `last` of a
        step's micro-batches (the others accumulate locally)."""
        if self.size == 1 or last:
            return contextlib.nullcontext()
        if self.strategy == "ddp":
            return model.no_sync()
        return _fsdp_no_sync(model)

    def shard(self, next_batch: Callable[[torch.Generator, int], torch.Tensor]
              ) -> Callable[[torch.Generator, int], torch.Tensor]:
        """`next_batch` for this rank: each call draws `size` micro-batches and returns this rank's."""
        if self.size == 1:
            return next_batch

        def mine(g: torch.Generator, step: int) -> torch.Tensor:
            drawn = [next_batch(g, step) for _ in range(self.size)]
            return drawn[self.rank]

        return mine

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order."""
        if self.size == 1:
            return [obj]
        gathered = [None] * self.size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered


SINGLE = World()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def join(strategy: str, timeout: float | None = None) -> World:
    """Join the process group torchrun set up (nccl on CUDA, one device per local rank; gloo on CPU). `timeout`:
    the seconds a collective may wait for the slowest rank (None: torch's default)."""
    if strategy not in STRATEGIES:
        raise UserError(f"run.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    wait = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    torch.distributed.init_process_group("nccl" if cuda else "gloo", **wait)
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), strategy)


def wrap(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """`model` for training on the world's ranks: DDP, or FSDP2 with each decoder block (the classes the model
    names in `_no_split_modules`: a whole Mamba block, whose fused kernels read conv1d.weight directly) one unit
    and the rest (embeddings, final norm, head) the root's. FSDP2 keeps fp32 parameters and reduces in fp32; on
    CUDA the loop's bf16 autocast does the compute, so A_log, D and dt_bias are never cast."""
    if world.size == 1:
        return model
    device = next(model.parameters()).device
    if world.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    blocks = set(getattr(_inner(model), "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if not units:
        raise UserError(f"run.strategy fsdp: {type(_inner(model)).__name__} names no decoder block class "
                        "(_no_split_modules) to shard by; use strategy: ddp")
    for group in _groups(model, units):
        fully_shard(group if len(group) > 1 else group[0], mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _groups(model: torch.nn.Module, units: list[torch.nn.Module]) -> list[list[torch.nn.Module]]:
    """The FSDP groups of `units`, inner ones first (Zamba2's hybrid layer holds a Mamba layer, which must be
    sharded before it). Units whose own parameters (those of no unit inside them) overlap form one group, as
    FSDP2 requires: Zamba2's hybrid layers share one attention block's weights."""
    name = {id(m): n for n, m in model.named_modules()}
    own = []
    for u in units:
        inner = [v for v in units if v is not u and name[id(v)].startswith(name[id(u)] + ".")]
        own.append({id(p) for p in u.parameters()} - {id(p) for v in inner for p in v.parameters()})
    group = list(range(len(units)))  # union-find over the units
    for i in range(len(units)):
        for j in range(i):
            if own[i] & own[j]:
                group[_root(group, i)] = _root(group, j)
    members: dict[int, list[torch.nn.Module]] = {}
    for i, u in enumerate(units):
        members.setdefault(_root(group, i), []).append(u)
    return sorted(members.values(), key=lambda g: -max(name[id(u)].count(".") for u in g))


def _root(group: list[int], i: int) -> int:
    while group[i] != i:
        i = group[i]
    return i


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of `model` by name, whole and on the CPU. On several ranks this is collective
    (FSDP2 gathers the shards) and rank 0 alone gets them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # one name per tied parameter
    return {n: v for n, v in state.items() if n in trainable}


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def launch(spec: dict, nproc: int, strategy: str) -> None:
    """Train the fine-tune of a job `spec` on `nproc` local processes (torchrun); raise if a rank fails: a
    rank's UserError as that error (what to fix, as at nproc 1), else a RuntimeError."""
    with tempfile.TemporaryDirectory() as errors:
        code = torchrun("harness.finetune.distributed", {**spec, "strategy": strategy, "errors": errors}, nproc)
        said = sorted(Path(errors).glob("rank-*"), key=lambda f: int(f.name.removeprefix("rank-")))
        if code != 0 and said:
            raise UserError(said[0].read_text())
    if code != 0:
        raise RuntimeError(f"the {nproc}-process fine-tune (torchrun, {strategy}) exited with code {code}; its "
                           "ranks' output is above")


def usable_cpus() -> int:
    """The CPUs this process may run on: a Slurm job's allocation (its cpuset), not the whole node's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def torchrun(module: str, spec: dict, nproc: int) -> int:
    """Run `python -m module SPEC.json` on `nproc` local processes (torchrun, one CUDA device each, the CPU's
    threads shared out); return its exit code. The torchrun agent ends with this process (`exit_with_parent`)."""
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UserError(f"run.nproc: {nproc} processes, but this job sees {torch.cuda.device_count()} CUDA "
                        "device(s) (CUDA_VISIBLE_DEVICES); lower nproc or give the job more GPUs")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", module, f.name]
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, usable_cpus() // nproc))
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        agent = subprocess.Popen(cmd, env=env)
        _AGENTS.append(agent)
        try:
            return agent.wait()
        finally:
            _AGENTS.remove(agent)
    finally:
        os.unlink(f.name)


_AGENTS: list[subprocess.Popen] = []  # the torchrun agents this process has running


def exit_with_parent() -> None:
    """End this process, and any torchrun agent it runs, when the process that started it dies (a job's runner,
    killed rather than interrupted; a rank's agent). A rank then sees its agent go and ends too."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        for agent in list(_AGENTS):
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent.pid, signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _rank_main(spec: dict) -> None:
    """One rank of `launch`: build the job's fine-tune with this rank's share of the data."""
    from harness.artefacts import build_adapter
    from harness.plan import documents
    from harness.suite import Backend, load_suite

    world = join(spec["strategy"])
    try:
        suite = load_suite(spec["suite"], spec.get("run"), spec.get("suite_sha256"))
        build_adapter(suite, suite.model(spec["model"]), spec["seed"], spec["method"], Backend(**spec["backend"]),
                      documents(suite, "train", spec.get("pg19")), world)
    except UserError as e:  # for `launch` to raise: the job records it as at nproc 1
        (Path(spec["errors"]) / f"rank-{world.rank}").write_text(str(e))
        print(f"error (rank {world.rank}): {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    exit_with_parent()
    _rank_main(json.loads(Path(sys.argv[1]).read_text()))
