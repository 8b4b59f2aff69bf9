"""The model variants a suite measures, built once and cached by content.

- pretrained: a preset pretrained at a short context on the embedded corpus mixed with synthetic recall
  documents (harness.data.recall), its attention induction-initialised; key = config, corpus
  and tokenizer fingerprints, recipe, seed and the code that builds it (provenance.PRETRAINED).
- finetuned: the pretrained model + a method (LoRA, ...) trained at the fine-tuning context with an
  attention backend on the suite's `data.train` text; key = base key, method, backend options, recipe, seed,
  the text's fingerprint and the code that builds it
  (provenance.ADAPTER, this module included: it says how adapters are built); with `run.nproc` > 1 it is
  trained on that many processes (harness.finetune.distributed), whose count and strategy are in the key.
Interrupted training resumes from its last checkpoint in the cache's work directory. Builders of one key take
turns (cache.ensure), so two jobs never build the same artefact.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

import harness.attention as attention_module
from harness import cache, provenance
from harness.attention import register
from harness.attention.hf import uses_attention_interface
from harness.data import default_corpus, default_tokenizer
from harness.data.long_recall import SpreadRecallDocuments, mixed_batches
from harness.data.sources import Documents
from harness.data.tokenizer import tokenizer_fingerprint
from harness.data.tokens import token_stream
from harness.errors import UserError
from harness.finetune.distributed import SINGLE, World, full_state, wrap
from harness.finetune.loop import TrainConfig, checkpoint_activations
from harness.finetune.methods import apply_method, load_method, save_method
from harness.models import HybridConfig, HybridForCausalLM, preset_config
from harness.models.sources import Checkpoint, check_vocabulary, label, load_model, load_tokenizer, resolve
from harness.pretraining import pretrain, train_into_cache, windows
from harness.suite import Backend, Suite

PRETRAINED, ADAPTER = "pretrained", "adapter"


def pretrain_config(suite: Suite, seed: int) -> TrainConfig:
    """The pretraining recipe of the variants of `seed` (`pretrain.seed`, where set, instead)."""
    p = suite.pretrain
    return TrainConfig(steps=p.steps, context=p.context, batch_size=p.batch_size, lr=p.lr,
                       warmup_steps=p.warmup_steps, schedule="cosine", weight_decay=0.1, betas=(0.9, 0.95),
                       seed=seed if p.seed is None else p.seed, compile=p.compile, average_last=p.average_last)


def finetune_config(suite: Suite, method: str, backend: Backend, seed: int) -> TrainConfig:
    """The training settings of `method` fine-tuning with `backend` (Finetune.recipe: the backend's LR, unused
    settings at their defaults)."""
    f = suite.finetune.recipe(method, backend.name)
    return TrainConfig(steps=f["steps"], context=f["context"], batch_size=f["batch_size"], grad_accum=f["grad_accum"],
                       lr=f["lr"], extra_lr_scale=f["extra_lr_scale"], warmup_steps=f["warmup_steps"], seed=seed,
                       checkpoint_every=suite.run.checkpoint_every)


def device() -> torch.device:
    """Where variants are trained and evaluated: the job's GPU (the runner gives each job one), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tokenizer(model: str | Checkpoint):
    """The tokenizer of a `models:` entry: the embedded one for presets, the checkpoint's own otherwise (loaded
    once per process)."""
    return default_tokenizer() if isinstance(model, str) else _checkpoint_tokenizer(model.model_dump_json())


@functools.cache
def _checkpoint_tokenizer(entry: str):
    return load_tokenizer(resolve(Checkpoint.model_validate_json(entry)))


def base(suite: Suite, model: str | Checkpoint, seed: int) -> tuple[torch.nn.Module, dict]:
    """(the variant fine-tunes start from, in eval mode on `device()`, info with its "hash"): a preset pretrained
    by the recipe, or a checkpoint as loaded."""
    if isinstance(model, str):
        return pretrained(suite, model, seed)
    resolved = resolve(model)
    loaded = load_model(resolved)
    check_vocabulary(resolved, tokenizer(model), loaded)
    return loaded.to(device()), {**resolved.info(), "train": None}


def base_info(suite: Suite, model: str | Checkpoint, seed: int) -> dict:
    """`base`'s info less the training log, without loading (or pretraining) the model."""
    return _pretrained_spec(suite, model, seed)[0] if isinstance(model, str) else resolve(model).info()


