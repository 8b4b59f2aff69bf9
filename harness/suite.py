"""The declarative suite file (YAML): schema and validation with errors that name file, line and field.

Matrix axes: models x seeds x (pretrained + methods x backends) x metrics x lengths. A backend
is a name, or a one-key mapping `{name: {options}}`; `grid: {option: [values]}` inside the
options expands into one backend per combination (an SE-Attn S x k grid, say).

The `metrics:` block has one optional field per registered metric (harness.metrics.base), each with the
metric's own config model; `plugins:` names modules of metrics of one's own, imported before validation.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import itertools
import math
import os
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from harness.attention.spec import SEED_END
from harness.data.sources import SPLIT, Source
from harness.errors import UserError
from harness.metrics.base import METRICS, builtin, distinct
from harness.metrics.base import Strict as _Strict
from harness.models.sources import Checkpoint, label, model_entry

Seed = Annotated[int, Field(ge=0, lt=SEED_END)]  # one torch generator per seed


def _number_or_mapping(key: type) -> Any:
    """float | dict[key, float] as a tagged union: a wrong value is checked against the form it has, and its error
    names the field ("finetune.lr"), not pydantic's branches ("finetune.lr.float", "finetune.lr.dict[str,float]")."""
    return Annotated[Annotated[float, Tag("<number>")] | Annotated[dict[key, float], Tag("<mapping>")],
                     Discriminator(lambda v: "<mapping>" if isinstance(v, dict) else "<number>")]


def recall_shares(recall: float | dict[int, float]) -> list[float]:
    """The recall shares of a share or of a {first step: share} schedule."""
    return list(recall.values()) if isinstance(recall, dict) else [recall]


class Pretrain(_Strict):
    context: int = Field(512, ge=16)
    steps: int = Field(3200, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(3e-3, gt=0, allow_inf_nan=False)
    warmup_steps: int = Field(30, ge=0)
    # Retrieval (harness.data.recall, harness.models.induction): the share of each batch's rows that are
    # synthetic recall documents (0: book text only), or a schedule {first step: share, ...} from step 0 on;
    # the loss weight of their answers; and the scale of the induction-head init of the attention blocks
    # (null: the model's default init).
    recall: _number_or_mapping(int) = 0.5
    answer_weight: float = Field(5.0, gt=0, allow_inf_nan=False)
    induction_init: float | None = Field(4.0, gt=0, allow_inf_nan=False)
    # torch.compile the training step's forward and loss: about 1.5x the tokens/s on CPU, after about 30 s of
    # compiling (needs a C++ compiler, g++ or $CXX); off by default, as short runs lose more than they gain.
    compile: bool = False
    # Tail averaging: the pretrained model is the mean of the weights after each of the last `average_last`
    # steps (0: the last step's weights).
    average_last: int = Field(0, ge=0)
    # The seed of the pretraining run. None: each of the suite's `seeds` pretrains its own model; a number: every
    # seed fine-tunes from that one pretrained model, so the seeds vary the fine-tune (adapter init, batches) and
    # the RULER samples only.
    seed: Seed | None = None

    @field_validator("recall")
    @classmethod
    def _recall_shares(cls, v):
        if any(not 0 <= s <= 1 for s in recall_shares(v)):
            raise ValueError("recall shares must be between 0 and 1")
        if isinstance(v, dict) and (0 not in v or min(v) < 0):
            raise ValueError("a recall schedule maps first steps (>= 0, one of them 0) to shares, "
                             "e.g. {0: 0.5, 2000: 0.25}")
        return v

    @model_validator(mode="after")
    def _average_within_steps(self):
        if self.average_last > self.steps:
            raise ValueError(f"average_last ({self.average_last}) is more than steps ({self.steps}): it counts the "
                             "last steps whose weights are averaged")
        return self


class Finetune(_Strict):
    context: int = Field(2048, ge=16)
    steps: int = Field(40, ge=1)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(2, ge=1)
    # None: the paper's LR per backend (2e-5 for s2_attn, else 2e-4); a number; or {default: x, <backend>: y}
    lr: _number_or_mapping(str) | None = None
    warmup_steps: int = Field(20, ge=0)
    # LR of what LoRA+ / HyLoRA train fully (embeddings, norms, conv1d) as a multiple of lr (1: LongLoRA's
    # single LR). On small models the LR that suits the adapters can be too high for the embeddings.
    extra_lr_scale: float = Field(1.0, gt=0, allow_inf_nan=False)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0, allow_inf_nan=False)
    gradient_checkpointing: bool = False
    # The share of rows that are recall documents spread over the whole context (harness.data.long_recall: facts
    # in the first quarter, questions in the last), and the loss weight of their answers; 0: book text only.
    recall: float = Field(0.0, ge=0, le=1)
    answer_weight: float = Field(5.0, gt=0, allow_inf_nan=False)


    @field_validator("lr")
    @classmethod
    def _lr(cls, v):
        values = v.values() if isinstance(v, dict) else [] if v is None else [v]
        if any(not 0 < x < math.inf for x in values):  # a NaN passes `x <= 0`, and trains to NaN weights
            raise ValueError("learning rates must be > 0 and finite")
        return v

    @model_validator(mode="after")
    def _recall_fits(self) -> Finetune:
        if self.recall and self.context < 256:
            raise ValueError(f"recall: spread recall documents need a context of at least 256 tokens (context is "
                             f"{self.context}); set recall: 0 or a longer context")
        return self

    def recipe(self, method: str, backend: str) -> dict:
        """The recipe of `method` fine-tuning with `backend` as hashes hold it, with what does not change that
        training left out, so that changing it measures nothing again: `lr` is the backend's own LR (from a
        mapping, or the default); fields the method does not use (methods.unused_settings) keep their defaults;
        the recall fields are there only where recall is on (cells keep the hashes they had before those fields
        existed)."""
        from harness.finetune.methods import unused_settings

        recipe = self.model_dump(exclude=None if self.recall else {"recall", "answer_weight"})
        return {**recipe, "lr": self.lr_for(backend),
                **{name: type(self).model_fields[name].default for name in unused_settings(method)}}

    def lr_for(self, backend: str) -> float:
        from harness.finetune.methods import default_lr

        if isinstance(self.lr, dict):
            return self.lr.get(backend, self.lr.get("default") or default_lr(backend))
        return self.lr or default_lr(backend)


