"""Runs a suite: pretrain (cached), fine-tune (cached), evaluate each cell, write records, render the report.

Resume: a cell whose ok record (same cell id and config hash) is already in the
results file is skipped, and pretrained models and adapters come from the cache, so
an interrupted run picks up where it stopped. An out-of-memory error in one cell is
recorded as status "oom" and the suite goes on.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from peft import PeftModel

import harness.finetune as finetune_module
from harness import cache, results
from harness.data import default_corpus, default_tokenizer, encode_corpus, load_pg19, random_windows
from harness.data.tokenizer import tokenizer_fingerprint
from harness.finetune.loop import TrainConfig, train
from harness.finetune.methods import apply_method
from harness.metrics.perplexity import evaluate_perplexity
from harness.pretrain import pretrain_config, pretrained_model
from harness.report import render_report
from harness.suite import Suite

ADAPTER = "adapter"


def eval_corpus(suite: Suite, pg19: str | None):
    """PG-19 when configured (flag, suite field or $HARNESS_PG19_DIR), else the embedded corpus."""
    root = pg19 or suite.data.pg19 or os.environ.get("HARNESS_PG19_DIR")
    return load_pg19(root, suite.data.split) if root else default_corpus()


def plan(suite: Suite) -> list[dict]:
    """The cells of the suite, in run order."""
    cells = []
    for model in suite.models:
        for seed in suite.seeds:
            variants = [("pretrained", "none", "full")] + [
                ("finetuned", m, b) for m in suite.methods for b in suite.backends]
            for stage, method, backend in variants:
                for ctx in suite.eval.contexts:
                    cells.append({"model": model, "seed": seed, "stage": stage, "method": method,
                                  "backend": backend, "eval_context": ctx,
                                  "id": f"{model}/seed{seed}/{stage}-{method}-{backend}/ppl@{ctx}"})
    return cells


def run_suite(suite: Suite, out: Path, pg19: str | None = None, dry_run: bool = False) -> Path | None:
    cells = plan(suite)
    corpus = eval_corpus(suite, pg19)
    settings = suite.model_dump()
    done = _finished(out)
    todo = [c for c in cells if (c["id"], cache.fingerprint(settings, corpus.fingerprint)) not in done]
    print(f"suite {suite.name}: {len(cells)} cells, {len(cells) - len(todo)} already done; "
          f"evaluating on {corpus.name} ({corpus.source})")
    if dry_run:
        for c in cells:
            print(f"  {'todo' if c in todo else 'done'}  {c['id']}")
        return None

    tok = default_tokenizer()
    stream = encode_corpus(tok, corpus, suite.data.split if not corpus.embedded else "test",
                           max_tokens=suite.eval.max_tokens)
    dataset = {"name": corpus.name, "split": suite.data.split if not corpus.embedded else "test",
               "hash": corpus.fingerprint, "tokens": int(stream.numel()), "embedded": corpus.embedded,
               "tokenizer": tokenizer_fingerprint(tok)}
    env = results.environment()
    config_hash = cache.fingerprint(settings, corpus.fingerprint)
    models: dict[tuple, torch.nn.Module] = {}
    for cell in todo:
        key = (cell["model"], cell["seed"], cell["stage"], cell["method"], cell["backend"])
        if key not in models:
            models.clear()
            models[key] = _model_for(suite, cell, out, env, config_hash)
        rec = results.Record(suite=suite.name, cell=cell["id"], metric="perplexity", stage=cell["stage"],
                             model=models[key].harness_info, method=cell["method"], backend=cell["backend"],
                             finetune_context=suite.finetune.context if cell["stage"] == "finetuned" else None,
                             eval_context=cell["eval_context"], dataset=dataset, env=env,
                             config_hash=config_hash, kernel="full via sdpa",
                             settings={"protocol": suite.eval.protocol,
                                       "max_windows": _windows(suite, cell["eval_context"]),
                                       "pretrain_context": suite.pretrain.context, "seed": cell["seed"]})
        t0 = time.perf_counter()
        try:
            res = evaluate_perplexity(models[key], stream, cell["eval_context"], suite.eval.protocol,
                                      max_windows=_windows(suite, cell["eval_context"]), progress=True)
            rec.values, rec.units = res.as_values(), res.units()
            rec.settings.update(res.as_settings())
        except torch.OutOfMemoryError as e:
            rec.status, rec.error = "oom", str(e).splitlines()[0]
        rec.seconds = round(time.perf_counter() - t0, 2)
        results.append(out, rec)
        if rec.status == "ok":
            print(f"  {cell['id']}: perplexity {rec.values['perplexity']:.3f} ({rec.seconds:.1f} s)")
    notes = [] if not corpus.embedded else [
        "PG-19 not configured: perplexity measured on the embedded corpus's held-out books "
        f"({corpus.name}). Set HARNESS_PG19_DIR or pass --pg19 DIR to evaluate on PG-19."]
    return render_report(results.load(out), out, title=f"Suite {suite.name}", notes=notes)


def _windows(suite: Suite, context: int) -> int:
    return max(1, suite.eval.tokens_per_length // context)


def _finished(out: Path) -> set[tuple[str, str]]:
    if not (out / results.RESULTS_FILE).is_file():
        return set()
    return {(r["cell"], r["config_hash"]) for r in results.load(out) if r["status"] == "ok"}


def _model_for(suite: Suite, cell: dict, out: Path, env: dict, config_hash: str) -> torch.nn.Module:
    p = suite.pretrain
    model, info = pretrained_model(cell["model"], pretrain_config(p.context, p.steps, p.batch_size, p.lr,
                                                                  p.warmup_steps, cell["seed"]))
    if cell["stage"] == "pretrained":
        model.harness_info = info
        return model.eval()
    f = suite.finetune
    cfg = TrainConfig(steps=f.steps, context=f.context, batch_size=f.batch_size, grad_accum=f.grad_accum,
                      lr=f.lr, warmup_steps=f.warmup_steps, seed=cell["seed"])
    key = cache.fingerprint(info["hash"], cell["method"], cell["backend"], asdict(cfg), f.rank, f.alpha,
                            cache.code_version(finetune_module))
    info = {**info, "adapter": key}
    if (path := cache.lookup(ADAPTER, key)) is None:
        model, summary = apply_method(model, cell["method"], rank=f.rank, alpha=f.alpha)
        tokens = encode_corpus(default_tokenizer(), default_corpus(), "train")
        workdir = cache.cache_root() / ADAPTER / f".work-{key}"
        workdir.mkdir(parents=True, exist_ok=True)
        log = train(model, lambda g: random_windows(tokens, cfg.context, cfg.batch_size, g), cfg, workdir=workdir,
                    desc=f"fine-tune {cell['method']}/{cell['backend']} @ {cfg.context}")
        with cache.build(ADAPTER, key, {"train": log.values(), **summary.values()}) as path:
            model.save_pretrained(path)
        path = cache.lookup(ADAPTER, key)
    else:
        model = PeftModel.from_pretrained(model, path)
    train_cell = f"{cell['model']}/seed{cell['seed']}/finetuned-{cell['method']}-{cell['backend']}/train"
    if (train_cell, config_hash) not in _finished(out):  # also when the adapter came from the cache
        meta = json.loads((path / cache.META).read_text())
        values = {**meta["train"], "trainable_params": meta["trainable_params"], "total_params": meta["total_params"]}
        results.append(out, results.Record(
            suite=suite.name, cell=train_cell, metric="train", stage="finetuned", model=info, method=cell["method"],
            backend=cell["backend"], finetune_context=f.context, values=values,
            units={"tokens_per_s": "tokens/s", "peak_memory_gib": "GiB"}, env=env, config_hash=config_hash,
            kernel="full via sdpa", settings=asdict(cfg), seconds=round(values["seconds"], 1)))
    model.harness_info = info
    return model.eval()
