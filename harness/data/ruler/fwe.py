"""Frequent words extraction, after NVIDIA/RULER ``scripts/data/synthetic/freq_words_extraction.py``.

:func:`build` = ``generate_input_output`` / ``gen_text`` (l.74-107) for a given ``num_words``:

* vocabulary: ``vocab_size`` random lower-case words of ``coded_wordlen`` = 6 letters (drawn
  until distinct), sorted, shuffled by a fresh ``random.Random(seed)``, and ``vocab[0] = '...'``
  ("treat the top ranked as noise");
* word ``k`` (1-based rank) appears ``int(num_words * k**-alpha / zeta(alpha))`` times; the
  words are shuffled by a fresh ``random.Random(seed)`` and joined by spaces;
* answer: ``vocab[1:4]``, the three most frequent coded words.

``vocab_size = (max_seq_length - tokens_to_generate) // 50`` (l.113-114; the yaml does not set
``--vocab_size``). RULER sizes ``num_words`` by stepping in increments of ``max_len // 32``
(l.94-106); the harness searches the exact largest ``num_words`` that fits instead. The
smallest size is the one at which the 4th-ranked word (the last answer) appears at least once.
"""

from __future__ import annotations

import math
import string
from random import Random

import numpy as np

from harness.data.ruler import templates
from harness.data.ruler.haystack import zeta

CODED_WORDLEN = 6  # --coded_wordlen default (l.61)


def vocab_size(max_seq_length: int) -> int:
    return (max_seq_length - templates.tokens_to_generate("freq_words_extraction")) // 50


def min_size(args: dict) -> int:
    return math.ceil(zeta(args["alpha"]) * 4 ** args["alpha"])


def build(args: dict, num_words: int, rng: Random, run_seed: int, size_vocab: int):
    alpha = float(args["alpha"])
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=CODED_WORDLEN)) for _ in range(size_vocab)]
    while len(set(vocab)) < size_vocab:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=CODED_WORDLEN)))
    vocab = sorted(set(vocab))
    Random(run_seed).shuffle(vocab)
    vocab[0] = "..."
    k = np.arange(1, len(vocab) + 1)
    sampled_cnt = num_words * (k**-alpha) / zeta(alpha)
    sampled_words = [w for w, zi in zip(vocab, sampled_cnt.astype(int), strict=True) for _ in range(int(zi))]
    Random(run_seed).shuffle(sampled_words)
    prompt = templates.full_template("freq_words_extraction").format(context=" ".join(sampled_words), query="")
    meta = {"num_words": num_words, "vocab_size": size_vocab, "counts": [int(c) for c in sampled_cnt.astype(int)[1:4]]}
    return prompt, vocab[1:4], meta