class Data(_Strict):
    """Where the text comes from (harness.data.sources): `train` is what fine-tunes read (pretraining presets
    read the embedded corpus, always), `eval` what perplexity and RULER's haystacks read."""

    pg19: str | None = None  # PG-19 root of `pg19` sources without a path (after --pg19; else $HARNESS_PG19_DIR)
    train: Source = Field(default_factory=Source)  # default: the embedded corpus's train split
    eval: Source | None = None  # default: PG-19's test split where a PG-19 root is set, else the embedded one

    @model_validator(mode="after")
    def _embedded_splits(self) -> Data:
        """The embedded corpus's splits are the package's, the same on every machine: a typo in one is an invalid
        suite, said with its field, not data missing on this machine. (Checked here, not in harness.data.sources,
        whose source is part of every cache key.)"""
        from harness.data.embedded import HELD_OUT

        splits = ("train", *HELD_OUT)
        for role in ("train", "eval"):
            src = getattr(self, role)
            if src is not None and src.source == "embedded" and src.split is not None and src.split not in splits:
                hint = difflib.get_close_matches(src.split, splits, n=1)
                raise ValueError(f"data.{role}.split: the embedded corpus has no split {src.split!r}"
                                 f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; its splits: {', '.join(splits)}")
        return self

    def source(self, role: str, pg19: str | None = None) -> Source:
        """The `role` ("train" or "eval") source with its defaults filled in: the role's split ("train" for hf
        data_files, local files being one split), and for PG-19 the root from `pg19` (the --pg19 flag), the
        source's path, `data.pg19` or $HARNESS_PG19_DIR, in that order."""
        from harness.data.pg19 import ENV

        src = self.train if role == "train" else self.eval
        root = pg19 or (src.path if src is not None else None) or self.pg19 or os.environ.get(ENV)
        if src is None:
            src = Source(source="pg19" if root else "embedded")
        # local files (data_files) are one split, which datasets names "train", whatever the role
        default = "train" if role == "train" or src.data_files else "test"
        fill = {"split": src.split or default} if src.source in SPLIT else {}
        return src.model_copy(update={**fill, **({"path": root} if src.source == "pg19" else {})})

    def pg19_origin(self, role: str, pg19: str | None = None) -> str:
        """Which setting gave `source(role, pg19)` its PG-19 root (in the order `source` takes them)."""
        from harness.data.pg19 import ENV

        src = self.train if role == "train" else self.eval
        return ("--pg19" if pg19 else f"the suite's data.{role}.path" if src is not None and src.path else
                "the suite's data.pg19" if self.pg19 else f"${ENV}")


class Slurm(_Strict):
    """sbatch settings of `executor: slurm` (one Slurm job per harness job; `time_min` also bounds a
    submitit-local job)."""

    partition: str | None = None
    gpus_per_node: int | None = Field(None, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    time_min: int = Field(240, ge=1)
    account: str | None = None
    additional: dict[str, Any] = {}  # any other sbatch option, e.g. {qos: high, constraint: h100}


class Run(_Strict):
    # seconds one cell may take before it is recorded as "timeout"
    timeout: float = Field(3600, gt=0, allow_inf_nan=False)
    # Processes per fine-tune (torchrun; harness.finetune.distributed): the global batch is
    # finetune.batch_size x grad_accum x nproc; a variant is then evaluated on as many ranks (harness.job).
    # strategy: ddp, or fsdp (FSDP2, one unit per decoder block).
    nproc: int = Field(1, ge=1)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # Where jobs run (harness.executors): local child processes, submitit's LocalExecutor, or Slurm jobs.
    executor: Literal["local", "submitit-local", "slurm"] = "local"
    slurm: Slurm = Field(default_factory=Slurm)
    max_parallel: int | None = Field(None, ge=1)  # jobs at once; default: one per device group (slurm: 64)
    # Fine-tune steps between the checkpoints an interrupted fine-tune resumes from (harness.finetune.loop): it
    # changes how much work an interruption loses, not what is trained, so no key or hash holds it.
    checkpoint_every: int = Field(50, ge=1)

    @model_validator(mode="after")
    def _gpus_for_each_process(self) -> Run:
        gpus = self.slurm.gpus_per_node
        if self.executor == "slurm" and gpus and gpus < self.nproc:
            raise ValueError(f"nproc {self.nproc} runs {self.nproc} processes per job, one GPU each, but "
                             f"slurm.gpus_per_node {gpus} gives each job {gpus}: raise gpus_per_node or lower nproc")
        return self


class Backend(BaseModel):
    """One attention backend with fully resolved options and a short label for tables."""

    name: str
    options: dict[str, Any] = {}
    label: str


# A `models:` entry: a name (preset or named checkpoint) or a checkpoint mapping; the discriminator validates it
# against its own form only, so an error in a mapping is not reported beside "Input should be a valid string".
ModelEntry = Annotated[Annotated[str, Tag("<name>")] | Annotated[Checkpoint, Tag("<mapping>")],
                       Discriminator(lambda v: "<name>" if isinstance(v, str) else "<mapping>")]
_BRANCHES = {"<name>", "<mapping>", "<number>"}  # tags of the unions above, which pydantic puts in error locations


class Suite(_Strict):
    name: str
    description: str = ""
    models: list[ModelEntry] = Field(default_factory=lambda: ["tiny-hybrid"], min_length=1)
    methods: list[str] = Field(default_factory=lambda: ["lora"])
    backends: list[Any] = Field(default_factory=lambda: ["full"], validate_default=True)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    pretrain: Pretrain = Field(default_factory=Pretrain)
    finetune: Finetune = Field(default_factory=Finetune)
    metrics: Any = None  # a model with one field per registered metric: see suite_model()
    plugins: list[str] = []  # modules of metrics of one's own (imported by load_suite)
    data: Data = Field(default_factory=Data)
    run: Run = Field(default_factory=Run)
    _sha256: str = PrivateAttr("")  # of the file's text (load_suite): a job checks it read what was planned
    _warnings: list[str] = PrivateAttr(default_factory=list)  # load_suite's, from harness.suite_warnings
    _lines: dict[tuple, int] = PrivateAttr(default_factory=dict)  # the line of each key path in the file

    @property
    def sha256(self) -> str:
        return self._sha256

    def located(self, message: str) -> str:
        """`message` with the line of the field it starts with ("metrics.ruler.lengths: ...", as the checks after
        loading word theirs), where the file holds that field: "line 7: metrics.ruler.lengths: ..."."""
        named = re.match(r"([A-Za-z_][\w.-]*(?:\[\d+\])*)[ :]", message)  # a dotted path, then " " or ":"
        path = named[1] if named and "." in named[1] else ""
        loc = tuple(re.findall(r"[^.\[\]]+", path))
        if path.startswith("models."):  # "models.NAME" (which may hold dots): the entry of that name
            names, name = [m if isinstance(m, str) else m.name for m in self.models], path.removeprefix("models.")
            loc = ("models", str(names.index(name))) if name in names else ("models",)
        line = _line(loc, self._lines)
        return f"line {line}: {message}" if line else message

    @property
    def warnings(self) -> list[str]:
        """What the file sets that runs but is most likely a mistake, each naming file, line and field."""
        return self._warnings

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"{v!r}: a suite name names its results directory (reports/<name>): use letters, "
                             "digits, '.', '_' and '-', starting with a letter or digit")
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str | Checkpoint]) -> list[str | Checkpoint]:
        v = [model_entry(m) if isinstance(m, str) else m for m in v]
        distinct([label(m) for m in v])
        return v

    def model(self, name: str) -> str | Checkpoint:
        """The `models:` entry labelled `name`: a preset's name, or a Checkpoint."""
        return next(m for m in self.models if label(m) == name)

    @field_validator("seeds", "plugins")
    @classmethod
    def _distinct(cls, v: list) -> list:
        return distinct(v)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        from harness.finetune.methods import METHODS

        for m in v:
            if m not in METHODS:
                hint = difflib.get_close_matches(m, METHODS, n=1)
                raise ValueError(f"unknown method {m!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                                 f"available: {', '.join(METHODS)}")
        return distinct(v)

    @field_validator("backends")
    @classmethod
    def _backends(cls, v: list[Any]) -> list[Backend]:
        backends = [b for i, entry in enumerate(v) for b in expand_backend(entry, f"backends[{i}]")]
        distinct([b.label for b in backends])
        return backends

    @model_validator(mode="after")
    def _consistent(self) -> Suite:
        configured = {name: c for name, c in dict(self.metrics or {}).items() if c is not None}
        if not configured:
            raise ValueError(f"metrics: nothing to measure; add one of {', '.join(_configurable())}")
        for name, config in configured.items():
            METRICS[name].check(config, self)
        from harness.attention.backends import SPECS
        from harness.attention.options import ALIASES, spec

        for key in self.finetune.lr if isinstance(self.finetune.lr, dict) else ():
            if key in ALIASES:
                raise ValueError(f"finetune.lr.{key}: an alias takes the LR of the backend it fixes; write "
                                 f"{ALIASES[key][0]!r}")
            if key != "default" and key not in SPECS:
                hint = difflib.get_close_matches(key, [*SPECS, "default"], n=1)
                raise ValueError(f"finetune.lr.{key}: not a backend (keys: default, {', '.join(SPECS)})"
                                 + (f"; did you mean {hint[0]!r}?" if hint else ""))
        fine_tunes = bool(self.methods) and any(METRICS[name].kind != "backend" for name in configured)
        for b in self.backends if fine_tunes else ():  # attention timed alone runs at any length
            need = spec(b.name).min_context(b.options)
            if need > self.finetune.context:
                raise ValueError(f"backends: {b.label} needs finetune.context >= {need} (it is "
                                 f"{self.finetune.context}); shrink its options or lengthen the context")
        return self


def _configurable() -> list[str]:
    return [name for name, m in builtin().items() if m.config is not None]


@functools.cache
def _suite_model(metric_names: tuple[str, ...]) -> type[Suite]:
    fields = {name: (METRICS[name].config | None, None) for name in metric_names}
    metrics = create_model("Metrics", __base__=_Strict, **fields)
    default = {"perplexity": {}} if "perplexity" in fields else {}
    return create_model("Suite", __base__=Suite, metrics=(metrics, Field(default_factory=lambda: metrics(**default))))


def suite_model() -> type[Suite]:
    """The Suite model for the metrics registered now (the built-in ones, and those of imported plugins)."""
    return _suite_model(tuple(_configurable()))


def expand_backend(entry: Any, where: str) -> list[Backend]:
    """A suite's backend entry -> resolved backends (several if it has a `grid`)."""
    from harness.attention.options import resolve

    if isinstance(entry, str):
        name, given = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1 and isinstance(next(iter(entry)), str):
        name, given = next(iter(entry.items()))
        if not isinstance(given, dict | None):
            raise ValueError(f"{where}: the options of {name} are a mapping {{option: value}}, got {given!r}")
        given = dict(given or {})
    else:
        raise ValueError(f"{where}: a backend is a name or a one-key mapping {{name: {{options}}}}")
    grid = given.pop("grid", {})
    if not isinstance(grid, dict) or not all(isinstance(vals, list) and vals for vals in grid.values()):
        raise ValueError(f"{where}.grid: a mapping of option -> non-empty list of values")
    if both := [k for k in grid if k in given]:  # else the grid's values would silently replace the option's
        raise ValueError(f"{where}: {', '.join(both)} given both as an option and in grid; keep one")
    out = []
    for combo in itertools.product(*grid.values()):
        options = {**given, **dict(zip(grid, combo, strict=True))}
        try:
            canonical, resolved = resolve(name, options)
        except UserError as e:
            raise ValueError(f"{where}: {e}") from None
        shown = ",".join(f"{k}={_short(v)}" for k, v in options.items())
        out.append(Backend(name=canonical, options=resolved, label=f"{name}({shown})" if shown else name))
    return out


def _short(v: Any) -> str:
    return "/".join(map(str, v)) if isinstance(v, list | tuple) else str(v)


class _Duplicate(yaml.YAMLError):
    pass


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (which would silently drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base class says what is wrong with it
            if key in seen:
                raise _Duplicate(f"line {key_node.start_mark.line + 1}: {key!r} is given twice in one mapping, and "
                                 "YAML would silently keep only the last; keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_suite(path: str | Path, run: dict | None = None, planned: str | None = None) -> Suite:
    """Parse and validate a suite file; every problem becomes a UserError naming file, line and field. `run`:
    settings that override the file's `run` block (the command line's; `slurm` merged key by key). `planned`:
    the sha256 of the text a run planned from (a job's), which the file must still have."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a directory, not a suite file; name one of its YAML files (shipped suites: "
                        "suites/*.yaml)")
    if not path.is_file():
        raise UserError(f"{path}: suite file not found (suites live in suites/*.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as e:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({e}); save it as UTF-8") from None
    sha256 = hashlib.sha256(text.encode()).hexdigest()
    if planned and sha256 != planned:
        raise UserError(f"{path} changed since `harness run` planned this job, which would measure the new settings "
                        "under the old ones' hashes; run the suite again (finished cells are kept)")
    try:
        raw = yaml.load(text, Loader=_UniqueKeys)
    except _Duplicate as e:
        raise UserError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: malformed YAML: {e}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a suite must be a YAML mapping with at least `name:`")
    _import_plugins(path, raw.get("plugins"), _key_lines(text))
    model = suite_model()
    try:
        suite = model.model_validate(raw)
    except ValidationError as e:
        lines = _key_lines(text)
        raise UserError(f"{path}: " + "; ".join(_describe(err, lines, model) for err in e.errors())) from None
    suite._sha256, suite._lines = sha256, _key_lines(text)
    suite._warnings = _worded(path, suite, suite._lines)
    if not run:
        return suite
    merged = {**suite.run.model_dump(), **run, "slurm": {**suite.run.slurm.model_dump(), **run.get("slurm", {})}}
    try:
        return suite.model_copy(update={"run": Run.model_validate(merged)})
    except ValidationError as e:
        raise UserError("run settings from the command line: " + "; ".join(
            ": ".join(filter(None, (".".join(str(p) for p in err["loc"]), err["msg"].removeprefix("Value error, "))))
            for err in e.errors())) from None


def _worded(path: Path, suite: Suite, lines: dict[tuple, int]) -> list[str]:
    from harness.suite_warnings import warnings

    return [f"{path}: {_where(loc, lines)}: {message}" for loc, message in warnings(suite)]


def _where(loc: tuple[str, ...], lines: dict[tuple, int]) -> str:
    """The field path `loc` as "line N: a.b.c", N the line of its innermost key that the file holds (a field left
    to its default has none: its parent's), or "a.b.c" where the file holds none."""
    where = ".".join(loc) or "(top level)"
    line = _line(loc, lines)
    return f"line {line}: {where}" if line else where


def _line(loc: tuple[str, ...], lines: dict[tuple, int]) -> int | None:
    """The line of the innermost key of the field path `loc` that the file holds, if any."""
    return next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)


def _import_plugins(path: Path, plugins: Any, lines: dict[tuple, int]) -> None:
    if plugins is None:
        return
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise UserError(f"{path}: {_where(('plugins',), lines)}: a list of module names (importable from the working "
                        "directory)")
    for i, name in enumerate(plugins):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure to import is the user's to fix, named here
            where = f"line {lines[('plugins', str(i))]}: " if ("plugins", str(i)) in lines else ""
            raise UserError(f"{path}: {where}plugins[{i}]: cannot import {name!r} ({type(e).__name__}: {e}); "
                            f"the module must be importable from the working directory, here {Path.cwd()}") from None


# A check across fields (Suite._consistent) fails at the top level, and a list's validator at the list; such a
# message starts with the field it is about ("finetune.lr.x: ...", "backends[1]: ...").
_LEADING_FIELD = re.compile(r"^([A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*): ")


def _describe(err: dict, lines: dict[tuple, int], model: type[BaseModel]) -> str:
    loc = tuple(str(p) for p in err["loc"] if p not in _BRANCHES)
    msg = err["msg"].removeprefix("Value error, ")
    if loc[-1:] == ("[key]",):  # a mapping's key, which pydantic writes as a part of the field's path
        loc, msg = loc[:-1], f"the key: {msg}"
    if (named := _LEADING_FIELD.match(msg)) and (field := tuple(re.findall(r"[^.\[\]]+", named[1])))[:len(loc)] == loc:
        loc, msg = field, msg[named.end():]  # that field's line, not "(top level)" or the list's
    where = _where(loc, lines)
    if err["type"] == "extra_forbidden":
        field, parent = loc[-1], _model_at(model, loc[:-1])
        hint = difflib.get_close_matches(field, list(parent.model_fields), n=1) if parent else []
        fix = f"did you mean {hint[0]!r}?" if hint else f"allowed: {', '.join(parent.model_fields)}" if parent else ""
        return f"{where}: unknown field ({fix})"
    got = f" (got {err['input']!r})" if err["type"] != "value_error" and "input" in err else ""
    return f"{where}: {msg}{got}"


def _key_lines(text: str) -> dict[tuple, int]:
    """Line number (1-based) of every mapping key path in the YAML text, for error messages."""
    out: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = (*path, _key_name(k))
                out[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                out[(*path, str(i))] = item.start_mark.line + 1
                walk(item, (*path, str(i)))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return out


def _key_name(key: yaml.Node) -> str:
    """A mapping key as pydantic's error locations write it: the loaded value's text (`null` is None, `yes` 1)."""
    if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:str":
        return str(key.value)
    value = yaml.safe_load(key.value)
    return str(int(value) if isinstance(value, bool) else value)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        if str(part).isdigit():  # an item of a list field: the model is the item's
            continue
        field = model.model_fields.get(str(part))
        if (model := _model_in(getattr(field, "annotation", None))) is None:
            return None
    return model


def _model_in(ann) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (itself, or inside list[...], X | None, Annotated[...])."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return next((m for a in get_args(ann) if (m := _model_in(a)) is not None), None)
