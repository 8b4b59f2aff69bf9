"""RULER accuracy (harness.metrics.ruler_eval): one cell per task and length."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, field_validator, model_validator

from harness.cells import Cell
from harness.metrics.base import (
    EVAL_DATA,
    EvalAttention,
    Measurement,
    Metric,
    Strict,
    as_value_error,
    distinct,
    eval_attentions,
    register,
)


class RulerConfig(Strict):
    tasks: list[str] = Field(default_factory=lambda: ["niah_single_1"], min_length=1)  # or ["all"]: the 11
    lengths: Annotated[list[Annotated[int, Field(ge=1)]], AfterValidator(distinct)] = Field(
        default_factory=lambda: [256, 512], min_length=1)
    samples: int = Field(10, ge=1)
    eval_attention: EvalAttention = "full"  # paper default: full; "both": also the fine-tuning attention
    essay_file: str | None = None  # RULER's essay haystack; None: book text of the evaluation corpus
    # The data of the opt-in QA tasks, which is not shipped: {qa_1: SQuAD 2.0 dev JSON, qa_2: HotpotQA dev JSON}
    qa_files: dict[str, str] = {}

    @field_validator("tasks")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from harness.data.ruler import PAPER_TASKS, get_spec

        if v == ["all"]:
            return list(PAPER_TASKS)
        for t in v:
            as_value_error(get_spec, t)  # did-you-mean
        return distinct(v)

    @field_validator("essay_file")
    @classmethod
    def _essay_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"no file {v!r} (relative paths are taken from the working directory, here {Path.cwd()})")
        return v

    @model_validator(mode="after")
    def _qa_data(self) -> RulerConfig:
        from harness.data.ruler import TASKS
        from harness.data.ruler.qa import FORMATS

        opt_in = [t for t in TASKS if TASKS[t].opt_in]
        for task, path in self.qa_files.items():
            if task not in opt_in:
                raise ValueError(f"qa_files: {task!r} is not a task that needs a data file ({', '.join(opt_in)})")
            if not Path(path).is_file():
                raise ValueError(f"qa_files.{task}: no file {path!r} (relative paths are taken from the working "
                                 f"directory, here {Path.cwd()})")
        for task in self.tasks:
            if TASKS[task].opt_in and task not in self.qa_files:
                fmt = FORMATS[TASKS[task].args["dataset"]]
                raise ValueError(f"tasks: {task} needs its data, which is not shipped: set qa_files.{task} to the "
                                 f"path of the {fmt}")
        return self


@register
class Ruler(Metric):
    name = "ruler"
    config = RulerConfig
    modules = ("harness.data.ruler", "harness.metrics.ruler", "harness.metrics.ruler_eval",
               "harness.metrics.decode_check", *EVAL_DATA)
    ranks = True

    def cells(self, config: RulerConfig, variant, plan):
        from harness import cache
        from harness.artefacts import tokenizer
        from harness.errors import UserError

        try:
            tok = tokenizer(plan.suite.model(variant.model))  # lengths are in the model's tokens
        except UserError:  # a checkpoint not on this machine: the runner said so (a dry run goes on without it)
            tok = None
        for task in config.tasks if tok is not None else ():  # where the user is, not an error per cell at run time
            # every sample the cells will build at the shortest length (a sample's needles, drawn from its seed,
            # decide whether it fits), one at the longest; once per model and seed, not per variant
            if plan.memo.get(checked := ("ruler fits", variant.model, variant.seed, task)):
                continue
            where = f"metrics.ruler.lengths (in models.{variant.model}'s tokens)"
            _fits(where, task, min(config.lengths), tok, config.essay_file, config.qa_files.get(task),
                  config.samples, variant.seed)
            _fits(where, task, max(config.lengths), tok, config.essay_file, config.qa_files.get(task), 1, variant.seed)
            plan.memo[checked] = True
        files = [f for f in (config.essay_file, *config.qa_files.values()) if f]  # by content, not path alone
        hashed = {"metric": config.model_dump(exclude={"tasks", "lengths", "eval_attention"}),
                  "data": plan.data_fingerprint,
                  **({"files": [cache.remembered_sha256(f) for f in files]} if files else {})}
        return [(Cell(self.name, variant, n, t, ev), hashed)
                for ev in eval_attentions(config, variant) for t in config.tasks for n in config.lengths]

    def measure(self, ctx, cell: dict, config: RulerConfig) -> Measurement:
        from harness.metrics.ruler_eval import evaluate_ruler

        model, info = ctx.model()
        ctx.use_attention(cell["eval_attention"])
        docs = ctx.documents("eval")
        haystack, dataset = docs.text(HAYSTACK_CHARS), docs.dataset()
        values, samples = evaluate_ruler(model, ctx.tokenizer(), cell["task"], cell["length"], config.samples,
                                         ctx.seed, haystack, config.essay_file, config.qa_files.get(cell["task"]),
                                         ctx.ranks)
        settings = {"task": cell["task"], "samples_file": ctx.write_samples(cell, samples),
                    "eval_attention": cell["eval_attention"], "pretrain_context": ctx.pretrain_context}
        return Measurement(values, {"accuracy": "%"}, settings, dataset, info)

    def section(self, records):
        from harness.report.ruler import ruler_section

        return ruler_section(records)


def _fits(where: str, task: str, length: int, tokenizer, essay_file: str | None, qa_file: str | None, samples: int,
          seed: int) -> None:
    """Raise a UserError naming the suite field (`where`) if the first `samples` samples of `task` with `seed`
    cannot all be built at `length` tokens."""
    from harness.data.ruler.tasks import generate
    from harness.errors import UserError

    try:
        generate(task, length, tokenizer, samples, seed, haystack_text=_FILLER, essay_file=essay_file,
                 qa_file=qa_file)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


HAYSTACK_CHARS = 64_000_000  # RULER's haystack: the evaluation documents up to this many characters
_FILLER = "The grass is green and the sky is blue. " * 4000  # stands in for the haystack text when checking fit
