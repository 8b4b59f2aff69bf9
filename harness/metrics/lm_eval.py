"""Downstream tasks of lm-eval (EleutherAI's lm-evaluation-harness) on an in-memory model, through its HFLM.

lm-eval is an optional extra (``pip install 'harness[lm-eval]'``), imported only when the metric runs.

Padding: HFLM right-pads loglikelihood batches, which a causal model tolerates (the pads come after every
scored token), but batched generation left-pads, and the hybrid's SSM layers cannot mask left padding
(``HybridModel`` rejects such batches). So ``generate_until`` requests always run one at a time; only
loglikelihood requests use ``batch_size``.
"""

from __future__ import annotations

import difflib
import functools
import glob
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness import cache
from harness.errors import UserError

INSTALL = "pip install 'harness[lm-eval]'"


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401 - the HF backend (lm-eval's [hf] extra)
    except ImportError as e:
        raise UserError(f"the lm_eval metric needs lm-eval with its HF backend ({e}); install it with "
                        f"{INSTALL}") from None
    return lm_eval


def task_manager(tasks: list[str], include_path: str | None):
    """A TaskManager for `tasks`: the local tasks of `include_path` alone when they hold them all (lm-eval's
    own ~15k task files then go unindexed, which saves seconds), else lm-eval's tasks as well."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=include_path)


def local_tasks_fingerprint(include_path: str | None) -> str | None:
    """Hash of the files under `include_path` (task YAMLs, loaders, data) and of the local data files its task
    YAMLs name outside it (`task_data_files`), so editing a local task or its data reruns it."""
    if not include_path:
        return None
    root = Path(include_path)
    files = sorted(f for f in root.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    outside = [f for f in task_data_files(root) if not f.is_relative_to(root.resolve())]
    return cache.fingerprint([(str(f.relative_to(root)), cache.file_sha256(f)) for f in files]
                             + [(str(f), cache.remembered_sha256(f)) for f in outside])


def task_data_files(root: Path) -> list[Path]:
    """The local files that the task YAMLs under `root` read data from: `dataset_path` where it is a local file or
    directory (all of it), and `dataset_kwargs.data_files` / `data_dir` (absolute, or relative to the working
    directory; globs expanded)."""

    class Loader(yaml.SafeLoader):  # task YAMLs use lm-eval's tags (!function): their values are not paths
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)

    def strings(x) -> list[str]:
        if isinstance(x, str):
            return [x]
        if isinstance(x, dict):
            x = list(x.values())
        return [s for v in x for s in strings(v)] if isinstance(x, list) else []

    found: set[Path] = set()
    for f in sorted(root.rglob("*.yaml")) + sorted(root.rglob("*.yml")):
        try:
            doc = yaml.load(f.read_text(), Loader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # lm-eval reports a task file it cannot read
        if not isinstance(doc, dict):
            continue
        kwargs = doc.get("dataset_kwargs") if isinstance(doc.get("dataset_kwargs"), dict) else {}
        for pattern in strings(doc.get("dataset_path")) + strings(kwargs.get("data_files")) + strings(
                kwargs.get("data_dir")):
            for hit in glob.glob(os.path.expanduser(pattern), recursive=True):
                p = Path(hit).resolve()
                found.update([p] if p.is_file() else (q for q in p.rglob("*") if q.is_file()))
    return sorted(found)


@dataclass
class LmEvalResult:
    values: dict  # metrics (acc, acc_stderr, ...), sample counts, subtasks of a group
    settings: dict  # task, version, few-shot, limit, batch size, max length, lm-eval version
    dataset: dict  # the task's dataset and split
    samples: list[dict]  # one per document: doc id, target, filtered response, per-sample metrics


@functools.cache
def _hybrid_lm() -> type:
    from lm_eval.models.huggingface import HFLM

    class HybridLM(HFLM):
        """HFLM that never left-pads: generation runs with batch size 1 (see the module doc)."""

        def generate_until(self, requests, disable_tqdm: bool = False):
            size, self.batch_size_per_gpu = self.batch_size_per_gpu, 1
            try:
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
            finally:
                self.batch_size_per_gpu = size

    return HybridLM


def evaluate_lm_eval(model, tokenizer, task: str, manager, *, limit: int | None = None,
                     num_fewshot: int | None = None, batch_size: int = 1,
                     max_length: int = 2048) -> LmEvalResult:
    """One lm-eval task (or group) on `model` (a HybridForCausalLM, or a PeftModel around one).

    `max_length` is the context HFLM allows (it left-truncates longer prompts, and windows rolling
    loglikelihoods by it); our tokenizer sets no limit of its own, so it must be given. A CacheMismatchError
    first if cached decoding is broken for this model (harness.metrics.decode_check).
    """
    from harness.metrics.decode_check import check_cached_decoding

    lm_eval = _lm_eval()
    if task not in manager.all_tasks:
        hint = difflib.get_close_matches(task, manager.all_tasks, n=1)
        raise UserError(f"lm_eval: unknown task {task!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + "; name an lm-eval task or group (`lm-eval ls tasks`), or a task of a local YAML "
                        "file in a directory given as metrics.lm_eval.include_path")
    check_cached_decoding(model, tokenizer)
    lm = _hybrid_lm()(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                      max_length=max_length)
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot)
    values = _values(out["results"].get(task, {}))
    leaves = list(out["n-samples"])
    values["samples"] = sum(out["n-samples"][t]["effective"] for t in leaves)
    values["samples_available"] = sum(out["n-samples"][t]["original"] for t in leaves)
    if leaves != [task]:  # a group: its subtasks' values too
        values["subtasks"] = {t: _values(out["results"][t]) for t in leaves}
    config = out["configs"].get(task, {})
    settings = {"task": task, "output_type": config.get("output_type"), "task_version": out["versions"].get(task),
                "num_fewshot": out["n-shot"].get(task), "limit": limit, "batch_size": batch_size,
                "max_length": max_length, "lm_eval": lm_eval.__version__,
                "higher_is_better": out["higher_is_better"].get(task, {})}
    samples = [{"task": t, "doc_id": s["doc_id"], "target": s["target"], "response": s["filtered_resps"],
                **{m: s[m] for m in s["metrics"]}} for t, rows in out["samples"].items() for s in rows]
    dataset = _dataset(task, config) if config else {"name": f"{task} (lm-eval group of {len(leaves)} tasks)"}
    return LmEvalResult(values, settings, dataset, samples)


def _values(entry: dict) -> dict:
    """lm-eval's `{"acc,none": x, "acc_stderr,none": s, ...}` -> `{"acc": x, "acc_stderr": s}`; a metric under a
    filter other than "none" is named `metric/filter` (its stderr `metric/filter_stderr`); a stderr lm-eval did
    not compute ("N/A") is None."""
    out = {}
    for key, v in entry.items():
        if "," not in key:
            continue  # alias, name, sample_len
        metric, filt = key.split(",", 1)
        base, stderr = metric.removesuffix("_stderr"), metric.endswith("_stderr")
        name = base + ("" if filt == "none" else f"/{filt}") + ("_stderr" if stderr else "")
        out[name] = None if v == "N/A" else v
    return out


def _dataset(task: str, config: dict) -> dict:
    name = config.get("dataset_path") or f"{task} (custom dataset)"
    split = config.get("test_split") or config.get("validation_split")
    return {"name": name if not config.get("dataset_name") else f"{name}/{config['dataset_name']}", "split": split}
