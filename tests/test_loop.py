"""The training loop: LR schedule, and an interrupted run resumes to exactly the uninterrupted result."""

import gc
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness.finetune.loop import TrainConfig, lm_loss, lr_factor, missing_cpu_compiler, train
from harness.models import HybridConfig, HybridForCausalLM


def tiny():
    torch.manual_seed(0)
    return HybridForCausalLM(HybridConfig(d_model=32, n_layer=2, vocab_size=64, attn_layer_idx=[1],
                                          ssm_cfg={"d_state": 8, "headdim": 16, "chunk_size": 8},
                                          attn_cfg={"num_heads": 2, "head_dim": 16, "rotary_emb_dim": 8}))


def batches(g, step):  # depends on the step too, as a scheduled mixture does: a resumed run must pass the right one
    return (torch.randint(0, 64, (2, 16), generator=g) + step) % 64


def test_schedule_warmup_then_constant_or_cosine():
    cfg = TrainConfig(steps=100, context=16, warmup_steps=10)
    assert [lr_factor(s, cfg) for s in (0, 9, 10, 99)] == [0.1, 1.0, 1.0, 1.0]
    cos = TrainConfig(steps=100, context=16, warmup_steps=10, schedule="cosine")
    assert lr_factor(10, cos) == pytest.approx(1.0) and lr_factor(99, cos) == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("average_last", [0, 3])  # 3: the step-4 checkpoint holds a weight average of one step
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch, average_last):
    cfg = TrainConfig(steps=6, context=16, batch_size=2, lr=1e-2, warmup_steps=2, checkpoint_every=2,
                      average_last=average_last)
    straight = tiny()
    log = train(straight, batches, cfg)
    assert [n for n, _ in log.loss_curve] == [1, 2, 3, 4, 5, 6] and log.tokens == 6 * 32  # by steps done

    interrupted, calls = tiny(), {"n": 0}

    def dying(g, step):  # the 5th batch never comes: killed after the step-4 checkpoint
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return batches(g, step)

    with pytest.raises(KeyboardInterrupt):
        train(interrupted, dying, cfg, workdir=tmp_path)
    resumed = tiny()  # a fresh process: weights come only from the checkpoint
    log2 = train(resumed, batches, cfg, workdir=tmp_path)
    assert log2.loss_curve == log.loss_curve and log2.tokens == log.tokens
    assert log2.warmup_tokens == 2 * 32  # the first step of each run: the step-0 one and the resumed step 4
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_throughput_leaves_out_the_first_step_which_compiles(monkeypatch):
    """tokens/s is the steady state: the first step's compile, JIT and autotune time is not in it."""
    from harness.finetune import loop

    first = {"done": False}

    def slow_first(model, ids, weights=None):
        if not first["done"]:
            first["done"] = True
            time.sleep(1.0)  # a compile
        return lm_loss(model, ids, weights)

    monkeypatch.setattr(loop, "lm_loss", slow_first)
    log = train(tiny(), batches, TrainConfig(steps=4, context=16, batch_size=2, lr=1e-2, warmup_steps=1))
    assert log.warmup_tokens == 32 and log.warmup_seconds >= 1.0 and log.seconds - log.warmup_seconds < 1.0
    assert log.tokens_per_s == pytest.approx(3 * 32 / (log.seconds - log.warmup_seconds))
    assert loop.TrainLog(tokens=32, seconds=2.0, warmup_tokens=32, warmup_seconds=2.0).tokens_per_s == 16.0  # 1 step


