"""RULER scoring, after NVIDIA/RULER ``scripts/eval/synthetic/constants.py`` and ``scripts/eval/evaluate.py``.

* :func:`postprocess` = ``postprocess_pred`` (evaluate.py): strip, replace every character in
  ``[\\x00-\\x1f]`` by ``"\\n"``, strip again.
* ``string_match_all`` (niah, variable_tracking, common/freq words extraction): per sample the
  fraction of references that occur in the prediction (case-insensitive substring); the task
  score is the mean over samples x 100, rounded to 2 decimals.
* ``string_match_part`` (qa): per sample 1 if any reference occurs in the prediction.
* :func:`group_scores`: the paper's Appendix I.4 groups (NIAH-S, NIAH-M, NIAH-M-QV, VT, CF-WE)
  and the average of the eleven tasks; each is the unweighted mean of its tasks' scores.

This module imports no torch (``harness.metrics`` resolves names lazily).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from harness.errors import UserError

_NON_PRINTABLE = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """``postprocess_pred`` of RULER's evaluate.py."""
    prediction = prediction.strip()
    return _NON_PRINTABLE.sub("\n", prediction).strip()


def _spec(task: str):
    from harness.data.ruler.tasks import get_spec

    return get_spec(task)


def _refs(ref) -> list[str]:
    if isinstance(ref, str):
        return [ref]
    refs = list(ref)
    if not refs:
        raise UserError("a RULER reference list is empty; every sample needs at least one reference answer")
    return [str(r) for r in refs]


def match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` found in ``prediction`` (case-insensitive), as in string_match_all."""
    pred = prediction.lower()
    refs = _refs(references)
    return sum(1.0 if r.lower() in pred else 0.0 for r in refs) / len(refs)


def match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any reference is found in ``prediction`` (case-insensitive), as in string_match_part."""
    pred = prediction.lower()
    return max(1.0 if r.lower() in pred else 0.0 for r in _refs(references))


def per_sample(task: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per-sample correctness in [0, 1] with the task's RULER metric, after RULER's postprocessing."""
    spec = _spec(task)
    if isinstance(predictions, str) or isinstance(references, str):
        raise UserError("predictions and references must be lists (one entry per sample)")
    if len(predictions) != len(references):
        raise UserError(f"RULER {task}: {len(predictions)} predictions but {len(references)} references")
    fn = match_part if spec.metric == "string_match_part" else match_all
    return [fn(postprocess(p), r) for p, r in zip(predictions, references, strict=True)]


def score(task: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's task score: mean per-sample correctness x 100, rounded to 2 decimals."""
    values = per_sample(task, predictions, references)
    if not values:
        raise UserError(f"RULER {task}: no predictions to score")
    return round(sum(values) / len(values) * 100, 2)


def group_scores(task_scores: Mapping[str, float]) -> dict[str, float]:
    """The groups of the paper's Appendix I.4 whose tasks are all in ``task_scores``.

    Keys, in order: ``NIAH-S``, ``NIAH-M``, ``NIAH-M-QV``, ``VT``, ``CF-WE``, ``average`` (the
    mean of the eleven tasks). A group with a missing task is left out; unknown task names are
    a UserError.
    """
    from harness.data.ruler.tasks import GROUPS

    for t in task_scores:
        _spec(t)
    out: dict[str, float] = {}
    for name, members in GROUPS.items():
        if all(m in task_scores for m in members):
            out[name] = sum(float(task_scores[m]) for m in members) / len(members)
    return out
