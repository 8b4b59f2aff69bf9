"""Needle-in-a-haystack prompts, after NVIDIA/RULER ``scripts/data/synthetic/niah.py``.

:func:`build` is ``generate_input_output(num_haystack)`` (niah.py l.130-206) with RULER's global
``random`` replaced by the sample's own ``random.Random``; the draws happen in RULER's order:

1. ``num_needle_k`` keys, each with ``num_needle_v`` values, one needle sentence per value
   (l.131-142); ``num_needle_k = max(num_needle_k, num_needle_q)`` (l.77).
2. ``random.Random(seed).shuffle(needles)`` -- RULER shuffles with a *fresh* RNG seeded with the
   run seed, i.e. the same permutation for every sample (l.144).
3. Haystack:
   * essay: the first ``num_haystack`` words (repeated if needed), split into sentences; the
     needles go before sentence ``int(len(sents) * depth / 100)`` for depths
     ``random.sample(DEPTHS, len(needles))``, sorted, needles in shuffled order (l.147-166);
     everything is joined with single spaces.
   * noise / needle: ``num_haystack`` copies of the noise line, or ``num_haystack`` distractor
     needles with fresh random keys and values (l.169-176); needles inserted at
     ``sorted(random.sample(range(num_haystack), len(needles)), reverse=True)`` (l.179-181);
     lines joined with ``"\\n"``.
4. Query: ``random.sample(range(num_needle_k), num_needle_q)`` keys; answers are all values of
   the queried keys; several keys are listed as ``"a, b, and c"`` (l.186-189).
5. Singular wording when ``num_needle_q * num_needle_v == 1``: the template's ``Some`` -> ``A``,
   ``are all`` -> ``is``, ``are`` -> ``is``, ``answers`` -> ``answer``, and ``numbers`` ->
   ``number`` (l.191-198). These replacements apply to the whole template including RULER's
   answer prefix (prepare.py appends it before calling niah.py).
"""

from __future__ import annotations

from random import Random

from harness.data.ruler import templates
from harness.data.ruler.haystack import random_value, split_sentences

# Minimum haystack units RULER's search can reach is its increment (5 for noise/needle below
# 4096 tokens); the harness allows any size from the number of needles up.


def needles_count(args: dict) -> int:
    k = max(args["num_needle_k"], args["num_needle_q"])
    return k * args["num_needle_v"]


def min_size(args: dict) -> int:
    if args["type_haystack"] == "essay":
        return 1
    return needles_count(args)  # random.sample(range(num_haystack), len(needles)) needs this many


def build(args: dict, num_haystack: int, sample_seed: str, run_seed: int, essay: list[str] | None):
    """One prompt with ``num_haystack`` haystack units. Returns (prompt, answers, metadata)."""
    rng = Random(sample_seed)
    type_k, type_v = args["type_needle_k"], args["type_needle_v"]
    num_k = max(args["num_needle_k"], args["num_needle_q"])
    num_v, num_q = args["num_needle_v"], args["num_needle_q"]

    keys: list[str] = []
    values: list[list[str]] = []
    needles: list[str] = []
    needle_kv: dict[str, tuple[str, str]] = {}
    for _ in range(num_k):
        keys.append(random_value(rng, type_k))
        value: list[str] = []
        for _ in range(num_v):
            value.append(random_value(rng, type_v))
            s = templates.NEEDLE.format(type_needle_v=type_v, key=keys[-1], value=value[-1])
            needles.append(s)
            needle_kv[s] = (keys[-1], value[-1])
        values.append(value)
    Random(run_seed).shuffle(needles)

    placed: list[dict] = []  # the needles in context order with their nominal depth (percent)
    if args["type_haystack"] == "essay":
        assert essay is not None
        if num_haystack <= len(essay):
            text = " ".join(essay[:num_haystack])
        else:
            repeats = (num_haystack + len(essay) - 1) // len(essay)
            text = " ".join((essay * repeats)[:num_haystack])
        sents = split_sentences(text.strip())
        depths = sorted(rng.sample(templates.DEPTHS, len(needles)))
        positions = [0] + [int(len(sents) * (d / 100)) for d in depths] + [len(sents)]
        parts: list[str] = []
        for i in range(1, len(positions)):
            parts.append(" ".join(sents[positions[i - 1] : positions[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
                placed.append({"depth": float(depths[i - 1]), "sentence_index": positions[i]})
        context = " ".join(parts)
        units = len(sents)
    else:
        if args["type_haystack"] == "noise":
            sentences = [templates.NOISE] * num_haystack
        elif args["type_haystack"] == "needle":
            sentences = [
                templates.NEEDLE.format(
                    type_needle_v=type_v, key=random_value(rng, type_k), value=random_value(rng, type_v)
                )
                for _ in range(num_haystack)
            ]
        else:
            raise ValueError(args["type_haystack"])
        indexes = sorted(rng.sample(range(num_haystack), len(needles)), reverse=True)
        for index, element in zip(indexes, needles, strict=True):
            sentences.insert(index, element)
        context = "\n".join(sentences)
        # each insertion below an earlier one moves it down a line: the r-th lowest ends on line index + r
        for rank, index in enumerate(sorted(indexes)):
            placed.append({"depth": 100.0 * index / num_haystack, "line_index": index + rank})
        # needles[j] went to indexes[j] (descending), so in context order they are reversed
        ordered = list(reversed(needles))
        for p, s in zip(placed, ordered, strict=True):
            p["needle"] = s
        units = num_haystack
    if args["type_haystack"] == "essay":
        for p, s in zip(placed, needles, strict=True):
            p["needle"] = s
    for p in placed:
        p["key"], p["value"] = needle_kv[p.pop("needle")]

    indices = rng.sample(range(num_k), num_q)
    queries = [keys[i] for i in indices]
    answers = [a for i in indices for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]

    template = templates.full_template("niah")
    type_needle_v = type_v
    if num_q * num_v == 1:
        template = template.replace("Some", "A")
        template = template.replace("are all", "is")
        template = template.replace("are", "is")
        template = template.replace("answers", "answer")
        type_needle_v = type_needle_v[:-1]
    prompt = template.format(type_needle_v=type_needle_v, context=context, query=query)

    first = next(p for p in placed if p["key"] == queries[0] and p["value"] == answers[0])
    meta = {
        "depth": first["depth"],
        "needles": placed,
        "queries": queries,
        "num_haystack": num_haystack,
        "haystack_units": units,
    }
    return prompt, answers, meta
