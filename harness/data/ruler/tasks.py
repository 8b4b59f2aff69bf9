"""RULER task registry and :func:`generate`.

Task configurations are NVIDIA/RULER ``scripts/synthetic.yaml`` verbatim; generation budgets,
templates and answer prefixes come from ``scripts/data/synthetic/constants.py`` (see
:mod:`harness.data.ruler.templates`). Groups follow the paper's Appendix I.4.

Determinism: sample ``i`` of ``generate(task, length, tokenizer, n, seed)`` draws from its own
``random.Random(f"ruler:{task}:{seed}:{i}")`` (string seeds are hashed with SHA-512 by
:mod:`random`, independent of ``PYTHONHASHSEED``); RULER's fixed-seed shuffles use
``random.Random(seed)``. Nothing depends on global RNG state, dict/set iteration order or
hash randomisation, so the same arguments give the same samples on every machine (for a given
tokenizer and wonderwords word lists). Sample ``i`` does not depend on ``n``.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

from harness.data.ruler import cwe, fwe, niah, qa, templates, vt
from harness.data.ruler.haystack import (
    ESSAY_DEVIATION,
    count_tokens,
    essay_words,
    fit_size,
    load_essay_file,
)
from harness.errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: str  # RULER task script / constants.py key
    args: dict
    opt_in: bool = False  # needs user-supplied data (qa)

    @property
    def max_new_tokens(self) -> int:
        return templates.tokens_to_generate(self.family)

    @property
    def metric(self) -> str:
        # scripts/eval/synthetic/constants.py: qa -> string_match_part, all others string_match_all
        return "string_match_part" if self.family == "qa" else "string_match_all"


def _niah(th: str, tk: str, tv: str, k: int = 1, v: int = 1, q: int = 1) -> dict:
    return {
        "type_haystack": th,
        "type_needle_k": tk,
        "type_needle_v": tv,
        "num_needle_k": k,
        "num_needle_v": v,
        "num_needle_q": q,
    }


# scripts/synthetic.yaml
_SPECS = [
    TaskSpec("niah_single_1", "niah", _niah("noise", "words", "numbers")),
    TaskSpec("niah_single_2", "niah", _niah("essay", "words", "numbers")),
    TaskSpec("niah_single_3", "niah", _niah("essay", "words", "uuids")),
    TaskSpec("niah_multikey_1", "niah", _niah("essay", "words", "numbers", k=4)),
    TaskSpec("niah_multikey_2", "niah", _niah("needle", "words", "numbers")),
    TaskSpec("niah_multikey_3", "niah", _niah("needle", "uuids", "uuids")),
    TaskSpec("niah_multivalue", "niah", _niah("essay", "words", "numbers", v=4)),
    TaskSpec("niah_multiquery", "niah", _niah("essay", "words", "numbers", q=4)),
    TaskSpec("vt", "variable_tracking", {"type_haystack": "noise", "num_chains": 1, "num_hops": 4}),
    TaskSpec("cwe", "common_words_extraction", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    TaskSpec("fwe", "freq_words_extraction", {"alpha": 2.0}),
    TaskSpec("qa_1", "qa", {"dataset": "squad"}, opt_in=True),
    TaskSpec("qa_2", "qa", {"dataset": "hotpotqa"}, opt_in=True),
]

#: Every task by name: the 11 the paper uses plus the opt-in qa_1/qa_2 (``spec.opt_in``).
TASKS: dict[str, TaskSpec] = {s.name: s for s in _SPECS}
#: The eleven tasks the paper reports (QA excluded), in RULER's order.
PAPER_TASKS: tuple[str, ...] = tuple(s.name for s in _SPECS if not s.opt_in)

#: Paper Appendix I.4: five groups; "average" is the mean of the eleven tasks.
GROUPS: dict[str, tuple[str, ...]] = {
    "NIAH-S": ("niah_single_1", "niah_single_2", "niah_single_3"),
    "NIAH-M": ("niah_multikey_1", "niah_multikey_2", "niah_multikey_3"),
    "NIAH-M-QV": ("niah_multivalue", "niah_multiquery"),
    "VT": ("vt",),
    "CF-WE": ("cwe", "fwe"),
    "average": PAPER_TASKS,
}


@dataclass
class Sample:
    input: str  # the prompt, ending with RULER's answer prefix
    outputs: list[str]  # reference answers (string_match_all: all of them should appear)
    length: int  # tokens of ``input`` (RULER's "length" minus max_new_tokens)
    max_new_tokens: int  # RULER's tokens_to_generate for the task
    metadata: dict = field(default_factory=dict)


def get_spec(task: str) -> TaskSpec:
    if task not in TASKS:
        close = difflib.get_close_matches(str(task), list(TASKS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown RULER task {task!r}{hint} (tasks: {', '.join(TASKS)})")
    return TASKS[task]


def _shortest(builders, n: int, ntok) -> int:
    """The tokens of the longest of the smallest prompts of samples 0..n-1 (at least one): with the generation
    budget, the least length at which all of them fit."""
    return max(ntok(build(lo)[0]) for build, lo, _ in map(builders, range(max(n, 1))))


def _too_short(task: str, length: int, minimum: int) -> UserError:
    return UserError(
        f"RULER task {task!r} cannot fit in length {length}: it needs at least {minimum} tokens "
        "(prompt template, needles/examples and the generation budget) with this tokenizer; "
        f"use length >= {minimum}"
    )


def generate(
    task: str,
    length: int,
    tokenizer,
    n: int,
    seed: int = 42,
    haystack_text: str | None = None,
    *,
    essay_file: str | Path | None = None,
    qa_file: str | Path | None = None,
) -> list[Sample]:
    """``n`` RULER samples of ``task`` whose prompt + generation budget fit in ``length`` tokens.

    ``tokenizer``: anything with ``encode(text)`` (a Hugging Face tokenizer is called with
    ``add_special_tokens=False``). ``haystack_text``: book text for the "essay" haystack
    (niah_single_2/3, niah_multikey_1, niah_multivalue, niah_multiquery) used in place of
    RULER's Paul Graham essays (recorded as ``metadata["haystack_deviation"]``);
    ``essay_file``: RULER's ``PaulGrahamEssays.json`` (or a text file), which takes precedence
    and is no deviation. ``qa_file``: the SQuAD / HotpotQA file for the opt-in qa_1 / qa_2.

    Each haystack is the largest one (in RULER's units: words of the essay, noise lines,
    distractor needles, list words, coded words, documents) whose prompt, tokenized, has at most
    ``length - max_new_tokens`` tokens. Raises UserError if even the smallest haystack does not fit.
    """
    spec = get_spec(task)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserError(f"number of RULER samples must be a non-negative integer, got {n!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise UserError(f"RULER length must be a positive integer, got {length!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"RULER seed must be an integer, got {seed!r}")
    budget_new = spec.max_new_tokens
    budget = length - budget_new

    def ntok(text: str) -> int:
        return count_tokens(tokenizer, text)

    base_meta: dict = {
        "task": task,
        "seed": seed,
        "length_limit": length,
        "family": spec.family,
        "ruler_args": dict(spec.args),
    }
    builders = _builders(spec, length, seed, ntok, haystack_text, essay_file, qa_file, n, base_meta)
    if budget <= 0:  # not even the generation fits
        raise _too_short(task, length, _shortest(builders, n, ntok) + budget_new)
    samples: list[Sample] = []
    for i in range(n):
        build, lo, hi = builders(i)
        found = fit_size(lambda size, build=build: build(size)[0], ntok, budget, lo, hi)
        if found is None:
            raise _too_short(task, length, _shortest(builders, n, ntok) + budget_new)
        size, ntokens = found
        if hi is not None and size == hi and spec.family == "common_words_extraction":
            raise UserError(
                f"RULER task 'cwe' at length {length} needs more than {hi} distinct words; RULER then samples "
                "from its json/english_words.json, which is not available offline; use a shorter length"
            )
        prompt, outputs, meta = build(size)
        metadata = dict(base_meta)
        metadata.update(meta)
        metadata.update(
            {
                "index": i,
                "haystack_size": size,
                "prompt_sha256": hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
            }
        )
        samples.append(
            Sample(input=prompt, outputs=list(outputs), length=ntokens, max_new_tokens=budget_new, metadata=metadata)
        )
    return samples


def _sample_seed(task: str, seed: int, index: int) -> str:
    return f"ruler:{task}:{seed}:{index}"


def _builders(spec: TaskSpec, length, seed, ntok, haystack_text, essay_file, qa_file, n, base_meta):
    """Returns ``f(i) -> (build(size) -> (prompt, outputs, meta), min_size, max_size)``."""
    task = spec.name
    if spec.family == "niah":
        args = spec.args
        essay = None
        if args["type_haystack"] == "essay":
            if essay_file is not None:
                essay = essay_words(load_essay_file(essay_file))
                base_meta["haystack"] = f"essay file {Path(essay_file).name}"
            elif haystack_text is not None:
                essay = essay_words(haystack_text)
                base_meta["haystack"] = "book text"
                base_meta["haystack_deviation"] = ESSAY_DEVIATION
            else:
                raise UserError(
                    f"RULER task {task!r} uses the 'essay' haystack: pass haystack_text (book text; RULER uses "
                    "Paul Graham essays) or essay_file (RULER's PaulGrahamEssays.json)"
                )
            if not any(essay):
                raise UserError(f"RULER task {task!r}: the essay haystack text is empty")
        else:
            base_meta["haystack"] = args["type_haystack"]

        def for_sample(i):
            ss = _sample_seed(task, seed, i)
            return (lambda size: niah.build(args, size, ss, seed, essay)), niah.min_size(args), None

        return for_sample

    if spec.family == "variable_tracking":
        args = spec.args
        base_meta["haystack"] = "noise"
        # The in-context example: one per run, sized to <= 500 tokens with no generation budget
        # (variable_tracking.py l.269-273: max_seq_length=500; tokens_to_generate=0 when
        # icl_example is None). RULER falls back to its increment (5 noises) if nothing fits.
        icl_seed = f"ruler:{task}:{seed}:icl"
        icl_build = lambda size: vt.build(args, size, Random(icl_seed), is_icl=True)  # noqa: E731
        found = fit_size(lambda s: icl_build(s)[0], ntok, 500, vt.min_size(args))
        icl_size = found[0] if found else vt.min_size(args)
        icl_prompt, icl_out, _ = icl_build(icl_size)
        icl = vt.icl_text(icl_prompt, icl_out)
        base_meta["icl_haystack_size"] = icl_size

        def for_sample(i):
            ss = _sample_seed(task, seed, i)

            def build(size):
                rng = Random(ss)
                prompt, outputs, meta = vt.build(args, size, rng)
                ex = vt.randomize_icl(icl, args["num_hops"], rng)
                return ex + "\n" + prompt, outputs, meta

            return build, vt.min_size(args), None

        return for_sample

    if spec.family == "common_words_extraction":
        words = cwe.vocabulary(seed)
        eff = cwe.effective_args(spec.args, length)
        base_meta["haystack"] = "wonderwords"

        def for_sample(i):
            ss = _sample_seed(task, seed, i)
            return (lambda size: cwe.build(eff, size, Random(ss), seed, words)), cwe.min_size(spec.args), len(words)

        return for_sample

    if spec.family == "freq_words_extraction":
        size_vocab = fwe.vocab_size(length)
        base_meta["haystack"] = "coded words"

        def for_sample(i):
            ss = _sample_seed(task, seed, i)
            return (
                (lambda size: fwe.build(spec.args, size, Random(ss), seed, max(size_vocab, 4))),
                fwe.min_size(spec.args),
                None,
            )

        if size_vocab < 4:  # RULER's (length - 50) // 50 words must be 4 or more (the answer is vocab[1:4])
            least = 4 * 50 + spec.max_new_tokens
            raise _too_short(task, length, max(least, _shortest(for_sample, n, ntok) + spec.max_new_tokens))
        return for_sample

    if spec.family == "qa":
        dataset = spec.args["dataset"]
        qas, docs = qa.load_file(dataset, task, qa_file)
        if not qas:
            raise UserError(f"RULER task {task!r}: {qa_file} has no answerable questions; expected "
                            f"{qa.FORMATS[dataset]}")
        if n > len(qas):
            raise UserError(
                f"RULER task {task!r}: asked for {n} samples but {qa_file} has {len(qas)} answerable questions"
            )
        base_meta["haystack"] = f"{dataset} documents"

        def for_sample(i):
            ss = _sample_seed(task, seed, i)
            return (lambda size: qa.build(qas[i], docs, size, Random(ss), seed)), qa.min_size(qas[i]), None

        return for_sample

    raise AssertionError(spec.family)  # pragma: no cover
