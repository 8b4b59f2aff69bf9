"""The training loop shared by pretraining and fine-tuning.

AdamW with linear warm-up then either a constant LR (LongLoRA's fine-tuning recipe)
or cosine decay (pretraining), gradient accumulation, gradient clipping, bf16
autocast on CUDA, optionally torch.compile and an average of the last steps' weights,
and periodic checkpoints so an interrupted run resumes where it stopped instead of
starting over. Given a `World` (harness.finetune.distributed) of several processes,
each rank trains on its share of every step's micro-batches, the gradients are reduced
on a step's last micro-batch, and rank 0 alone writes checkpoints.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from tqdm.auto import tqdm

from harness.attention.backend import training_call
from harness.finetune.distributed import SINGLE, World

CHECKPOINT = "train-state.pt"


@dataclass
class TrainConfig:
    steps: int
    context: int
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 20
    schedule: str = "constant"  # "constant" (LongLoRA) or "cosine"
    weight_decay: float = 0.0
    # AdamW's betas: the Hugging Face Trainer's defaults, which LongLoRA's fine-tuning (the paper's recipe) keeps;
    # pretraining sets its own.
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    # LR of the parameters trained fully beside LoRA adapters (LoRA+'s embeddings and norms, HyLoRA's conv1d),
    # as a multiple of `lr`; 1 is LongLoRA's single LR. A model without adapters trains everything at `lr`.
    extra_lr_scale: float = 1.0
    # torch.compile the loss (forward, LM head, cross-entropy) and so its backward: on 2 CPU cores a pretraining
    # step of the default model in 120 instead of 177 ms, after about 30 s of compiling on the first step. On CPU
    # it runs with torch's deterministic algorithms, so a compiled run is reproducible too (`_deterministic`).
    compile: bool = False
    # Tail averaging: the trained weights are the uniform mean of the weights after each of the last
    # `average_last` steps (0: the last step's). Less noisy than any one step's weights.
    average_last: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not 0 <= self.average_last <= self.steps:
            raise ValueError(f"average_last must be between 0 and steps ({self.steps}), got {self.average_last}")


@dataclass
class TrainLog:
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    warmup_tokens: int = 0  # of the first step of each run (a resumed one too): it compiles, JITs and autotunes
    warmup_seconds: float = 0.0
    peak_memory_gib: float = 0.0
    memory_kind: str = ""  # "cuda allocator peak" or "process peak RSS"

    @property
    def tokens_per_s(self) -> float:
        """Training throughput after warm-up: the first step of each run left out, where later steps ran."""
        tokens, seconds = self.tokens - self.warmup_tokens, self.seconds - self.warmup_seconds
        if tokens <= 0 or seconds <= 0:
            tokens, seconds = self.tokens, self.seconds
        return tokens / seconds if seconds else 0.0

    def values(self) -> dict:
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 1)}


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    model: torch.nn.Module,
    next_batch: Callable[[torch.Generator], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    workdir: Path | None = None,
    desc: str = "train",
    world: World = SINGLE,
) -> TrainLog:
    """Train `model` in place on batches of token ids from `next_batch(generator, step)`, or (ids, per-token
    loss weights) pairs for a weighted loss (:func:`weighted_lm_loss`); `step` counts optimizer steps from 0,
    so a mixture may change during training and a resumed run still draws what the straight one drew.
    With `cfg.average_last`, the model ends with the mean of its last `average_last` steps' weights (one process).

    With a `workdir`, state (weights, optimizer, data generator, log) is saved every
    `checkpoint_every` steps and a later call with the same workdir resumes from it.
    On several ranks, `model` is wrapped (distributed.wrap), `next_batch` gives this rank's micro-batches
    (World.shard) and `cfg.grad_accum` counts this rank's micro-batches per step; the log is the global one.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    if cfg.average_last and world.size > 1:
        raise ValueError("average_last is implemented for one process; train with nproc 1 or average_last 0")
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    log, start, average = TrainLog(), 0, []
    if workdir is not None and (workdir / CHECKPOINT).is_file():
        start, log, average = _restore(workdir / CHECKPOINT, model, opt, sched, gen)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model.train()
    loss_of = torch.compile(lm_loss) if cfg.compile else lm_loss
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True,
               disable=None if sys.stderr.isatty() else False, mininterval=2.0)
    if cfg.compile:  # the first step compiles for about a minute on 2 CPU cores, with the bar standing still
        bar.set_postfix_str("compiling the training step")
    # `with bar`: a failed run's bar is closed too, so its last line comes before the error its caller prints
    # (not whenever that error's traceback, which holds the bar, is let go: after the job's other cells)
    with bar, _deterministic(cfg.compile and device.type == "cpu"):
        for step in range(start, cfg.steps):
            t0, tokens_before = time.perf_counter(), log.tokens
            total = 0.0
            batches = [b if isinstance(b, tuple) else (b, None) for b in
                       (next_batch(gen, step) for _ in range(cfg.grad_accum))]
            # Each micro-batch's mean loss counts by its share of the step's loss weight over all ranks (DDP
            # averages over ranks: hence the mean), so the step's loss is one weighted mean, however split.
            shares = [_loss_weight(ids, w) for ids, w in batches]
            per_rank = world.mean(sum(shares), device)
            for i, (ids, weights) in enumerate(batches):
                ids = ids.to(device)
                # this rank's i-th micro-batch is the (i * size + rank)-th drawn (World.shard): random attention
                # draws follow it, so they do not depend on nproc, nor on a resume
                with world.sync(model, last=i + 1 == cfg.grad_accum), training_call(step, i * world.size + world.rank):
                    with autocast:
                        w = None if weights is None else weights.to(device)
                        loss = loss_of(model, ids, w) * (shares[i] / per_rank)
                    loss.backward()
                total += loss.item()
                log.tokens += ids.numel() * world.size
            total = world.mean(total, device)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # FSDP2: over the DTensor shards, a global norm
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if (n := step + 1 - (cfg.steps - cfg.average_last)) > 0:
                average = _update_average(average, params, n)
            seconds = time.perf_counter() - t0
            log.seconds += seconds
            if step == start:
                log.warmup_tokens += log.tokens - tokens_before
                log.warmup_seconds += seconds
            log.loss_curve.append((step + 1, round(total, 5)))
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{log.tokens_per_s:,.0f}", refresh=False)
            bar.update(1)  # redraws at most every `mininterval` seconds, with the postfix above
            if workdir is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                _save(workdir / CHECKPOINT, step + 1, model, opt, sched, gen, log, world, average)
    if average:
        with torch.no_grad():
            torch._foreach_copy_(params, average)
    model.eval()
    log.peak_memory_gib, log.memory_kind = peak_memory_gib(device)
    return log