def _pretrained_spec(suite: Suite, preset: str, seed: int) -> tuple[dict, HybridConfig, TrainConfig]:
    """(info with the cache key as "hash", model config, training config) of a preset's pretraining."""
    cfg = pretrain_config(suite, seed)
    corpus, tok = default_corpus(), default_tokenizer()
    config = preset_config(preset)
    config.vocab_size = len(tok)
    p = suite.pretrain
    recipe = {"recall": p.recall, "answer_weight": p.answer_weight, "induction_init": p.induction_init}
    key = cache.fingerprint(config.to_dict(), corpus.fingerprint, tokenizer_fingerprint(tok), asdict(cfg), recipe,
                            provenance.artefact_fingerprint(provenance.PRETRAINED))
    return {"preset": preset, "hash": key, "pretrain_context": cfg.context, "corpus": corpus.name}, config, cfg


def pretrained(suite: Suite, preset: str, seed: int) -> tuple[HybridForCausalLM, dict]:
    """(model in eval mode on `device()`, info with its cache key and training log)."""
    info, config, cfg = _pretrained_spec(suite, preset, seed)
    path = cache.ensure(PRETRAINED, info["hash"], lambda: _pretrain(suite, info, config, cfg))
    meta = json.loads((path / cache.META).read_text())
    model = _load(path, lambda: HybridForCausalLM.from_pretrained(path)).to(device())
    return model.eval(), {**info, "train": meta["train"], **trained_on(meta)}


def trained_on(meta: dict) -> dict:
    """{"trained_on": the machine that built a cached model} (harness.hardware.describe), where its meta says:
    a record's training throughput and memory are that machine's, whichever job records them later."""
    return {"trained_on": meta["trained_on"]} if meta.get("trained_on") else {}


def _built_on() -> str:
    from harness.hardware import describe
    from harness.results import environment

    return describe(environment())


def _pretrain(suite: Suite, info: dict, config: HybridConfig, cfg: TrainConfig) -> None:
    """Pretrain a preset by the suite's recipe (harness.pretraining) and write it into the cache under
    `info["hash"]`."""
    key = info["hash"]
    model, log = pretrain(suite, config, cfg, PRETRAINED, key, f"pretrain {info['preset']} @ {cfg.context}", device())
    with cache.build(PRETRAINED, key, {**info, "trained_on": _built_on(), "train": log.values()}) as d:
        model.save_pretrained(d)


def finetuned(suite: Suite, model: str | Checkpoint, seed: int, method: str, backend: Backend,
              data: Documents, launch: Callable[[], None] | None = None) -> tuple[torch.nn.Module, dict]:
    """(`base` + `method` trained with `backend` at the fine-tuning context on `data`, info), built as
    `ensure_adapter` says."""
    path, info = ensure_adapter(suite, model, seed, method, backend, data, launch)
    start, _ = base(suite, model, seed)
    meta = json.loads((path / cache.META).read_text())
    return _load(path, lambda: load_method(start, path)).eval(), {**info, "train": meta["train"], **trained_on(meta)}


def ensure_adapter(suite: Suite, model: str | Checkpoint, seed: int, method: str, backend: Backend, data: Documents,
                   launch: Callable[[], None] | None = None) -> tuple[Path, dict]:
    """(cache path of the fine-tune `adapter_key` names, its info without the training log), loading nothing
    where it is cached; else `launch` (given when `run.nproc` > 1) builds it on several processes, or it is built
    here."""
    key, info = adapter_key(suite, model, seed, method, backend, data)
    build = launch or (lambda: build_adapter(suite, model, seed, method, backend, data))
    return cache.ensure(ADAPTER, key, build), info


