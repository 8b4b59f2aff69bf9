"""A suite as jobs and cells: what each job measures, what determines each cell, and whether it is done.

A job is one model variant (pretrained, or a method x backend fine-tune) with the cells its metrics' plugins
make for it, one attention backend's cells (metrics of kind "backend", as efficiency), or a pretraining. A cell
carries the hash of what determines it (settings) and the fingerprint of the code that measures it
(harness.provenance); `cell_state` compares both with the cell's current record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness import cache, provenance
from harness.cells import Cell, Variant
from harness.errors import UserError
from harness.metrics.base import builtin
from harness.models.sources import label
from harness.results import Record
from harness.suite import Backend, Suite


@dataclass
class Job:
    kind: str  # "pretrain" | "variant" (a model variant's cells) | "backend" (an attention backend's cells)
    name: str
    spec: dict
    cells: list[dict] = field(default_factory=list)


def documents(suite: Suite, role: str, pg19: str | None = None):
    """The documents of the suite's `role` ("train" or "eval") source (harness.data.sources; `pg19`: --pg19)."""
    from harness.data.sources import open_source

    src = suite.data.source(role, pg19)
    try:
        return open_source(src, f"data.{role}")
    except UserError as e:
        if src.source != "pg19":
            raise
        # harness.data.pg19's fixes name every setting: say which one this directory came from
        raise UserError(f"{e} (the PG-19 directory {src.path or '(none)'} came from "
                        f"{suite.data.pg19_origin(role, pg19)})") from None


@dataclass(frozen=True)
class PlanContext:
    """What a metric's `cells` may need besides its config and the variant."""

    suite: Suite
    data_fingerprint: str  # of the evaluation documents
    backend: Backend | None = None  # metrics of kind "backend": the backend whose cells these are
    memo: dict = field(default_factory=dict)  # what a metric's `cells` worked out once for every variant


def plan(suite: Suite, data_fingerprint: str, train_fingerprint: str | None = None,
         checkpoints: dict[str, str] | None = None) -> list[Job]:
    """Every job and cell of the suite, pretraining first; each cell carries the hash of what determines it
    (`data_fingerprint`: of the evaluation documents; `train_fingerprint`: of the fine-tuning text;
    `checkpoints`: each checkpoint's fingerprint by name, harness.models.sources.resolve) and the fingerprint of
    the code that measures it (harness.provenance). Presets get a pretraining job; checkpoints are as loaded."""
    configured = [(m, getattr(suite.metrics, m.name, None)) for m in builtin().values()]
    configured = [(m, c) for m, c in configured if c is not None or m.config is None]
    # a fine-tune's own cells (train) first: its record is written as soon as the fine-tuning ends
    per_variant = sorted([(m, c) for m, c in configured if m.kind == "variant"],
                         key=lambda mc: not mc[0].finetuned_only)
    jobs, ctx = [], PlanContext(suite, data_fingerprint)
    for entry in suite.models if evaluates(suite) else []:
        model = label(entry)
        for seed in suite.seeds:
            if isinstance(entry, str):
                # an unset pretrain.seed stays out of the hashes: cells keep the hashes they had before it existed
                recipe = suite.pretrain.model_dump(exclude={"seed"} if suite.pretrain.seed is None else None)
                base = {"model": model, "seed": seed, "pretrain": recipe}
                pretrain = Cell("pretrain", Variant(model, seed))
                jobs.append(Job("pretrain", pretrain.id, {**base}, [_cell(pretrain, base)]))
            else:
                base = {"model": model, "seed": seed, "checkpoint": (checkpoints or {})[model]}
            variants = [(Variant(model, seed), None)] + [
                (Variant(model, seed, meth, b.label, suite.finetune.context), b)
                for meth in suite.methods for b in suite.backends]
            for variant, backend in variants:
                det = {**base, "method": variant.method, "backend": backend and backend.model_dump(exclude={"label"}),
                       "finetune": suite.finetune.recipe(variant.method, backend.name) if backend else None,
                       **({"train_data": train_fingerprint} if backend and train_fingerprint else {}),
                       **({"parallel": [suite.run.nproc, suite.run.strategy]}  # the global batch, the reduction
                          if backend and suite.run.nproc > 1 else {})}
                cells = [_cell(cell, {**det, **hashed}) for m, config in per_variant
                         if backend is not None or not m.finetuned_only
                         for cell, hashed in m.cells(config, variant, ctx)]
                spec = {**base, "stage": variant.stage, "method": variant.method,
                        "backend": backend and backend.model_dump()}
                jobs.append(Job("variant", variant.id, spec, cells))
    per_backend = [(m, c) for m, c in configured if m.kind == "backend"]
    for b in suite.backends if per_backend else []:
        det, bctx = {"backend": b.model_dump(exclude={"label"})}, PlanContext(suite, data_fingerprint, b)
        cells = [_cell(cell, {**det, **hashed}) for m, config in per_backend
                 for cell, hashed in m.cells(config, None, bctx)]
        jobs.append(Job("backend", f"attention/{b.label}", {"backend": b.model_dump()}, cells))
    return jobs


def evaluates(suite: Suite) -> bool:
    """Whether the suite measures model variants (a metric of kind "variant" is configured), and so reads its
    evaluation data; a suite of efficiency cells alone times attention layers on random tensors."""
    return any(m.kind == "variant" and getattr(suite.metrics, m.name, None) is not None for m in builtin().values())


def _cell(cell: Cell, determined_by: dict) -> dict:
    """The cell as the job receives it: its fields, the hash of its settings, its code fingerprint, and the
    hardware it is measured on where that determines it (harness.hardware)."""
    # a cell's eval_attention, not its metric's setting (full, finetune or both): switching full to both adds the
    # finetune cells and keeps the full ones measured
    ev = None if cell.eval_attention == "full" else cell.eval_attention
    extra = {k: v for k, v in (("length", cell.length), ("task", cell.task), ("eval_attention", ev)) if v is not None}
    return {**cell.as_dict(), "hash": cache.fingerprint(determined_by, cell.metric, extra),
            "code": provenance.fingerprint(cell.metric),
            **({"hardware": determined_by["hardware"]} if "hardware" in determined_by else {})}


#: Why a recorded cell is measured again, by its state.
STALE = {"moved": "measured on other (or unrecorded) hardware (measured again)",
         "changed": "with changed settings (measured again)",
         "stale": "stale: measured by other code (measured again)"}


def cell_state(cell: dict, current: Record | None) -> str:
    """"done" if the cell's current record was measured with its settings (config hash) by the same code
    (fingerprint) and worked, "failed" if it failed so (an OOM at one length is a result: measured again only
    with --retry-failed, `to_measure`); else why it is to be measured: "todo" (never), "moved" (a cell that
    depends on the hardware, recorded on other hardware), "changed", "stale"."""
    if current is None:
        return "todo"
    if current.config_hash != cell["hash"]:
        return "moved" if cell.get("hardware") not in (None, current.settings.get("hardware")) else "changed"
    if current.code.get("fingerprint") != cell["code"]:
        return "stale"
    return "done" if current.status == "ok" else "failed"


def to_measure(state: str, retry_failed: bool) -> bool:
    """Whether a cell in `state` (cell_state) is measured by this run."""
    return state not in ("done", "failed") or retry_failed and state == "failed"


