"""Training a model into the cache: a preset's pretraining by the suite's recipe (its init, its batches), and the
training loop's run in a resumable work directory, which fine-tunes share. This module's source is part of both
cache keys (provenance.PRETRAINED and ADAPTER): an edit here builds the models again."""

from __future__ import annotations

import shutil

import torch

from harness import cache
from harness.data import default_corpus, default_tokenizer, encode_corpus, random_windows
from harness.data.recall import RecallDocuments, recall_batches
from harness.errors import UserError
from harness.finetune.distributed import SINGLE, World
from harness.finetune.loop import TrainConfig, TrainLog, missing_cpu_compiler, train
from harness.models import HybridConfig, HybridForCausalLM
from harness.models.induction import induction_init
from harness.suite import Suite, recall_shares


def pretrain(suite: Suite, config: HybridConfig, cfg: TrainConfig, kind: str, key: str, desc: str,
             device: torch.device) -> tuple[HybridForCausalLM, TrainLog]:
    """A preset `config` pretrained by the suite's recipe on the embedded corpus (mixed with synthetic recall
    documents where its `recall` shares say), resuming from the work directory of cache entry `kind`/`key`."""
    p, corpus, tok = suite.pretrain, default_corpus(), default_tokenizer()
    if p.compile and device.type == "cpu" and (cxx := missing_cpu_compiler()):
        raise UserError(f"pretrain.compile: torch.compile on CPU needs a C++ compiler and {cxx!r} is not on PATH; "
                        "install g++ (or set $CXX), or set `compile: false` in the suite's pretrain block")
    torch.manual_seed(cfg.seed)
    model = HybridForCausalLM(config)
    if p.induction_init is not None:
        induction_init(model, p.induction_init)
    model.to(device)
    tokens = encode_corpus(tok, corpus, "train")
    if max(recall_shares(p.recall)) > 0:
        text = "\n".join(d.text for d in corpus.split("train"))
        documents = RecallDocuments(tok, text, answer_weight=p.answer_weight)
        batches = recall_batches(tokens, documents, p.recall, cfg.context, cfg.batch_size)
    else:
        batches = windows(tokens, cfg)
    return model, train_into_cache(model, cfg, batches, kind, key, desc)


def windows(tokens, cfg: TrainConfig):
    """Batches of random windows of `tokens` at the recipe's context."""
    return lambda g, step: random_windows(tokens, cfg.context, cfg.batch_size, g)


def train_into_cache(model: torch.nn.Module, cfg: TrainConfig, batches, kind: str, key: str, desc: str,
                     world: World = SINGLE) -> TrainLog:
    """`train` with its checkpoints in the work directory of cache entry `kind`/`key`, removed once done."""
    workdir = cache.cache_root() / kind / f".work-{key}"
    workdir.mkdir(parents=True, exist_ok=True)
    log = train(model, batches, cfg, workdir=workdir, desc=desc, world=world)
    world.barrier()
    if world.main:
        shutil.rmtree(workdir)
    return log