def adapter_key(suite: Suite, model: str | Checkpoint, seed: int, method: str, backend: Backend,
                data: Documents) -> tuple[str, dict]:
    """(cache key of a fine-tune, its info without the training log), known without loading the model."""
    start = base_info(suite, model, seed)
    f, cfg, run = suite.finetune, finetune_config(suite, method, backend, seed), suite.run
    parallel = [] if run.nproc == 1 else [run.nproc, run.strategy]  # the order of the gradient sums
    recall = [f.recall, f.answer_weight] if f.recall else []
    recipe = {k: v for k, v in asdict(cfg).items() if k != "checkpoint_every"}  # how often to save is no recipe
    shape = f.recipe(method, backend.name)  # LoRA's rank and alpha, where the method has adapters
    key = cache.fingerprint(start["hash"], method, backend.name, backend.options, recipe, shape["rank"], shape["alpha"],
                            f.gradient_checkpointing, data.fingerprint, *parallel, *recall,
                            provenance.artefact_fingerprint(provenance.ADAPTER))
    global_batch = {"nproc": run.nproc, "global_batch": cfg.batch_size * cfg.grad_accum * run.nproc,
                    **({"strategy": run.strategy} if run.nproc > 1 else {})}
    data_info = {"finetune_data": data.description, **({"finetune_recall": f.recall} if f.recall else {})}
    return key, {**start, "adapter": key, "train": None, **data_info, **global_batch}


def build_adapter(suite: Suite, model: str | Checkpoint, seed: int, method: str, backend: Backend, data: Documents,
                  world: World = SINGLE) -> None:
    """Train the fine-tune `adapter_key` names and write it into the cache (on several ranks: this rank's share;
    rank 0 writes)."""
    key, _ = adapter_key(suite, model, seed, method, backend, data)
    start, _ = base(suite, model, seed)
    f, cfg = suite.finetune, finetune_config(suite, method, backend, seed)
    use_attention(start, backend, "finetune")
    if f.gradient_checkpointing:
        checkpoint_activations(start)
    torch.manual_seed(seed)  # adapter init draws from the global RNG, whose start differs per process
    trained, summary = apply_method(start, method, rank=f.rank, alpha=f.alpha)
    with attention_module.recording() as kernels:
        tokens = token_stream(tokenizer(model), data)
        batches = world.shard(_finetune_batches(suite, model, tokens, data, cfg))
        log = train_into_cache(wrap(trained, world), cfg, batches, ADAPTER, key,
                               f"fine-tune {method}/{backend.label} @ {cfg.context}", world)
    state = full_state(trained)  # every rank takes part; rank 0 gets it
    if world.main:
        meta = {"what": f"{label(model)} seed {seed}: {method}/{backend.label} @ {cfg.context}",  # `harness cache ls`
                "trained_on": _built_on(),
                "train": {**log.values(), **summary.values(), "trainable_names": summary.trainable_names,
                          "kernels": sorted(kernels)}}
        with cache.build(ADAPTER, key, meta) as d:
            save_method(trained, d, state)
    world.barrier()


def _load(path, load):
    """`load()` of a cached artefact; a failure names the entry and how to rebuild it."""
    try:
        return load()
    except Exception as e:  # noqa: BLE001 - whatever the loader raised, the fix is the same
        raise UserError(f"cache entry {path.parent.name}/{path.name} ({path}) cannot be loaded ({type(e).__name__}: "
                        f"{e}); remove it with `harness cache rm {path.name}` and rerun to rebuild it") from e


def _finetune_batches(suite: Suite, model: str | Checkpoint, tokens, data: Documents, cfg: TrainConfig):
    """Book windows, with the `finetune.recall` share of rows spread recall documents over the same text."""
    f = suite.finetune
    if not f.recall:
        return windows(tokens, cfg)
    documents = SpreadRecallDocuments(tokenizer(model), data.text(RECALL_TEXT_CHARS), answer_weight=f.answer_weight)
    return mixed_batches(tokens, documents, f.recall, cfg.context, cfg.batch_size)


RECALL_TEXT_CHARS = 4_000_000  # the text recall documents take their words and filler sentences from


def use_attention(model: torch.nn.Module, backend: Backend | None, eval_attention: str) -> str:
    """Switch a model's attention: its fine-tuning `backend` when `eval_attention` is "finetune" (None: a
    pretrained model, which has none), else full attention; return the implementation name. Both go through
    register(), so the kernel that ran is recorded. A model whose attention does not go through transformers'
    AttentionInterface keeps its own ("native"), which is full attention; any other backend is an error."""
    chosen = backend if eval_attention == "finetune" and backend is not None else Backend(name="full", label="full")
    if not uses_attention_interface(model):
        if chosen.name != "full":
            raise UserError(f"backend {chosen.label}: {type(model).__name__} ({model.config.model_type}) has no "
                            "attention that goes through transformers' AttentionInterface; only `full` applies")
        return "native"
    name = register(chosen.name, **chosen.options)
    model.set_attn_implementation(name)
    return name