def test_a_weighted_step_is_one_loss_however_it_is_split_into_micro_batches():
    # row 0 has answers weighted 5x, row 1 none: one micro-batch of 2 rows or 2 of 1 row train the same
    ids = torch.randint(0, 64, (4, 2, 16), generator=torch.Generator().manual_seed(2))
    weights = torch.ones(4, 2, 16)
    weights[:, 0, 8:] = 5.0
    runs = []
    for batch_size, accum in ((2, 1), (1, 2)):
        drawn = {}

        def rows(g, step, batch_size=batch_size, drawn=drawn):
            i = drawn.get(step, 0)
            drawn[step] = i + batch_size
            return ids[step, i:i + batch_size], weights[step, i:i + batch_size]

        cfg = TrainConfig(steps=4, context=16, batch_size=batch_size, grad_accum=accum, lr=1e-2, warmup_steps=1)
        log = train(tiny(), rows, cfg)
        runs.append([loss for _, loss in log.loss_curve])  # each step's loss follows the steps before it
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_the_optimizer_steps_on_gradients_clipped_to_grad_clip(monkeypatch):
    # Adam cancels a constant rescale of the gradients, so losses barely show clipping: read the gradient norm
    # every optimizer step sees, with a loss scaled up so that the raw gradients are far above the clip
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from harness.finetune import loop

    monkeypatch.setattr(loop, "lm_loss", lambda model, ids, weights=None: 1e3 * lm_loss(model, ids, weights))
    norms = []

    def record(opt, args, kwargs):
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record)
    try:
        train(tiny(), batches, TrainConfig(steps=2, context=16, batch_size=2, lr=1e-2, warmup_steps=1, grad_clip=0.5))
    finally:
        handle.remove()
    assert norms == pytest.approx([0.5, 0.5], rel=1e-4)  # clipped down to the clip, not left at ~1e3 x


def test_average_last_ends_with_the_mean_of_the_last_steps_weights():
    cfg = TrainConfig(steps=6, context=16, batch_size=2, lr=1e-2, warmup_steps=2)
    plain, seen = tiny(), []

    def recording(g, step):  # called before step `step`: the weights after `step` steps
        if step >= 4:
            seen.append({n: p.detach().clone() for n, p in plain.named_parameters()})
        return batches(g, step)

    train(plain, recording, cfg)
    seen.append(dict(plain.named_parameters()))
    averaged = tiny()
    train(averaged, batches, TrainConfig(**{**cfg.__dict__, "average_last": 3}))
    for n, p in averaged.named_parameters():
        mean = sum(w[n] for w in seen) / 3
        torch.testing.assert_close(p.detach(), mean.detach(), rtol=1e-5, atol=1e-6, msg=n)
        assert not torch.equal(p, seen[-1][n]), n  # not just the last step's weights
    with pytest.raises(ValueError, match="average_last"):
        TrainConfig(steps=6, context=16, average_last=7)


def test_extra_lr_scale_slows_only_the_fully_trained_parameters():
    from harness.finetune.methods import apply_method

    def one_step(scale):
        model, _ = apply_method(tiny(), "lora_plus", rank=4, alpha=8)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        train(model, batches, TrainConfig(steps=1, context=16, batch_size=2, lr=1e-2, warmup_steps=0,
                                          grad_clip=1e9, extra_lr_scale=scale))
        return {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if n in before}

    full, scaled = one_step(1.0), one_step(0.1)
    assert {n for n in full if ".lora_" not in n} and any(".lora_B" in n for n in full)
    for n in full:
        if ".lora_B" in n:  # B gets the first step's gradient (A does not: B starts at zero)
            assert scaled[n] == pytest.approx(full[n], rel=1e-4) and full[n] > 0, n
        elif ".lora_" not in n:  # Adam's first step moves each weight by about lr: here lr x 0.1
            assert scaled[n] == pytest.approx(0.1 * full[n], rel=1e-3) and full[n] > 0, n


def test_param_groups_scale_only_what_trains_fully_beside_adapters():
    """extra_lr_scale applies to the fully trained parameters of lora_plus/hylora only: `full` (no adapter) and `lora`
    (nothing beside adapters) train everything at lr, as methods.unused_settings (and so the cache key) assume."""
    from harness.finetune.loop import param_groups
    from harness.finetune.methods import apply_method

    cfg = TrainConfig(steps=1, context=16, lr=1e-3, extra_lr_scale=0.1)
    for method in ("full", "lora", "hylora"):
        model, _ = apply_method(tiny(), method, rank=4, alpha=8)
        groups = param_groups(model, cfg)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert sorted(id(p) for g in groups for p in g["params"]) == sorted(trainable), method
        lrs = [g.get("lr", cfg.lr) for g in groups]
        assert lrs == ([cfg.lr, pytest.approx(1e-4)] if method == "hylora" else [cfg.lr]), method


