"""The code behind an artefact or a record: which modules determine it, and their fingerprint.

- Cache keys (harness.artefacts) hash the modules that build the artefact: `PRETRAINED` for a pretrained
  model, `ADAPTER` on top for a fine-tune. Code that builds nothing (loading outside checkpoints,
  benchmarking one attention layer) is left out, so editing it rebuilds nothing.
- A record's `code` field holds the package version, the git commit and the fingerprint of the modules
  behind its cell (`modules`: those that build the variant and those that compute the metric), so a fix to,
  say, `metrics/perplexity.py` marks every perplexity cell of an existing results directory stale, and the
  next `harness run` into it measures them again, while its RULER cells stay done.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from harness import cache

_ROOT = Path(__file__).parent
# Modules inside the packages below that determine no artefact: loading checkpoints, timing a layer.
_NOT_BUILDING = ("harness.models.checkpoint", "harness.models.sources", "harness.attention.bench")

# harness.pretraining holds the code that pretrains (seed, init, batches) and runs the loop into the cache, so that
# harness.artefacts, which only says what to build, can change without pretraining again.
PRETRAINED = ("harness.models", "harness.pretraining", "harness.finetune.loop", "harness.data.recall",
              "harness.data.tokens", "harness.data.sources")
ADAPTER = ("harness.finetune", "harness.attention", "harness.artefacts", "harness.pretraining", "harness.data.tokens",
           "harness.data.sources", "harness.data.long_recall")
# The embedded corpus and the tokenizer trained on it: a pretrained model's key holds their content fingerprints,
# which a record cannot, so their code is in the records' fingerprints.
_DATA = ("harness.data.tokenizer", "harness.data.embedded", "harness.data.corpus")
# Build or load a variant and run its cells (harness.job, the metric plugin base); a backend's cells have no model.
_VARIANT = (*PRETRAINED, *_DATA, *ADAPTER, "harness.job", "harness.metrics.base")
_BACKEND = ("harness.attention", "harness.job", "harness.metrics.base")


def modules(metric: str) -> tuple[str, ...]:
    """The modules behind a cell of `metric`: those that build its variant, the metric's plugin module and the
    modules it names (harness.metrics.base.Metric.modules)."""
    if metric == "pretrain":
        return (*PRETRAINED, *_DATA, "harness.job")
    from harness.metrics.base import get

    m = get(metric)
    return (*(_BACKEND if m.kind == "backend" else _VARIANT), type(m).__module__, *m.modules)


def _files(module: str) -> list[Path]:
    """The source files of a module, or of every module of a package; harness's found without importing them."""
    if not module.startswith("harness."):  # a plugin of the user's, imported by load_suite
        return cache.module_files(Path(sys.modules[module].__file__))
    path = _ROOT.joinpath(*module.split(".")[1:])
    return cache.module_files(path / "__init__.py" if path.is_dir() else path.with_suffix(".py"))


def source_fingerprint(modules: tuple[str, ...], exclude: tuple[str, ...] = ()) -> str:
    """Hash of the source of `modules` (packages: all their modules), less `exclude`."""
    skip = {f for name in exclude for f in _files(name)}
    files = dict.fromkeys(f for name in modules for f in _files(name) if f not in skip)  # ordered, no repeats
    return cache.source_version(*files)


def artefact_fingerprint(modules: tuple[str, ...]) -> str:
    """The code part of a cache key: `modules` less those that determine no artefact."""
    return source_fingerprint(modules, exclude=_NOT_BUILDING)


@functools.cache
def fingerprint(metric: str) -> str:
    """Hash of the source of the modules behind a cell of `metric`."""
    names = modules(metric)
    return source_fingerprint(names, exclude=tuple(m for m in _NOT_BUILDING if m not in names))


def code(metric: str) -> dict:
    """A record's `code` field: package version, git commit (None outside a checkout), fingerprint."""
    from harness import __version__
    from harness.results import git_revision

    return {"version": __version__, "git": git_revision(), "fingerprint": fingerprint(metric)}
