"""Fine-tuning on 2 processes (torchrun, gloo on the CPU) trains like 1 process with the same global batch:
DDP and FSDP2, straight through or interrupted and resumed. A suite's cells measured on 2 ranks measure like
1 process, and a cell's one collective carries any rank's error to all of them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.attention import register
from harness.finetune.distributed import full_state
from harness.finetune.loop import TrainConfig, train
from harness.finetune.methods import apply_method
from harness.models import HybridConfig, HybridForCausalLM

WORKER = """
import json, sys, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_distributed import STEPS, batches, cfg, model
from harness.finetune.distributed import full_state, join, wrap
from harness.finetune.loop import train

strategy, out, die_at, arch, accum = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
world = join(strategy)
(out / "work").mkdir(exist_ok=True)
m, calls = model(arch), {{"n": 0}}

def dying(g, step):
    calls["n"] += 1
    if calls["n"] == die_at:
        raise KeyboardInterrupt  # every rank, at the same draw
    return batches(g, step)

log = train(wrap(m, world), world.shard(dying), cfg(grad_accum=accum), workdir=out / "work", world=world)
state = full_state(m)
if world.main:
    torch.save({{"curve": log.loss_curve, "tokens": log.tokens, "state": state, "draws": calls["n"]}},
               out / "result.pt")
torch.distributed.destroy_process_group()
"""

STEPS = 4


def model(arch="tiny"):
    """HyLoRA (adapters + fully trained embeddings, norms, conv1d) on our tiny hybrid or an HF one. The tiny one
    attends with SE-Attn drawing its chunk size and random blocks per call: the draws must not depend on the
    number of processes, nor on a resume."""
    if arch == "tiny":
        torch.manual_seed(0)
        base = HybridForCausalLM(HybridConfig(d_model=32, n_layer=2, vocab_size=64, attn_layer_idx=[1],
                                              ssm_cfg={"d_state": 8, "headdim": 16, "chunk_size": 8},
                                              attn_cfg={"num_heads": 2, "head_dim": 16, "rotary_emb_dim": 8}))
        base.set_attn_implementation(register("se_attn", chunk_size=[4, 8], block_size=2, top_k=2,
                                              retrieval="random"))
    elif arch == "zamba2-shared":  # two hybrid layers share one attention block
        import transformers as T

        torch.manual_seed(0)
        base = T.Zamba2ForCausalLM(T.Zamba2Config(
            vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
            mamba_d_state=8, mamba_headdim=16, n_mamba_heads=4, mamba_ngroups=1, chunk_size=16,
            layers_block_type=["mamba", "hybrid", "hybrid"], num_mem_blocks=1, intermediate_size=64))
    else:
        from test_hf_models import build

        base = build(arch)
    return apply_method(base, "hylora", rank=4, alpha=8)[0]


def batches(g, step):  # weighted: the ranks' shares of a step's loss differ
    ids = torch.randint(0, 64, (1, 16), generator=g)
    return ids, 4 * torch.rand(ids.shape, generator=g)


def cfg(grad_accum):
    return TrainConfig(steps=STEPS, context=16, batch_size=1, grad_accum=grad_accum, lr=1e-2, warmup_steps=1,
                       checkpoint_every=2)


@pytest.fixture(scope="module")
def one_process():
    """The 1-process training on a global batch of `grad_accum` micro-batches (each trained once)."""
    runs = {}

    def run(grad_accum):
        if grad_accum not in runs:
            m = model()
            log = train(m, batches, cfg(grad_accum))
            runs[grad_accum] = {"curve": log.loss_curve, "tokens": log.tokens, "state": full_state(m)}
        return runs[grad_accum]

    return run


def two_processes(tmp_path, strategy, die_at=10**9, arch="tiny", accum=1):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           strategy, str(tmp_path), str(die_at), arch, str(accum)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_same_training(result, reference):
    (steps, losses), (ref_steps, ref_losses) = zip(*result["curve"], strict=True), zip(*reference["curve"], strict=True)
    assert steps == ref_steps and result["tokens"] == reference["tokens"]
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert set(result["state"]) == set(reference["state"]) and any(".lora_B" in n for n in reference["state"])
    for name, want in reference["state"].items():  # relative to the tensor's norm: elements near 0 carry the
        got = result["state"][name]                  # rounding of another order of summation
        assert got.shape == want.shape and (got - want).norm() <= 1e-5 * want.norm(), name


@pytest.mark.parametrize(("strategy", "accum"), [("ddp", 2), ("fsdp", 1)])  # 2: reduced on the last of 2
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, strategy, accum, one_process):
    run = two_processes(tmp_path, strategy, accum=accum)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_training(torch.load(tmp_path / "result.pt", weights_only=False), one_process(2 * accum))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bamba", "zamba2", "zamba2-shared", "nemotron_h", "falcon_h1"])
def test_hf_hybrids_shard_by_decoder_block_and_train_like_one_process(tmp_path, arch):
    m = model(arch)
    log = train(m, batches, cfg(grad_accum=2))
    run = two_processes(tmp_path, "fsdp", arch=arch)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_training(torch.load(tmp_path / "result.pt", weights_only=False),
                         {"curve": log.loss_curve, "tokens": log.tokens, "state": full_state(m)})


def test_an_interrupted_two_process_fine_tune_resumes(tmp_path, one_process):
    died = two_processes(tmp_path, "fsdp", die_at=9, accum=2)  # each step draws 4 (2 per rank): 9 is step 3's
    assert died.returncode != 0 and not (tmp_path / "result.pt").exists()
    assert (tmp_path / "work" / "train-state.pt").is_file()  # written at step 2
    resumed = two_processes(tmp_path, "fsdp", accum=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    assert result["draws"] == 4 * (STEPS - 2)  # steps 3 and 4 only: the first two came from the checkpoint
    assert_same_training(result, one_process(4))


SUITE = """
name: dist
methods: [lora]
backends: [full]
pretrain: {{context: 64, steps: 3, batch_size: 2, warmup_steps: 1}}
finetune: {{context: 128, steps: 3, warmup_steps: 1, grad_accum: {accum}}}
run: {{nproc: {nproc}}}
metrics:
  perplexity: {{contexts: [64, 128], tokens_per_length: 640, max_tokens: 20000}}
  ruler: {{tasks: [niah_single_1], lengths: [320], samples: 5}}
