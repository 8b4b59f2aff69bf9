"""Common words extraction, after NVIDIA/RULER ``scripts/data/synthetic/common_words_extraction.py``.

* Vocabulary (l.72-77): ``sorted(set(nouns + adjs + verbs))`` from wonderwords, shuffled once by
  ``random.Random(seed)``.
* :func:`example` = ``get_example`` (l.85-98): ``random.sample(words, num_words)``; the first
  ``num_cw`` are the common words, repeated ``common_repeats`` times, the rest
  ``uncommon_repeats`` times; the list is shuffled by a fresh ``random.Random(seed)`` (the same
  permutation for every call of a given length) and written ``"1. w 2. w ..."``.
* :func:`build` = ``generate_input_output`` (l.100-129): below 4096 tokens of ``max_seq_length``
  RULER uses one few-shot example ``get_example(20, 3, 1)`` and repeats 6/1 for the question;
  from 4096 on, the few-shot example is ``get_example(40, 10, 3)`` and the question uses the
  configured ``freq_cw``/``freq_ucw`` (30/3). ``num_fewshot`` = 1. The few-shot example is the
  full template (with answer prefix) followed by ``" "`` and its numbered answer; examples and
  question are joined by ``"\\n"``.

RULER switches to ``json/english_words.json`` (a Git LFS file, not available here) when a
prompt needs more distinct words than the wonderwords vocabulary (8166 words with
wonderwords 2.x/3.x); the harness raises a UserError in that case instead.
"""

from __future__ import annotations

from random import Random

from harness.data.ruler import templates
from harness.data.ruler.haystack import cwe_words_sorted

SHORT_LENGTH = 4096  # `if args.max_seq_length < 4096` (l.102)


def vocabulary(run_seed: int) -> list[str]:
    words = list(cwe_words_sorted())
    Random(run_seed).shuffle(words)
    return words


def effective_args(args: dict, max_seq_length: int) -> dict:
    """The repeats RULER actually uses at this length (l.102-110)."""
    if max_seq_length < SHORT_LENGTH:
        return {"fewshot": (20, 3, 1), "freq_cw": 6, "freq_ucw": 1, "num_cw": args["num_cw"]}
    return {"fewshot": (40, 10, 3), "freq_cw": args["freq_cw"], "freq_ucw": args["freq_ucw"], "num_cw": args["num_cw"]}


def example(
    rng: Random,
    run_seed: int,
    words: list[str],
    num_words: int,
    common_repeats: int,
    uncommon_repeats: int,
    common_nums: int,
):
    word_list_full = rng.sample(words, num_words)
    common, uncommon = word_list_full[:common_nums], word_list_full[common_nums:]
    word_list = common * int(common_repeats) + uncommon * int(uncommon_repeats)
    Random(run_seed).shuffle(word_list)
    context = " ".join(f"{i + 1}. {word}" for i, word in enumerate(word_list))
    return context, common


def min_size(args: dict) -> int:
    return args["num_cw"]  # RULER's search starts at its increment, 10 = num_cw


def build(eff: dict, num_words: int, rng: Random, run_seed: int, words: list[str], num_fewshot: int = 1):
    template = templates.full_template("common_words_extraction")
    shots = []
    for _ in range(num_fewshot):
        n, c, u = eff["fewshot"]
        ctx, ans = example(rng, run_seed, words, n, c, u, eff["num_cw"])
        shots.append(
            template.format(num_cw=eff["num_cw"], context=ctx, query="")
            + " "
            + " ".join(f"{i + 1}. {word}" for i, word in enumerate(ans))
        )
    context, answer = example(rng, run_seed, words, num_words, eff["freq_cw"], eff["freq_ucw"], eff["num_cw"])
    prompt = "\n".join(shots) + "\n" + template.format(num_cw=eff["num_cw"], context=context, query="")
    meta = {"num_words": num_words, "freq_cw": eff["freq_cw"], "freq_ucw": eff["freq_ucw"], "num_cw": eff["num_cw"]}
    return prompt, answer, meta
