"""What a valid suite sets that is most likely a mistake: settings that run, but do not measure what they say.

`warnings(suite)` -> [(field path, message)]; `load_suite` words them with the file and line, and `harness run`,
`validate` and `--dry-run` print them before planning (harness.runner.prepare), and the report `harness run`
renders repeats them (harness.runner.report_notes). None stops a run.
"""

from __future__ import annotations

from harness.attention.spec import triangle
from harness.plan import evaluates
from harness.suite import Suite


def warnings(suite: Suite) -> list[tuple[tuple[str, ...], str]]:
    if not evaluates(suite):  # attention layers timed alone: no training, and backends at any length are meant
        return []
    out = _nothing_fine_tuned(suite)
    if any(isinstance(m, str) for m in suite.models):  # a preset, which the harness pretrains
        out += _warmup(suite.pretrain, "pretrain")
    if suite.methods and suite.backends:
        out += _warmup(suite.finetune, "finetune") + _backends(suite) + _unused_lr(suite)
    return out


def _nothing_fine_tuned(suite: Suite) -> list:
    given = suite.model_fields_set
    if not suite.methods and suite.backends and "backends" in given:
        return [(("methods",), f"no method, so nothing is fine-tuned and backends ({_labels(suite)}) are not used: "
                               "only the pretrained model is measured; add a method (e.g. lora) or drop `backends`")]
    if not suite.backends and suite.methods and "methods" in given:
        return [(("backends",), f"no backend, so nothing is fine-tuned and methods ({', '.join(suite.methods)}) are "
                                "not run: only the pretrained model is measured; add a backend (e.g. full) or drop "
                                "`methods`")]
    return []


def _warmup(recipe, where: str) -> list:
    if recipe.warmup_steps <= recipe.steps:
        return []
    return [((where, "warmup_steps"), f"{recipe.warmup_steps} is more than {where}.steps ({recipe.steps}): the "
                                      f"learning rate never reaches {where}.lr (it ends at "
                                      f"{recipe.steps / recipe.warmup_steps:.0%} of it); lower warmup_steps")]


def _backends(suite: Suite) -> list:
    """Backends that, at the fine-tuning context, compute full attention or let each token see only itself,
    told from the query-key pairs their masks hold (two heads: S2-Attn shifts the second half of them)."""
    from harness.attention.options import spec

    context, out = suite.finetune.context, []
    for b in suite.backends:
        if b.name == "full":
            continue
        pairs = spec(b.name).pairs(b.options, context, 2)
        if pairs >= 2 * triangle(context):
            out.append((("backends",), f"{b.label} lets every token see all earlier ones at finetune.context "
                                       f"{context}, so it fine-tunes full attention under another name; lower its "
                                       "window or top_k, or lengthen finetune.context"))
        elif pairs <= 2 * context:
            out.append((("backends",), f"{b.label} lets each token see only itself at finetune.context {context}; "
                                       "raise its window, group_ratio or chunk_size"))
    return out


def _unused_lr(suite: Suite) -> list:
    """Keys of a finetune.lr mapping that name a backend the suite does not fine-tune with (a typo of intent, or
    a suite edited since: the LR meant for it is not used)."""
    lr, used = suite.finetune.lr, {b.name for b in suite.backends}
    return [(("finetune", "lr", key), f"no {key} backend in `backends` ({_labels(suite)}), so this learning rate is "
                                      "not used; remove it, or add the backend")
            for key in (lr if isinstance(lr, dict) else ()) if key != "default" and key not in used]


def _labels(suite: Suite) -> str:
    return ", ".join(b.label for b in suite.backends)