"""


def test_a_suite_on_two_processes_trains_and_measures_like_one(tmp_path, isolated_cache):
    from harness import results
    from harness.runner import run_suite

    recorded = {}
    for nproc, accum in ((1, 2), (2, 1)):
        (tmp_path / f"{nproc}.yaml").write_text(SUITE.format(nproc=nproc, accum=accum))
        run_suite(tmp_path / f"{nproc}.yaml", tmp_path / f"out{nproc}")
        recs = results.load(tmp_path / f"out{nproc}")
        assert all(r.status == "ok" for r in recs), [r.error for r in recs]
        recorded[nproc] = {r.cell: r for r in recs}
    assert recorded[1].keys() == recorded[2].keys()
    one, two = (recorded[n]["tiny-hybrid/seed0/lora/full/train"] for n in (1, 2))
    assert [(r.model["nproc"], r.model["global_batch"]) for r in (one, two)] == [(1, 2), (2, 2)]
    assert two.model["strategy"] == "ddp" and one.model["adapter"] != two.model["adapter"]
    assert [s for s, _ in one.values["loss_curve"]] == [s for s, _ in two.values["loss_curve"]] == [1, 2, 3]
    assert [x for _, x in two.values["loss_curve"]] == pytest.approx([x for _, x in one.values["loss_curve"]],
                                                                      rel=1e-5)
    # Evaluation on 2 ranks: each took every other window / sample, and the gathered numbers are the 1-process
    # ones; for the pretrained model (the same weights in both runs) to float64 rounding and sample by sample.
    for variant, rel in (("pretrained", 1e-9), ("lora/full", 1e-5)):
        for n in (64, 128):
            a, b = (recorded[k][f"tiny-hybrid/seed0/{variant}/ppl@{n}"] for k in (1, 2))
            assert b.settings["ranks"] == 2 and "ranks" not in a.settings
            assert (b.values["windows"], b.values["tokens_scored"]) == (a.values["windows"], a.values["tokens_scored"])
            assert b.values["windows"] > 2  # so both ranks had some
            assert b.values["perplexity"] == pytest.approx(a.values["perplexity"], rel=rel)
    a, b = (recorded[k]["tiny-hybrid/seed0/pretrained/ruler/niah_single_1@320"] for k in (1, 2))
    assert b.values["per_sample"] == a.values["per_sample"] and len(a.values["per_sample"]) == 5
    samples = [[json.loads(line) for line in (tmp_path / f"out{k}" / r.settings["samples_file"]).open()]
               for k, r in ((1, a), (2, b))]
    assert [s["predicted"] for s in samples[1]] == [s["predicted"] for s in samples[0]]


class TwoRanks:
    """Rank 0 of a 2-process World whose other rank sends `theirs` to each collective."""

    rank, size, main = 0, 2, True

    def __init__(self, *theirs):
        self.theirs, self.sent = list(theirs), []

    def gather(self, obj):
        self.sent.append(obj)
        return [obj, self.theirs.pop(0)]


def context(world):
    from harness.job import Context

    ctx = Context.__new__(Context)  # just the collective's part of a job's context
    ctx.world, ctx._gathered = world, False
    return ctx


def test_a_cell_takes_one_collective_per_rank_and_raises_another_ranks_error_on_all():
    world = TwoRanks(("part", 3), ("error", (False, "ValueError: bad window")), ("done", None),
                     ("error", (True, "CUDA out of memory")), ("part", 1))
    ctx = context(world)
    assert ctx.gather(2) == [2, 3]
    with pytest.raises(RuntimeError, match="called twice"):
        ctx.gather(2)
    ctx.settle(None)  # it gathered: no second collective for this cell
    with pytest.raises(RuntimeError, match="rank 1: ValueError: bad window"):
        ctx.gather(2)
    ctx.settle(None)
    ctx.settle(None)  # a cell rank 0 measured alone: it joins with nothing, as the other rank does
    ctx.settle(KeyError("x"))  # it failed before gathering; the other rank's error means nothing to it
    assert world.sent[-2:] == [("done", None), ("error", (False, "KeyError: 'x'"))]
    assert world.theirs == [("part", 1)]
    ctx.settle(None)
    with pytest.raises(RuntimeError, match="rank 1 ended the cell without gathering"):
        context(TwoRanks(("done", None))).gather(0)
    with pytest.raises(torch.OutOfMemoryError, match="rank 1: CUDA out of memory"):
        context(TwoRanks(("error", (True, "CUDA out of memory")))).gather(0)
    with pytest.raises(SystemExit, match="collective failed .* another rank has ended"):  # not a cell's failure
        context(TwoRanks()).settle(None)  # (the other rank sends nothing: the collective raises)


def test_ranks_share_items_and_join_them_back_in_order():
    from harness.metrics.base import ONE, Ranks

    items = list(range(7))
    for size in (1, 2, 3, 8):
        shares = [Ranks(r, size).share(items) for r in range(size)]
        assert sorted(sum(shares, [])) == items and Ranks(0, size).join(shares) == items
    assert ONE.gather("x") == ["x"]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_ranks_share_the_cpus_the_job_may_use_not_the_nodes():
    from harness.finetune.distributed import usable_cpus

    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(allowed)})  # as a Slurm job's cpuset: one CPU of the node's
        assert usable_cpus() == 1
    finally:
        os.sched_setaffinity(0, allowed)
    assert usable_cpus() == len(allowed)


def test_torchrun_shares_the_cpus_out_over_the_ranks(monkeypatch):
    from harness.finetune import distributed

    launched = {}

    class Agent:
        def __init__(self, cmd, env):
            launched.update(cmd=cmd, threads=env["OMP_NUM_THREADS"])

        def wait(self):
            return 0

    monkeypatch.setattr(distributed.subprocess, "Popen", Agent)
    monkeypatch.setattr(distributed, "usable_cpus", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert distributed.torchrun("harness.finetune.distributed", {}, 2) == 0
    assert launched["threads"] == "4" and "--nproc-per-node=2" in launched["cmd"]


def test_jobs_get_nproc_devices_each(monkeypatch):
    from harness.errors import UserError
    from harness.runner import _devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert _devices(1) == list("01234567")
    assert _devices(4) == ["0,1,2,3", "4,5,6,7"] and _devices(8) == [None]
    with pytest.raises(UserError, match="run.nproc: 16 processes per fine-tune, but 8 CUDA device"):
        _devices(16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert _devices(2) == [None]  # the CPU: gloo processes


def test_an_error_a_user_can_fix_in_a_rank_is_raised_as_itself(tmp_path):
    """At nproc 1 the record says what to fix; at nproc 2 it said only that torchrun exited with code 1."""
    from harness.errors import UserError
    from harness.finetune.distributed import launch

    missing = tmp_path / "gone.yaml"
    with pytest.raises(UserError, match=f"{missing}.*not found"):
        launch({"suite": str(missing), "model": "tiny-hybrid", "seed": 0, "method": "lora",
                "backend": {"name": "full"}}, 2, "ddp")


def test_a_variant_whose_ranks_cannot_start_records_each_cell_failed_with_the_reason(tmp_path, isolated_cache,
                                                                                      monkeypatch):
    """Say a Slurm node with fewer GPUs than nproc: every cell is recorded with what to fix, in one attempt (the
    job crashed, and the runner recorded one cell per restart)."""
    from harness import results
    from harness.errors import UserError
    from harness.job import distributed, run_job
    from harness.plan import plan
    from harness.suite import load_suite

    def too_few(module, spec, nproc):
        raise UserError(f"run.nproc: {nproc} processes, but this job sees 1 CUDA device(s)")

    monkeypatch.setattr(distributed, "torchrun", too_few)
    (tmp_path / "s.yaml").write_text(SUITE.format(nproc=2, accum=1))
    (job,) = [j for j in plan(load_suite(tmp_path / "s.yaml"), "data", "train") if j.name.endswith("pretrained")]
    run_job({"suite": str(tmp_path / "s.yaml"), "out": str(tmp_path), **job.spec, "kind": job.kind,
             "cells": job.cells})
    recs = results.load(tmp_path)
    assert len(recs) == len(job.cells) == 3 and {r.status for r in recs} == {"error"}
    assert all("run.nproc: 2 processes, but this job sees 1 CUDA device(s)" in r.error for r in recs)
