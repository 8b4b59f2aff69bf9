"""Synthetic associative-recall documents: the part of the pretraining mixture that teaches retrieval.

Book text alone does not teach a sub-1M-parameter model to look things up in its context: RULER stays
at 0 for every backend, so comparing fine-tuning methods on it measures nothing. These documents state
facts among filler sentences ("The pin of hiju is 105704940.") and then ask for some of them back, with
the loss on the answers up-weighted (:func:`recall_batches`).

Deliberately unlike RULER, so that the default model is not trained on the test: keys are words of the
training corpus, made-up syllable words or both joined; values are numbers of 3 to 9 digits, made-up
words or hex strings; the phrasings (``FACTS``, ``QUERIES``) and the repetitive filler are our own. None
of RULER's templates, needle sentence, noise sentences or wonderwords keys appear.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping
from functools import cached_property
from random import Random

import torch

from harness.data.tokens import random_windows

ATTRIBUTES = ["code", "number", "value", "password", "pin", "id", "key", "figure", "count", "tag", "mark", "sign"]
FACTS = [
    "The {a} of {k} is {v}.", "{k} has the {a} {v}.", "Note that the {a} for {k} is {v}.",
    "Remember this: {k} = {v}.", "{k}: {v}.", "Keep in mind that {k} goes with {v}.",
    "The {a} belonging to {k} reads {v}.", "For {k}, the {a} is {v}.",
]
QUERIES = [  # (question, answer); the answer's tokens get the answer weight
    ("Question: what is the {a} of {k}? Answer:", " {v}."),
    ("What {a} goes with {k}? The {a} for {k} is", " {v}."),
    ("Recall the {a} of {k}. It is", " {v}."),
    ("{k} =", " {v}"),
    ("Tell me the {a} for {k}.", " {v}."),
    ("Which {a} was given for {k} earlier? The {a} of {k} given earlier was", " {v}."),
    ("What is the {a} for {k} that was written above? The {a} for {k} that was written above is", " {v}."),
    ("Find the {a} of {k} in the text before this question. The {a} of {k} in the text is", " {v}."),
]
INTROS = ["Memorize the following facts.", "Here are some records.", "Read carefully.", ""]
REPETITIVE = ["The wind is calm.", "The road is long.", "A bell rings twice.", "Rain falls on the hill."]
CONSONANTS, VOWELS = "bcdfghjklmnprstvwz", "aeiou"


class RecallDocuments:
    """Generator of recall documents over a corpus's words and sentences, tokenized with `tokenizer`.

    A document: an intro, 1..`max_facts` facts each after 0..`max_filler` filler sentences (corpus
    sentences, or a repetitive filler), more filler, then questions about a random subset of the facts
    in random order. Returns token ids and per-token loss weights (`answer_weight` on answer tokens).
    """

    def __init__(self, tokenizer, text: str, max_facts: int = 8, max_filler: int = 4, answer_weight: float = 5.0):
        self.tokenizer, self.text = tokenizer, text
        self.max_facts, self.max_filler, self.answer_weight = max_facts, max_filler, answer_weight

    @cached_property
    def words(self) -> list[str]:
        return sorted({w.lower() for w in re.findall(r"\b[A-Za-z]{3,10}\b", self.text)})

    @cached_property
    def sentences(self) -> list[str]:
        found = (s.strip() for s in re.split(r"(?<=[.;:?!])\s+", self.text))
        return [s for s in found if 30 < len(s) < 160]

    def _pseudo_word(self, rng: Random) -> str:
        return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) + (rng.choice(CONSONANTS) if rng.random() < 0.3
                                                                       else "") for _ in range(rng.randint(2, 4)))

    def _key(self, rng: Random) -> str:
        parts = [rng.choice(self.words) if rng.random() < 0.5 else self._pseudo_word(rng)
                 for _ in range(rng.choice([1, 1, 2, 2, 3]))]
        return rng.choice(["-", " ", "_"]).join(parts)

    def _value(self, rng: Random) -> str:
        if rng.random() < 0.75:
            digits = rng.randint(3, 9)
            return str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if rng.random() < 0.5:
            return self._pseudo_word(rng)
        return "".join(rng.choice(string.hexdigits.lower()) for _ in range(rng.randint(6, 12)))

    def _filler(self, rng: Random, n: int) -> str:
        if rng.random() < 0.3:  # n lines of the same few sentences
            return "\n".join([" ".join(REPETITIVE[: rng.randint(1, len(REPETITIVE))])] * n)
        return " ".join(rng.choice(self.sentences) for _ in range(n))

    def document(self, rng: Random) -> tuple[list[int], list[float]]:
        facts: dict[str, str] = {}
        # A fresh draw per pass: the document stops at n facts with probability n / max_facts, so longer lists
        # are likelier than under one uniform draw (the measured recipe; changing it changes the cached model).
        while len(facts) < rng.randint(1, self.max_facts):
            facts[self._key(rng)] = self._value(rng)
        attribute = rng.choice(ATTRIBUTES)
        ids: list[int] = []
        weights: list[float] = []

        def add(text: str, weight: float = 1.0) -> None:
            new = self.tokenizer.encode(text, add_special_tokens=False)
            ids.extend(new)
            weights.extend([weight] * len(new))

        add(rng.choice(INTROS) + "\n")
        for k, v in facts.items():
            if rng.random() < 0.7:
                add(self._filler(rng, rng.randint(0, self.max_filler)) + "\n")
            add(rng.choice(FACTS).format(a=attribute, k=k, v=v) + "\n")
        add(self._filler(rng, rng.randint(0, self.max_filler)) + "\n")
        asked = list(facts.items())
        rng.shuffle(asked)
        for k, v in asked[: rng.randint(1, len(asked))]:
            question, answer = rng.choice(QUERIES)
            add(question.format(a=attribute, k=k))
            add(answer.format(v=v) + "\n", self.answer_weight)
        return ids, weights

    def row(self, rng: Random, length: int) -> tuple[list[int], list[float]]:
        """Documents joined by eos up to `length` tokens (the last one cut)."""
        ids: list[int] = []
        weights: list[float] = []
        while len(ids) < length:
            doc, w = self.document(rng)
            ids += doc + [self.tokenizer.eos_token_id]
            weights += w + [1.0]
        return ids[:length], weights[:length]


def share_at(fraction: float | Mapping[int, float], step: int) -> float:
    """The share of recall rows at `step`: `fraction` itself, or of a {first step: share} schedule the share
    whose first step is the latest at or before `step`."""
    if not isinstance(fraction, Mapping):
        return fraction
    return fraction[max(s for s in fraction if s <= step)]


Batches = Callable[[torch.Generator, int], tuple[torch.Tensor, torch.Tensor]]


def recall_batches(tokens: torch.Tensor, documents: RecallDocuments, fraction: float | Mapping[int, float],
                   context: int, batch_size: int) -> Batches:
    """`next_batch(generator, step)` for the training loop: round(share * `batch_size`) rows of recall
    documents, the share `fraction` or its schedule's at `step` (:func:`share_at`), the rest random windows of
    the book `tokens`; returns (ids, loss weights). All randomness comes from `generator` and `step`, so a
    resumed run draws the same batches."""

    def next_batch(generator: torch.Generator, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        n_recall = round(share_at(fraction, step) * batch_size)
        rng = Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
        rows = [documents.row(rng, context) for _ in range(n_recall)]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long).reshape(n_recall, context)
        weights = torch.tensor([r[1] for r in rows], dtype=torch.float32).reshape(n_recall, context)
        if n_recall < batch_size:
            ids = torch.cat([ids, random_windows(tokens, context, batch_size - n_recall, generator)])
            weights = torch.cat([weights, torch.ones(batch_size - n_recall, context)])
        return ids, weights

    return next_batch
