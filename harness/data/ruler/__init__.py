"""Offline RULER (NVIDIA/RULER) synthetic tasks: prompts, references, generation budgets.

``generate(task, length, tokenizer, n, seed, haystack_text=None)`` returns :class:`Sample`
objects; score predictions with :mod:`harness.metrics.ruler`. Modules: ``templates`` (RULER's
constants), ``haystack`` (word lists, sentence splitter, sizing), ``niah``, ``vt``, ``cwe``,
``fwe``, ``qa`` (one per RULER task script), ``tasks`` (registry and ``generate``).
"""

from harness.data.ruler.tasks import (
    GROUPS,
    PAPER_TASKS,
    TASKS,
    Sample,
    TaskSpec,
    generate,
    get_spec,
)

__all__ = ["GROUPS", "PAPER_TASKS", "TASKS", "Sample", "TaskSpec", "generate", "get_spec"]
