"""Pretraining the embedded default model at a short context, cached by content.

The cache key covers everything that determines the weights: the model config, the
corpus and tokenizer fingerprints, the recipe, the seed and the code version of the
model and training loop. A second run with the same inputs loads the cached model;
an interrupted run resumes from its last checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import torch

import harness.finetune.loop as loop_module
import harness.models as models_module
from harness import cache
from harness.data import default_corpus, default_tokenizer, encode_corpus, random_windows
from harness.data.tokenizer import tokenizer_fingerprint
from harness.finetune.loop import TrainConfig, train
from harness.models import HybridForCausalLM, preset_config

KIND = "pretrained"


def pretrain_config(context: int, steps: int, batch_size: int, lr: float, warmup_steps: int, seed: int) -> TrainConfig:
    return TrainConfig(steps=steps, context=context, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                       schedule="cosine", weight_decay=0.1, seed=seed)


def pretrained_model(preset: str, cfg: TrainConfig) -> tuple[HybridForCausalLM, dict]:
    """The preset pretrained on the embedded corpus's train split; (model, info for records)."""
    corpus, tok = default_corpus(), default_tokenizer()
    config = preset_config(preset)
    config.vocab_size = len(tok)
    key = cache.fingerprint(config.to_dict(), corpus.fingerprint, tokenizer_fingerprint(tok), asdict(cfg),
                            cache.code_version(models_module, loop_module))
    info = {"preset": preset, "hash": key, "pretrain_context": cfg.context, "corpus": corpus.name}
    if (path := cache.lookup(KIND, key)) is not None:
        meta = json.loads((path / cache.META).read_text())
        return HybridForCausalLM.from_pretrained(path), {**info, "train": meta.get("train")}

    torch.manual_seed(cfg.seed)
    model = HybridForCausalLM(config)
    tokens = encode_corpus(tok, corpus, "train")
    workdir = cache.cache_root() / KIND / f".work-{key}"
    workdir.mkdir(parents=True, exist_ok=True)
    log = train(model, lambda g: random_windows(tokens, cfg.context, cfg.batch_size, g), cfg, workdir=workdir,
                desc=f"pretrain {preset} @ {cfg.context}")
    with cache.build(KIND, key, {**info, "train": log.values()}) as out:
        model.save_pretrained(out)
    for f in workdir.iterdir():
        f.unlink()
    workdir.rmdir()
    return model, {**info, "train": log.values()}
