"""What a suite measures, as types: a model `Variant`, and a `Cell` (one measurement of one variant).

A cell's id is derived here and parsed back here, nowhere else:

    {model}/seed{n}/pretrain                                   the pretraining run
    {model}/seed{n}/pretrained/{measurement}                   the pretrained model
    {model}/seed{n}/{method}/{backend label}/{measurement}     a fine-tuned model
    attention/{backend label}/efficiency@{length}              one attention layer

where a measurement is `train`, `ppl@{length}`, `ruler/{task}@{length}` or `lm_eval/{task}` for the built-in
metrics and `{metric}[:{task}][@{length}]` for any other (a plugin's; efficiency is one), preceded by
`eval-finetune/` when a fine-tuned variant is evaluated with its fine-tuning attention instead of full
attention (another measurement, so another cell). Backend labels may hold "/" ("chunk_size=256/512").
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

PRETRAINED, FINETUNED = "pretrained", "finetuned"
_EVAL_FINETUNE = "eval-finetune"
_MEASUREMENT = re.compile(r"/(?:(?P<ev>eval-finetune)/)?(?:(?P<train>train)|ppl@(?P<ppl>\d+)|"
                          r"ruler/(?P<ruler_task>[^/@]+)@(?P<ruler>\d+)|lm_eval/(?P<lm_eval>[^/]+))$")
_GENERIC = re.compile(r"/(?:(?P<ev>eval-finetune)/)?(?P<metric>[A-Za-z_]\w*)(?::(?P<task>[^/@]+))?"
                      r"(?:@(?P<length>\d+))?$")
_BACKEND = re.compile(r"^attention/(?P<backend>.+)(?P<segment>/[^/]+)$")
#: What the built-in metrics' ids start their measurement with; no other metric may be named so.
RESERVED = ("train", "ppl", "perplexity", "ruler", "lm_eval", "pretrain", "pretrained", "eval-finetune")
_PRETRAIN = re.compile(r"^(?P<model>[^/]+)/seed(?P<seed>-?\d+)/pretrain$")
_VARIANT = re.compile(r"^(?P<model>[^/]+)/seed(?P<seed>-?\d+)/(?:(?P<pretrained>pretrained)|"
                      r"(?P<method>[^/]+)/(?P<backend>.+))$")


@dataclass(frozen=True)
class Variant:
    """A model variant: a pretrained preset, or that preset fine-tuned with `method` under `backend`."""

    model: str
    seed: int
    method: str = "none"  # "none": the pretrained model
    backend: str = "full"  # label of the fine-tuning attention backend; "full" for the pretrained model
    finetune_context: int | None = None

    @property
    def stage(self) -> str:
        return PRETRAINED if self.method == "none" else FINETUNED

    @property
    def id(self) -> str:
        tail = PRETRAINED if self.stage == PRETRAINED else f"{self.method}/{self.backend}"
        return f"{self.model}/seed{self.seed}/{tail}"

    def as_dict(self) -> dict:
        return {**asdict(self), "stage": self.stage}


@dataclass(frozen=True)
class Cell:
    """One measurement: `metric` of `variant` (None for efficiency: one attention layer of `backend`) at
    `length` and/or on `task`; `eval_attention` "finetune" when a fine-tuned variant is evaluated with its
    fine-tuning attention."""

    metric: str  # pretrain | train | perplexity | ruler | lm_eval | efficiency
    variant: Variant | None = None
    length: int | None = None
    task: str | None = None
    eval_attention: str = "full"
    backend: str | None = None  # efficiency cells: the backend label

    @property
    def id(self) -> str:
        if self.metric == "pretrain":
            return f"{self.variant.model}/seed{self.variant.seed}/pretrain"
        builtin = {"train": "train", "perplexity": f"ppl@{self.length}", "ruler": f"ruler/{self.task}@{self.length}",
                   "lm_eval": f"lm_eval/{self.task}"}
        measurement = builtin.get(self.metric) or (self.metric + (f":{self.task}" if self.task else "")
                                                   + (f"@{self.length}" if self.length is not None else ""))
        if self.variant is None:
            return f"attention/{self.backend}/{measurement}"
        ev = f"{_EVAL_FINETUNE}/" if self.eval_attention == "finetune" else ""
        return f"{self.variant.id}/{ev}{measurement}"

    def as_dict(self) -> dict:
        return {"id": self.id, "metric": self.metric, "variant": self.variant and self.variant.as_dict(),
                "length": self.length, "task": self.task, "eval_attention": self.eval_attention,
                "backend": self.backend}

    @classmethod
    def parse(cls, cell_id: str, finetune_context: int | None = None) -> Cell:
        """The cell of an id (ValueError if it is not one); ids hold no fine-tuning context, pass it."""
        if (b := _BACKEND.match(cell_id)) and (m := _GENERIC.fullmatch(b["segment"])) and not m["ev"]:
            return cls(m["metric"], None, int(m["length"]) if m["length"] else None, m["task"], backend=b["backend"])
        if m := _PRETRAIN.match(cell_id):
            return cls("pretrain", Variant(m["model"], int(m["seed"])))
        m = _MEASUREMENT.search(cell_id) or _GENERIC.search(cell_id)
        v = _VARIANT.match(cell_id[: m.start()]) if m else None
        if v is None or (m.re is _GENERIC and m["metric"] in RESERVED):
            raise ValueError(f"not a cell id: {cell_id!r}")
        variant = (Variant(v["model"], int(v["seed"])) if v["pretrained"] else
                   Variant(v["model"], int(v["seed"]), v["method"], v["backend"], finetune_context))
        ev = "finetune" if m["ev"] else "full"
        if m.re is _GENERIC:
            return cls(m["metric"], variant, int(m["length"]) if m["length"] else None, m["task"], ev)
        metric = next(k for k in ("train", "ppl", "ruler", "lm_eval") if m[k] is not None)
        length = m["ppl"] or m["ruler"]
        return cls({"ppl": "perplexity"}.get(metric, metric), variant, int(length) if length else None,
                   m["ruler_task"] or m["lm_eval"], ev)
