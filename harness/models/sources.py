"""Checkpoints in a suite's `models:` list: a mamba_ssm or transformers directory, or a hub id in the HF cache,
measured as it is (its "pretrained" variant is the checkpoint as loaded; presets are what harness.artefacts
pretrains). `resolve` finds the files and fingerprints them by content; `load_model` and `load_tokenizer` read
them with every mismatch named.

    models:
      - name: m2h-2.7b                         # the label of its records and report rows
        path: state-spaces/mamba2attn-2.7b     # a directory, or a hub id (+ revision) already in the HF cache
        format: auto                           # auto | mamba_ssm | hf (auto: a config.json without model_type
                                               #   is mamba_ssm's)
        tokenizer: EleutherAI/gpt-neox-20b     # a directory or hub id; default: the model's directory
        dtype: bfloat16                        # compute dtype on CUDA (CPU: float32); A_log, D, dt_bias stay fp32
        context: 2048                          # its pretraining context, the "1x"; hf default: its config's

Fingerprint: the hub revision's commit where the files come from the HF cache, else config.json and the full
SHA-256 of every weight file, remembered per (path, size, modification time) in the artefact cache so a
checkpoint is hashed once; with the tokenizer's files, the dtype and the context. Never the name: two
checkpoints under one name are two models.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness import cache
from harness.errors import UserError

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"  # generate() merges it: RULER's decoding depends on it
WEIGHT_SUFFIXES = (".safetensors", ".bin")
KEEP_FP32 = ("A_log", "D", "dt_bias")  # SSM parameters mamba_ssm keeps in float32 under a half-precision model
_TOKENIZER_FILE = re.compile(r"^(tokenizer.*|vocab.*|merges.*|special_tokens_map.*|.*\.model)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


NAMED = {  # checkpoints a suite may name with a string
    "mamba2attn-2.7b": {"path": "state-spaces/mamba2attn-2.7b", "format": "mamba_ssm",
                        "tokenizer": "EleutherAI/gpt-neox-20b", "context": 2048},
}


class Checkpoint(BaseModel):
    """A `models:` entry that names a checkpoint (a preset is a plain string)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    path: str
    revision: str | None = None
    format: Literal["auto", "mamba_ssm", "hf"] = "auto"
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    context: int | None = Field(None, ge=16, strict=True)

    @field_validator("name")
    @classmethod
    def _label(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"{v!r}: a model name is part of every cell id: use letters, digits, '.', '_', '-'")
        if v == "attention":  # the cell ids of the attention benchmark start so (harness.cells), and --only globs
            raise ValueError("'attention' begins the cell ids of the attention benchmark: name the model otherwise")
        return v


def model_entry(name: str) -> str | Checkpoint:
    """A `models:` string: a preset the harness pretrains, or a named checkpoint; ValueError naming both lists."""
    from harness.models.presets import PRETRAINABLE

    if name in PRETRAINABLE:
        return name
    if name in NAMED:
        return Checkpoint(name=name, **NAMED[name])
    import difflib

    hint = difflib.get_close_matches(name, [*PRETRAINABLE, *NAMED], n=1)
    raise ValueError(f"unknown model {name!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}: presets the harness "
                     f"pretrains: {', '.join(PRETRAINABLE)}; named checkpoints: {', '.join(NAMED)}; or a mapping "
                     "{name, path, ...} for a checkpoint of one's own")


def label(model: str | Checkpoint) -> str:
    return model if isinstance(model, str) else model.name


@dataclass(frozen=True)
class Resolved:
    """A checkpoint found on disk: its directory, format, pretraining context and content fingerprint."""

    entry: Checkpoint
    directory: Path
    format: str  # mamba_ssm | hf
    model_type: str
    context: int
    fingerprint: str
    tokenizer: Path  # the tokenizer's directory

    def info(self) -> dict:
        """The `model` fields of a record measured on it."""
        return {"name": self.entry.name, "path": str(self.directory), "format": self.format,
                "model_type": self.model_type, "tokenizer": str(self.tokenizer), "dtype": self.entry.dtype,
                "hash": self.fingerprint, "pretrain_context": self.context}