@torch.no_grad()
def _update_average(average: list[torch.Tensor], params: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The running mean of the weights after the n-th averaged step: the weights themselves at n = 1."""
    if n == 1:
        return [p.detach().clone() for p in params]
    torch._foreach_lerp_(average, [p.detach() for p in params], 1.0 / n)
    return average


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: LoRA adapters at `cfg.lr`, the other trainable parameters at
    `cfg.lr * cfg.extra_lr_scale` when both kinds train, else one group at `cfg.lr`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lora = [p for n, p in named if ".lora_" in n]
    rest = [p for n, p in named if ".lora_" not in n]
    if lora and rest:
        return [{"params": lora}, {"params": rest, "lr": cfg.lr * cfg.extra_lr_scale}]
    return [{"params": lora or rest}]


def checkpoint_activations(model, **kwargs) -> None:
    """Recompute activations in the backward pass (transformers >= 5.23 names it activation checkpointing; 5.0
    only has the older, now deprecated, gradient checkpointing name)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
    else:
        enable(activation_checkpointing_kwargs=kwargs or None)


def missing_cpu_compiler() -> str | None:
    """The C++ compiler torch.compile builds CPU kernels with ($CXX, else g++) if it is not on PATH, else None."""
    cxx = os.environ.get("CXX", "g++")
    return None if shutil.which(cxx) else cxx


def _loss_weight(ids: torch.Tensor, weights: torch.Tensor | None) -> float:
    """What `weighted_lm_loss` of a micro-batch divides by: its predicted tokens' summed weight."""
    return float(weights[:, 1:].sum()) if weights is not None else float(ids.shape[0] * (ids.shape[1] - 1))


def lm_loss(model: torch.nn.Module, ids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of a batch: next-token cross-entropy of `ids` under `model`, weighted by `weights`."""
    return weighted_lm_loss(next_token_logits(model, ids), ids, weights)


def next_token_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (b, l - 1, V) of the positions of `ids` that have a next token. The last position is dropped
    from the hidden states (`logits_to_keep`), not from the logits: slicing (b, l, V) logits and the
    gradient of that slice cost a tenth of a pretraining step. A forward that ignores `logits_to_keep`
    returns all l positions, and the last is cut here."""
    logits = model(input_ids=ids, logits_to_keep=torch.arange(ids.shape[1] - 1, device=ids.device)).logits
    return logits[:, : ids.shape[1] - 1]


def weighted_lm_loss(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy of `ids` from the logits of its first l - 1 positions (b, l - 1, V), averaged
    with `weights` of the predicted tokens: sum(w * nll) / sum(w). Without weights (or all 1) it equals the
    model's own causal-LM loss."""
    targets = ids[:, 1:].flatten()
    logits = logits.flatten(0, 1).float()
    if weights is None:
        return torch.nn.functional.cross_entropy(logits, targets)
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    w = weights[:, 1:].flatten()
    return (nll * w).sum() / w.sum()


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """Peak memory so far: the CUDA allocator's peak, or on CPU the process's peak RSS (which getrusage gives in
    KiB on Linux, in bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda allocator peak"
    per_gib = 2**30 if sys.platform == "darwin" else 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_gib, "process peak RSS"


# Trainable weights and optimizer state by parameter name, gathered whole on rank 0 (DDP, FSDP2 or one process).
_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def _save(path: Path, step, model, opt, sched, gen, log, world: World, average: list[torch.Tensor]) -> None:
    params, optim = get_state_dict(model, opt, options=_STATE)  # collective: every rank takes part
    if world.main:
        state = {"step": step, "params": params, "opt": optim, "sched": sched.state_dict(), "gen": gen.get_state(),
                 "log": asdict(log), "average": [a.cpu() for a in average]}
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
    world.barrier()


def _restore(path: Path, model, opt, sched, gen) -> tuple[int, TrainLog, list[torch.Tensor]]:
    """(step, log, weight average so far); every rank reads the checkpoint (the data generator and schedule are
    the same on all of them)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    set_state_dict(model, opt, model_state_dict=state["params"], optim_state_dict=state["opt"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    sched.load_state_dict(state["sched"])
    gen.set_state(state["gen"])
    log = TrainLog(**{**state["log"], "loss_curve": [tuple(x) for x in state["log"]["loss_curve"]]})
    device = next(model.parameters()).device
    return state["step"], log, [a.to(device) for a in state["average"]]


@contextmanager
def _deterministic(on: bool):
    """torch's deterministic algorithms for the block where `on` (then as before). Compiled on CPU, the training
    step is otherwise not reproducible: two runs of one process, same seed and batches, differed by up to 3e-3
    in a weight after 120 pretraining steps. With them, runs in fresh processes and empty inductor caches gave
    bit-identical weights, at the same speed (2 AMD EPYC cores)."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on or before, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
