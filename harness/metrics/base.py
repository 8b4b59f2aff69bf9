"""What a metric is to the harness: a plugin with its suite config, its cells, its measurement, its report section.

    @register
    class Toy(Metric):
        name = "toy"                      # the key under a suite's `metrics:`
        config = ToyConfig                # a pydantic model: the suite block, validated with file/line errors
        def cells(self, config, variant, plan): return [(Cell("toy", variant, length=n), {"metric": ...}), ...]
        def measure(self, ctx, cell, config): return Measurement(values={...})
        def section(self, records): return None or {"id", "title", "blocks"}

`cells` gives each cell with what determines it beyond the variant (hashed into the cell's config hash), and
runs in the runner's process; `measure` runs in the job's process (harness.job.Context gives it the model, the
evaluation data and the results directory) and must import heavy modules (torch) itself, so that loading a
suite stays fast. With `run.nproc` > 1 a variant's job runs on that many ranks: a metric that sets `ranks`
measures its share on each (`ctx.ranks`, `Ranks`) and joins the shares with `ctx.ranks.gather`; any other is
measured by rank 0 while the other ranks wait. A metric of `kind` "backend" makes cells per attention backend
(no model: `variant` None).
A metric module outside this package is named in the suite's `plugins:` list, which imports it in every process.
The code behind a cell (harness.provenance) is the metric's module plus `modules`.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, field_validator

from harness.errors import UserError

# The modules that load evaluation data (corpora, tokenizer): part of the code behind an evaluation cell.
EVAL_DATA = ("harness.data.corpus", "harness.data.embedded", "harness.data.pg19", "harness.data.sources",
             "harness.data.tokenizer")


class Strict(BaseModel):
    """A suite block: unknown fields are errors (with a did-you-mean), and so is a boolean where a number is due."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, v, info):
        # pydantic takes true for 1, and YAML reads yes/no/on/off as booleans: `seeds: [yes]` would run seed 1
        items = v.values() if isinstance(v, dict) else v if isinstance(v, list) else [v]
        if any(isinstance(x, bool) for x in items) and _numbers_only(cls.model_fields[info.field_name].annotation):
            raise ValueError("a boolean where a number is due (YAML reads true/false, yes/no and on/off as "
                             "booleans); write the number")
        return v


def _numbers_only(ann) -> bool:
    """Whether the annotation `ann` takes an int or a float, but not a bool."""
    leaves = _leaves(ann)
    return any(t in (int, float) for t in leaves) and bool not in leaves


def _leaves(ann) -> list:
    return [leaf for a in get_args(ann) for leaf in _leaves(a)] if get_args(ann) else [ann]


def as_value_error(check, value) -> None:
    """Run a check that raises UserError, as a pydantic validation error (so the message gets file and line)."""
    try:
        check(value)
    except UserError as e:
        raise ValueError(str(e)) from None


def distinct(values: list) -> list:
    """Validator of a list whose items must not repeat (lengths, tasks, models, ...): a repeat is an error."""
    repeated = sorted({repr(v) for i, v in enumerate(values) if v in values[:i]})
    if repeated:
        raise ValueError(f"each value may appear once; repeated: {', '.join(repeated)}")
    return values


#: A metric's `eval_attention`: full (the paper's default), the variant's fine-tuning attention, or each of them.
EvalAttention = Literal["full", "finetune", "both"]


def eval_attentions(config, variant) -> list[str]:
    """The attentions a variant's cells are evaluated with ("full", "finetune"): the config's for a fine-tuned
    variant; a pretrained model has no fine-tuning attention, so always full. With "both", a fine-tune under
    the full backend is measured once: its own attention is full, and a second pass would repeat the first."""
    if variant.stage != "finetuned":
        return ["full"]
    if config.eval_attention == "both":
        return ["full"] if variant.backend == "full" else ["full", "finetune"]
    return [config.eval_attention]


@dataclass(frozen=True)
class Ranks:
    """The processes a cell is measured on: this one's `rank` of `size`. `gather(part)` returns every rank's part
    of the cell in rank order; it is the cell's one collective (call it once per cell, on every rank), and an
    error on any rank raises from it on all of them."""

    rank: int = 0
    size: int = 1
    gather: Callable[[Any], list] = field(default=lambda part: [part], compare=False)

    def share(self, items: list) -> list:
        """This rank's share of `items`: every `size`-th, from the `rank`-th on."""
        return items[self.rank::self.size]

    def join(self, shares: list[list]) -> list:
        """The items of every rank's `share` (in rank order), in their order before sharing."""
        return [shares[i % self.size][i // self.size] for i in range(sum(map(len, shares)))]


ONE = Ranks()  # a single process


@dataclass(frozen=True)
class Measurement:
    """What `measure` returns; the job writes it into the cell's record."""

    values: dict[str, Any]
    units: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)  # the variant's info (cache keys, training log)
    kernel: str = ""  # empty: the attention kernels recorded while measuring
    seconds: float | None = None  # None: the wall time of `measure`
    warnings: list[str] = field(default_factory=list)  # Record.warnings


class Metric:
    name: ClassVar[str]
    config: ClassVar[type[BaseModel] | None] = None  # None: always measured, not configured in suites
    kind: ClassVar[str] = "variant"  # "variant": cells of each model variant; "backend": of each attention backend
    modules: ClassVar[tuple[str, ...]] = ()  # harness modules that compute it, besides its own
    finetuned_only: ClassVar[bool] = False
    ranks: ClassVar[bool] = False  # measure() spreads its work over ctx.ranks; False: rank 0 measures alone

    def cells(self, config, variant, plan) -> list[tuple[Any, dict]]:
        """[(harness.cells.Cell, what determines it)] for `variant` (kind "backend": for `plan.backend`)."""
        raise NotImplementedError

    def measure(self, ctx, cell: dict, config) -> Measurement:
        raise NotImplementedError

    def check(self, config, suite) -> None:
        """Cross-field checks against the whole suite (raise ValueError); may fill in defaults."""

    def section(self, records: list):
        """The report section of the records (harness.results.Record, all metrics'; pick yours), or None."""
        return None


METRICS: dict[str, Metric] = {}


def register(cls: type[Metric]) -> type[Metric]:
    """Class decorator: make a metric known under `cls.name` (report order = registration order)."""
    from harness.cells import RESERVED

    builtin_module = cls.__module__.startswith("harness.metrics.plugins.")
    if not cls.name.isidentifier() or (cls.name in RESERVED and not builtin_module):
        raise UserError(f"metric name {cls.name!r} ({cls.__module__}): use an identifier that is not one of the "
                        f"names cell ids reserve ({', '.join(RESERVED)})")
    METRICS[cls.name] = cls()
    return cls


def get(name: str) -> Metric:
    builtin()
    if name not in METRICS:
        hint = difflib.get_close_matches(name, METRICS, n=1)
        raise UserError(f"unknown metric {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + f"; known: {', '.join(METRICS)}; a metric of your own is named in the suite's `plugins:`")
    return METRICS[name]


def builtin() -> dict[str, Metric]:
    """Every registered metric in report order: the built-in ones, then plugins' in order of registration."""
    from harness.metrics.plugins import BUILTIN

    for name in BUILTIN:
        importlib.import_module(f"harness.metrics.plugins.{name}")
    rank = {name: i for i, name in enumerate(BUILTIN)}
    return dict(sorted(METRICS.items(), key=lambda item: rank.get(item[0], len(rank))))
