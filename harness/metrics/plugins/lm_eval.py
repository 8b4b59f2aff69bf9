"""Downstream tasks of lm-eval (harness.metrics.lm_eval): one cell per task or group."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from harness.cells import Cell
from harness.metrics.base import EvalAttention, Measurement, Metric, Strict, eval_attentions, register


class LmEvalConfig(Strict):
    """lm-eval tasks through its HFLM wrapper. Task names are checked when the metric runs (that needs lm-eval's
    task index, an optional extra and seconds to build); this checks what is cheap."""

    tasks: list[str] = Field(min_length=1)  # lm-eval task or group names, or tasks of YAML files in include_path
    limit: int | None = Field(None, ge=1)  # first N documents of each task; None: all
    num_fewshot: int | None = Field(None, ge=0)  # None: the task's own default
    batch_size: int = Field(1, ge=1)  # loglikelihood requests per forward; generation always runs one at a time
    max_length: int | None = Field(None, ge=16)  # tokens a request may use; None: finetune.context
    include_path: str | None = None  # a directory of local task YAMLs (relative to the working directory)
    eval_attention: EvalAttention = "full"  # paper default: full; "both": also the fine-tuning attention

    @field_validator("tasks")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if any(not t.strip() for t in v) or len(set(v)) != len(v):
            raise ValueError("task names must be non-empty and distinct")
        return v

    @field_validator("include_path")
    @classmethod
    def _directory(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_dir():
            raise ValueError(f"no directory {v!r} (relative paths are taken from the working directory, "
                             f"here {Path.cwd()})")
        return v


@register
class LmEval(Metric):
    name = "lm_eval"
    config = LmEvalConfig
    modules = ("harness.metrics.lm_eval", "harness.metrics.decode_check", "harness.data.tokenizer")

    def check(self, config: LmEvalConfig, suite) -> None:
        if config.max_length is None:
            config.max_length = suite.finetune.context

    def cells(self, config: LmEvalConfig, variant, plan):
        from harness.metrics.lm_eval import local_tasks_fingerprint

        hashed = {"metric": config.model_dump(exclude={"tasks", "eval_attention"}),
                  "local_tasks": local_tasks_fingerprint(config.include_path)}
        return [(Cell(self.name, variant, task=t, eval_attention=ev), hashed)
                for ev in eval_attentions(config, variant) for t in config.tasks]

    def measure(self, ctx, cell: dict, config: LmEvalConfig) -> Measurement:
        from harness.metrics.lm_eval import evaluate_lm_eval, task_manager

        model, info = ctx.model()
        ctx.use_attention(cell["eval_attention"])
        if "lm_eval_tasks" not in ctx.state:  # one task index per job: building it takes seconds
            ctx.state["lm_eval_tasks"] = task_manager(config.tasks, config.include_path)
        res = evaluate_lm_eval(model, ctx.tokenizer(), cell["task"], ctx.state["lm_eval_tasks"],
                               limit=config.limit, num_fewshot=config.num_fewshot, batch_size=config.batch_size,
                               max_length=config.max_length)
        settings = {**res.settings, "samples_file": ctx.write_samples(cell, res.samples),
                    "include_path": config.include_path, "eval_attention": cell["eval_attention"],
                    "pretrain_context": ctx.pretrain_context}
        return Measurement(res.values, {}, settings, res.dataset, info)

    def section(self, records):
        from harness.report.lm_eval import lm_eval_section

        return lm_eval_section(records)