def resolve(entry: Checkpoint) -> Resolved:
    """Find `entry`'s files and fingerprint them (weights, config, tokenizer files, dtype, context); a UserError
    names the entry and the fix."""
    where = f"models.{entry.name}"
    directory, revision = _directory(entry.path, entry.revision, f"{where}.path")
    config = _config(directory, where)
    fmt = entry.format if entry.format != "auto" else ("hf" if "model_type" in config else "mamba_ssm")
    if fmt == "hf" and "model_type" not in config:
        raise UserError(f"{where}.format: hf, but {directory / CONFIG} has no model_type: a mamba_ssm checkpoint's "
                        "config has none; fix: `format: mamba_ssm` (or auto)")
    context = entry.context or (config.get("max_position_embeddings") or config.get("n_positions")  # GPT-2's name
                                if fmt == "hf" else None)
    if not context:
        why = "a mamba_ssm config.json does not say it" if fmt == "mamba_ssm" else f"its {CONFIG} does not say it"
        raise UserError(f"{where}: set `context:` (its pretraining context, the 1x of every length); {why}")
    weights = weight_files(directory)
    if not weights:
        raise UserError(f"{where}: {directory} has no weights (*.safetensors or *.bin); fix: download them too")
    tokenizer = _directory(entry.tokenizer, None, f"{where}.tokenizer")[0] if entry.tokenizer else directory
    generation = [f for f in [directory / GENERATION_CONFIG] if f.is_file()]
    parts = ([revision] if revision else [hashlib.sha256((directory / CONFIG).read_bytes()).hexdigest(),
                                          *map(cache.remembered_sha256, weights + generation)])
    tokenizer_files = [(f.name, cache.remembered_sha256(f)) for f in sorted(tokenizer.iterdir())
                       if _TOKENIZER_FILE.match(f.name)]
    return Resolved(entry, directory, fmt, config.get("model_type", "mamba_ssm"), int(context),
                    cache.fingerprint(fmt, parts, tokenizer_files, entry.dtype, int(context)), tokenizer)


def _directory(path: str, revision: str | None, field: str) -> tuple[Path, str | None]:
    """(local directory, hub commit or None) of a path or hub id; errors name the suite's `field`."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local.resolve(), None
    if local.is_file():
        raise UserError(f"{field}: {local} is a file; fix: the directory that holds it ({local.parent})")
    if not _HUB_ID.match(path):
        raise UserError(f"{field}: {local} does not exist; fix: a directory or a hub id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        snapshot = Path(snapshot_download(path, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache, whichever way the hub library says it
        raise UserError(f"{field}: {path} is not a directory and not in the HF cache ({HF_HUB_CACHE}); fix: on "
                        f"a machine with network, `hf download {path}{f' --revision {revision}' if revision else ''}` "
                        "(it goes to that cache), or set it to a local copy") from None
    return snapshot, snapshot.name  # snapshots/<commit>


def _config(directory: Path, where: str) -> dict:
    file = directory / CONFIG
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{where}: {directory} has no {CONFIG}; fix: point path at the checkpoint directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: {file} is unreadable ({e}); fix: download it again") from None
    if not isinstance(config, dict):
        raise UserError(f"{where}: {file} is not a JSON object")
    return config


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory (every shard of a sharded one)."""
    return sorted(f for f in directory.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES
                  and not f.name.startswith("training_args"))


def compute_dtype(entry: Checkpoint, cuda: bool | None = None) -> torch.dtype:
    """The entry's `dtype` on CUDA, float32 on a CPU: this machine's, or where `cuda` says it ran."""
    return getattr(torch, entry.dtype) if (torch.cuda.is_available() if cuda is None else cuda) else torch.float32


