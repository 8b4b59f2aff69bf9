"""The declarative suite file (YAML): schema, validation with clear errors, expansion into cells."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from harness.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Pretrain(_Strict):
    context: int = Field(256, ge=16)
    steps: int = Field(600, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(30, ge=0)


class Finetune(_Strict):
    context: int = Field(2048, ge=16)
    steps: int = Field(40, ge=1)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(2, ge=1)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(20, ge=0)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)


class Eval(_Strict):
    metric: Literal["perplexity"] = "perplexity"
    protocol: Literal["longlora", "stride"] = "longlora"
    contexts: list[int] = Field(default_factory=lambda: [256, 512, 1024, 2048, 4096], min_length=1)
    # Windows per length = max(1, tokens_per_length // context), evenly spaced over the stream, so every
    # length scores about the same number of tokens (a fixed window count starves the short contexts).
    tokens_per_length: int = Field(65_536, ge=1)
    max_tokens: int = Field(1_000_000, ge=1)  # evaluation stream cap (first tokens of the split)


class Data(_Strict):
    pg19: str | None = None  # PG-19 root; None -> $HARNESS_PG19_DIR, else the embedded corpus
    split: str = "test"


class Suite(_Strict):
    name: str
    description: str = ""
    models: list[str] = Field(default_factory=lambda: ["tiny-hybrid"], min_length=1)
    methods: list[Literal["lora"]] = Field(default_factory=lambda: ["lora"])
    backends: list[Literal["full"]] = Field(default_factory=lambda: ["full"])
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    pretrain: Pretrain = Field(default_factory=Pretrain)
    finetune: Finetune = Field(default_factory=Finetune)
    eval: Eval = Field(default_factory=Eval)
    data: Data = Field(default_factory=Data)

    @model_validator(mode="after")
    def _contexts_fit(self) -> Suite:
        if any(c < 2 for c in self.eval.contexts):
            raise ValueError("eval.contexts: every context must be >= 2")
        return self


def load_suite(path: str | Path) -> Suite:
    """Parse and validate a suite file; every problem becomes a UserError naming file and field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: suite file not found (suites live in suites/*.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: malformed YAML: {e}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a suite must be a YAML mapping with at least `name:`")
    try:
        return Suite.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{path}: " + "; ".join(_describe(err) for err in e.errors())) from None


def _describe(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        field, parent = str(err["loc"][-1]), _model_at(err["loc"][:-1])
        hint = difflib.get_close_matches(field, list(parent.model_fields), n=1) if parent else []
        fix = f"did you mean {hint[0]!r}?" if hint else f"allowed: {', '.join(parent.model_fields)}" if parent else ""
        return f"{where}: unknown field ({fix})"
    return f"{where}: {err['msg']} (got {err.get('input')!r})"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Suite
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model