def test_a_diverged_run_closes_its_progress_bar_before_its_error_is_reported(capsys):
    """The job reports a failed fine-tune's error while it keeps that error (and so, through its traceback, the
    training's frame) for the variant's other cells: the bar's last line must already be out by then."""
    from harness.attention import register
    from harness.errors import UserError

    model = tiny()
    model.set_attn_implementation(register("full"))  # the backend that finds NaN in q, k, v
    with pytest.raises(UserError, match="the model diverged") as failed:
        train(model, batches, TrainConfig(steps=4, context=16, batch_size=2, lr=1e30, warmup_steps=0))
    reported = f"error: {failed.value}"
    print(reported, file=sys.stderr)
    del failed
    gc.collect()  # the traceback goes, with its frames: an open bar would refresh now
    err = capsys.readouterr().err
    assert "1/4" in err and err.rstrip().endswith(reported), err[-300:]


@pytest.mark.skipif(missing_cpu_compiler() is not None, reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("weighted", [False, True])
def test_compiled_training_follows_the_eager_one(weighted):
    def next_batch(g, step):
        ids = batches(g, step)
        return (ids, torch.rand(ids.shape, generator=g) * 5) if weighted else ids

    cfg = dict(steps=4, context=16, batch_size=2, lr=1e-2, warmup_steps=1)
    eager, compiled = tiny(), tiny()
    log = train(eager, next_batch, TrainConfig(**cfg))
    log_c = train(compiled, next_batch, TrainConfig(**cfg, compile=True))
    torch.testing.assert_close([v for _, v in log_c.loss_curve], [v for _, v in log.loss_curve], atol=1e-4, rtol=0)
    # Weights are compared through what they compute: Adam turns the rounding noise of gradients that are 0 in
    # exact arithmetic (attention's key bias) into updates of the learning rate's size, which change nothing.
    ids = batches(torch.Generator().manual_seed(1), 0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    again = tiny()
    train(again, next_batch, TrainConfig(**cfg, compile=True))
    for (n, a), b in zip(compiled.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), n  # a compiled run is reproducible
    assert not torch.are_deterministic_algorithms_enabled()  # restored after training


def test_a_run_killed_while_saving_a_checkpoint_resumes_from_the_previous_one(tmp_path, monkeypatch):
    """A checkpoint is written beside the last one and renamed over it: a kill mid-write leaves the last whole.
    Resumed mid-warm-up into a cosine decay, the LR schedule goes on from the checkpoint's step."""
    cfg = TrainConfig(steps=6, context=16, batch_size=2, lr=1e-2, warmup_steps=3, schedule="cosine",
                      checkpoint_every=2)
    straight = tiny()
    log = train(straight, batches, cfg)

    save, saves = torch.save, []

    def killed_in_the_second_save(obj, f):
        saves.append(f)
        if len(saves) == 2:
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt
        save(obj, f)

    monkeypatch.setattr(torch, "save", killed_in_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), batches, cfg, workdir=tmp_path)
    monkeypatch.undo()
    resumed = tiny()
    assert train(resumed, batches, cfg, workdir=tmp_path).loss_curve == log.loss_curve
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_each_step_takes_the_scheduled_lr_of_its_group_and_the_recipes_adamw_through_a_resume(tmp_path):
    """Optimizer step s runs at lr x lr_factor(s), the fully trained parameters at extra_lr_scale x that, with
    the config's AdamW betas and weight decay; a resumed run goes on with the schedule."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from harness.finetune.methods import apply_method

    cfg = TrainConfig(steps=6, context=16, batch_size=2, lr=1e-2, warmup_steps=3, schedule="cosine",
                      checkpoint_every=2, extra_lr_scale=0.5, weight_decay=0.1, betas=(0.8, 0.97))
    seen, calls = [], {"n": 0}

    def dying(g, step):  # the 5th batch never comes: killed after the step-4 checkpoint
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return batches(g, step)

    def record(opt, args, kwargs):  # not the step of zero gradients at LR 0 that set_state_dict initializes with
        if any(p.grad.any() for group in opt.param_groups for p in group["params"] if p.grad is not None):
            seen.append([(group["lr"], tuple(group["betas"]), group["weight_decay"]) for group in opt.param_groups])

    handle = register_optimizer_step_pre_hook(record)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(apply_method(tiny(), "lora_plus", rank=4, alpha=8)[0], dying, cfg, workdir=tmp_path)
        train(apply_method(tiny(), "lora_plus", rank=4, alpha=8)[0], batches, cfg, workdir=tmp_path)
    finally:
        handle.remove()
    assert [lr for groups in seen for lr, _, _ in groups] == pytest.approx(
        [lr * lr_factor(s, cfg) for s in range(6) for lr in (1e-2, 0.5e-2)], rel=1e-12)
    assert {(betas, decay) for groups in seen for _, betas, decay in groups} == {((0.8, 0.97), 0.1)}


def test_the_seed_chooses_the_batches():
    first = []
    for seed in (0, 0, 1):
        drawn = []
        train(tiny(), lambda g, step, drawn=drawn: drawn.append(batches(g, step)) or drawn[-1],
              TrainConfig(steps=1, context=16, batch_size=2, seed=seed))
        first.append(drawn[0])
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])


def test_micro_batches_of_different_lengths_count_by_their_predicted_tokens():
    """Unweighted, a step's loss is the mean over all its predicted tokens, as with weights of 1."""
    runs = []
    for weighted in (False, True):
        calls = {"n": 0}

        def rows(g, step, weighted=weighted, calls=calls):  # 2 x 16 then 2 x 4 tokens in each step
            calls["n"] += 1
            ids = batches(g, step)[:, : 16 if calls["n"] % 2 else 4]
            return (ids, torch.ones(ids.shape)) if weighted else ids

        log = train(tiny(), rows, TrainConfig(steps=3, context=16, batch_size=2, grad_accum=2, lr=1e-2,
                                              warmup_steps=1))
        runs.append([loss for _, loss in log.loss_curve])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_training_into_the_cache_removes_its_work_directory_once_done(tmp_path, monkeypatch):
    from harness import cache
    from harness.pretraining import train_into_cache

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    seen = []

    def watched(g, step):
        seen.append([w["key"] for w in cache.work_dirs()])
        return batches(g, step)

    log = train_into_cache(tiny(), TrainConfig(steps=2, context=16, batch_size=2, checkpoint_every=1), watched,
                           "adapter", "key", "train")
    assert len(log.loss_curve) == 2 and not list((tmp_path / "adapter").iterdir())  # the step-1 checkpoint went too
    assert seen[0] == ["key"]  # while it trains, `harness cache ls` finds its checkpoints


def test_the_model_trains_in_training_mode_and_ends_in_eval_mode():
    """Activation checkpointing (transformers) and dropout act in training mode only, and a base model comes
    loaded in eval mode."""
    model, modes = tiny().eval(), []

    def recording(g, step):
        modes.append(model.training)
        return batches(g, step)

    train(model, recording, TrainConfig(steps=2, context=16, batch_size=2))
    assert modes == [True, True] and not model.training


def test_cpu_peak_memory_reads_getrusage_in_its_platforms_unit(monkeypatch):
    from harness.finetune import loop

    monkeypatch.setattr(loop.resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=3 * 2**20))
    for platform, gib in (("linux", 3.0), ("darwin", 3 / 2**10)):  # KiB on Linux, bytes on macOS
        monkeypatch.setattr(loop.sys, "platform", platform)
        assert loop.peak_memory_gib(torch.device("cpu")) == (gib, "process peak RSS")
