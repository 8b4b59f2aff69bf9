"""Spread recall rows for fine-tuning: every answer lies more than half the context after its fact."""

from itertools import groupby
from random import Random

import torch

from harness.data import default_tokenizer
from harness.data.long_recall import SpreadRecallDocuments, mixed_batches

TEXT = "And the earth was without form, and void; and darkness was upon the face of the deep. " * 20


def test_facts_in_the_first_quarter_questions_in_the_last():
    tok = default_tokenizer()
    docs = SpreadRecallDocuments(tok, TEXT, answer_weight=7.0)
    for length in (256, 1024):
        for seed in range(10):
            ids, weights = docs.row(Random(seed), length)
            assert len(ids) == len(weights) == length
            answered = [i for i, w in enumerate(weights) if w == 7.0]
            assert answered and min(answered) >= 3 * length // 4
            head = tok.decode(ids[: length // 4])
            for value in tok.decode([ids[i] for i in answered]).split():
                assert value.rstrip(".") in head  # stated in the first quarter: more than length/2 back


def test_mixed_batches_draw_rows_per_row_and_reproducibly():
    tokens = torch.arange(5000) % 300
    next_batch = mixed_batches(tokens, SpreadRecallDocuments(default_tokenizer(), TEXT), 0.5, 256, 1)
    g = torch.Generator().manual_seed(0)
    draws = [next_batch(g) for _ in range(40)]
    recall = [bool((w > 1).any()) for _, w in draws]
    assert 10 <= sum(recall) <= 30  # about half of 40 one-row batches
    for (ids, w), r in zip(draws, recall, strict=True):
        assert ids.shape == w.shape == (1, 256)
        if not r:
            assert (w == 1).all() and ((ids[0, 1:] - ids[0, :-1]) % 300 == 1).sum() > 250  # a window of the stream
    g = torch.Generator().manual_seed(0)
    assert all(torch.equal(next_batch(g)[0], ids) for ids, _ in draws[:5])
    none = mixed_batches(tokens, SpreadRecallDocuments(default_tokenizer(), TEXT), 0.0, 256, 4)
    assert (none(torch.Generator().manual_seed(1))[1] == 1).all()
    every = mixed_batches(tokens, SpreadRecallDocuments(default_tokenizer(), TEXT), 1.0, 256, 4)
    ids = every(torch.Generator().manual_seed(1))[0]
    assert len({tuple(row.tolist()) for row in ids}) == 4  # each recall row a document of its own


def test_a_fact_that_does_not_fit_the_first_quarter_is_not_asked_for():
    """At short contexts the first fact may not fit in the first quarter either: cut there, its question would ask
    for a value the row does not hold."""
    tok = default_tokenizer()
    docs = SpreadRecallDocuments(tok, TEXT, answer_weight=7.0)
    for length in (16, 48, 64, 128):
        for seed in range(40):
            ids, weights = docs.row(Random(seed), length)
            assert len(ids) == len(weights) == length
            head = tok.decode(ids[: length // 4])
            for value in tok.decode([t for t, w in zip(ids, weights, strict=True) if w == 7.0]).split():
                assert value.rstrip(".") in head, (length, seed, value, head)


def test_every_answer_in_a_row_is_whole():
    """A question goes in only with its whole answer: cut at the row's end, the last answer would weight part of a
    value. Every run of answer-weighted tokens is one answer, up to its newline."""
    tok = default_tokenizer()
    docs = SpreadRecallDocuments(tok, TEXT, answer_weight=7.0)
    whole = 0
    for length in (128, 256, 512):
        for seed in range(20):
            ids, weights = docs.row(Random(seed), length)
            for weighted, run in groupby(zip(ids, weights, strict=True), key=lambda x: x[1] == 7.0):
                if weighted:
                    answer = tok.decode([t for t, _ in run])
                    assert answer.endswith("\n"), (length, seed, answer)
                    whole += 1
    assert whole > 100


def test_questions_come_in_another_order_than_the_facts():
    """Asked in the order stated, the n-th answer would be the n-th fact: position, not recall, would answer."""
    tok = default_tokenizer()
    docs = SpreadRecallDocuments(tok, TEXT, answer_weight=7.0)
    shuffled = 0
    for seed in range(10):
        ids, weights = docs.row(Random(seed), 1024)
        head = tok.decode(ids[:256])
        values = tok.decode([t for t, w in zip(ids, weights, strict=True) if w == 7.0]).split()
        stated_at = [head.index(value.rstrip(".")) for value in values]
        shuffled += stated_at != sorted(stated_at)
    assert shuffled >= 5


def test_a_long_row_asks_for_each_of_its_max_facts_facts_once():
    tok = default_tokenizer()
    docs = SpreadRecallDocuments(tok, TEXT, max_facts=3, answer_weight=7.0)
    for seed in range(5):
        ids, weights = docs.row(Random(seed), 1024)
        answers = [tok.decode([t for t, _ in run]) for weighted, run in
                   groupby(zip(ids, weights, strict=True), key=lambda x: x[1] == 7.0) if weighted]
        assert len(answers) == len(set(answers)) == 3