def load_model(r: Resolved, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The checkpoint's model in eval mode, in `dtype` (default: its compute dtype on this machine;
    harness.models.checkpoint for mamba_ssm)."""
    dtype, where = dtype or compute_dtype(r.entry), f"models.{r.entry.name}"
    if r.format == "mamba_ssm":
        from harness.models.checkpoint import load_mamba_ssm_checkpoint

        try:
            return load_mamba_ssm_checkpoint(r.directory, dtype, keep_fp32=KEEP_FP32)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    from transformers import AutoModelForCausalLM

    try:
        model, loading = AutoModelForCausalLM.from_pretrained(r.directory, dtype=dtype, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - an unknown model type, a broken file: the entry is the user's to fix
        raise UserError(f"{where}: transformers cannot load {r.directory} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    problems = [f"{k.replace('_', ' ')} ({len(v)}): {', '.join(map(str, sorted(v)[:8]))}{' ...' if len(v) > 8 else ''}"
                for k, v in loading.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v]
    if problems:
        raise UserError(f"{where}: the weights in {r.directory} do not match its {CONFIG}: " + "; ".join(problems))
    for name, p in model.named_parameters():  # transformers casts them with the rest (NemotronH excepted)
        if name.rsplit(".", 1)[-1] in KEEP_FP32 and p.dtype != torch.float32:
            p.data = p.data.float()  # stored in fp32, their values were rounded to `dtype` once, at loading
    return model.eval()


_POSITION_TABLE = re.compile(r"(^|\.)(wpe|embed_positions|position_embeddings)$")


def meta_model(r: Resolved) -> torch.nn.Module | None:
    """The checkpoint's model built on the meta device (no weights read), or None where it cannot be built
    (load_model then names the problem)."""
    try:
        with torch.device("meta"):
            if r.format == "mamba_ssm":
                from harness.models import HybridForCausalLM
                from harness.models.checkpoint import load_mamba_ssm_config

                return HybridForCausalLM(load_mamba_ssm_config(r.directory))
            from transformers import AutoConfig, AutoModelForCausalLM

            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(r.directory))
    except Exception:  # noqa: BLE001 - a model that cannot be built: load_model names the problem
        return None


def position_limit(model: torch.nn.Module) -> int | None:
    """The longest input a model's learned absolute position embeddings cover (GPT-2's `wpe`, OPT's
    `embed_positions` less its offset), or None where positions are relative (RoPE, ALiBi) or absent (SSM
    layers, NoPE): those run at any length, which is what measuring beyond the pretraining context needs."""
    tables = [m.num_embeddings - getattr(m, "offset", 0) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Embedding) and _POSITION_TABLE.search(name)]
    return min(tables, default=None)


def load_tokenizer(r: Resolved, model: torch.nn.Module | None = None):
    """The checkpoint's tokenizer (its `tokenizer:` entry, else its directory); with `model`, checked against
    its embedding."""
    where, name, directory = f"models.{r.entry.name}", r.entry.tokenizer, r.tokenizer
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # noqa: BLE001
        fix = ("a mamba_ssm directory ships none: set `tokenizer:` (state-spaces models use EleutherAI/gpt-neox-20b)"
               if r.format == "mamba_ssm" and not name else "point `tokenizer:` at a tokenizer directory or hub id")
        raise UserError(f"{where}: no tokenizer in {directory} ({type(e).__name__}); fix: {fix}") from None
    if not tok.is_fast:
        raise UserError(f"{where}: the tokenizer in {directory} is a slow (Python) one; the harness streams text "
                        "through a fast tokenizer (tokenizer.json); fix: point `tokenizer:` at a fast one")
    tok.model_max_length = sys.maxsize  # the harness windows long streams itself
    if model is not None:
        check_vocabulary(r, tok, model)
    return tok


def check_vocabulary(r: Resolved, tok, model: torch.nn.Module) -> None:
    """A UserError if the tokenizer has ids the model has no embedding for."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tok) > rows:
        raise UserError(f"models.{r.entry.name}: the tokenizer has {len(tok)} tokens, more than the model's {rows} "
                        "embeddings; fix: the tokenizer it was trained with")
