"""Synthetic recall documents: answers follow their facts, weights mark them, batches are reproducible."""

import re
from random import Random

import torch

from harness.data import default_corpus, default_tokenizer
from harness.data.recall import RecallDocuments, recall_batches, share_at
from harness.finetune.loop import next_token_logits, weighted_lm_loss
from harness.models import HybridForCausalLM, preset_config

TEXT = "And the earth was without form, and void; and darkness was upon the face of the deep. " * 20


def _documents(**kw) -> RecallDocuments:
    return RecallDocuments(default_tokenizer(), TEXT, **kw)


def test_every_answer_is_the_value_of_a_fact_stated_before_it():
    docs, tok = _documents(answer_weight=7.0), default_tokenizer()
    for seed in range(30):
        ids, weights = docs.document(Random(seed))
        assert len(ids) == len(weights) and set(weights) == {1.0, 7.0}
        text = tok.decode(ids)
        answers = tok.decode([t for t, w in zip(ids, weights, strict=True) if w == 7.0]).split()
        for answer in answers:
            value = answer.rstrip(".")
            fact = text.find(value)
            assert 0 <= fact < text.rfind(value), (value, text)  # stated in a fact, then asked for


def test_no_ruler_phrasing_in_training_documents():
    docs, tok = _documents(), default_tokenizer()
    text = "".join(tok.decode(docs.document(Random(s))[0]) for s in range(200)).lower()
    for ruler in ("special magic", "the grass is green", "the sky is blue", "here we go", "there and back again"):
        assert ruler not in text


def test_batches_mix_rows_and_are_reproducible():
    tokens = torch.arange(5000) % 300
    next_batch = recall_batches(tokens, _documents(), fraction=0.5, context=400, batch_size=4)
    ids, weights = next_batch(torch.Generator().manual_seed(3))
    again, _ = next_batch(torch.Generator().manual_seed(3))
    assert ids.shape == weights.shape == (4, 400) and torch.equal(ids, again)
    assert (weights[:2] > 1).any() and (weights[2:] == 1).all()  # 2 recall rows, then 2 book windows
    assert all((row[1:] - row[:-1] == 1).sum() > 390 for row in ids[2:] % 300)  # contiguous windows of the stream


def test_a_recall_schedule_changes_the_share_from_its_steps_on():
    assert [share_at({0: 0.5, 10: 0.25, 20: 0.0}, s) for s in (0, 9, 10, 19, 20, 99)] == [0.5, 0.5, 0.25, 0.25, 0, 0]
    assert share_at(0.5, 7) == 0.5
    next_batch = recall_batches(torch.arange(5000) % 300, _documents(), {0: 0.5, 3: 0.25}, context=400, batch_size=4)
    recall_rows = [int((next_batch(torch.Generator().manual_seed(0), s)[1] > 1).any(1).sum()) for s in (0, 2, 3, 9)]
    assert recall_rows == [2, 2, 1, 1]


def test_weighted_loss_with_unit_weights_is_the_models_loss():
    torch.manual_seed(0)
    cfg = preset_config("tiny-hybrid")
    cfg.vocab_size = 300
    model = HybridForCausalLM(cfg)
    ids = torch.randint(0, 300, (2, 40))
    out = model(input_ids=ids, labels=ids)
    logits = next_token_logits(model, ids)
    assert logits.shape == (2, 39, out.logits.shape[-1]) and torch.allclose(logits, out.logits[:, :-1], atol=1e-6)
    assert torch.allclose(weighted_lm_loss(logits, ids, torch.ones(2, 40)), out.loss, atol=1e-5)
    assert torch.allclose(weighted_lm_loss(logits, ids), out.loss, atol=1e-5)
    weights = torch.ones(2, 40)
    weights[:, 20:] = 0
    nll = torch.nn.functional.cross_entropy(out.logits[:, :19].flatten(0, 1), ids[:, 1:20].flatten())
    assert torch.allclose(weighted_lm_loss(logits, ids, weights), nll, atol=1e-5)


def test_corpus_words_and_sentences():
    docs = RecallDocuments(default_tokenizer(), "\n".join(d.text for d in default_corpus().split("train")[:2]))
    assert len(docs.words) > 500 and all(re.fullmatch(r"[a-z]{3,10}", w) for w in docs.words[:50])
    assert all(re.fullmatch(r"[a-z]{3,10}", w) for w in docs.words)
    assert len(docs.sentences) > 100 and all(30 < len(s) < 160 for s in docs.sentences)


def test_values_are_numbers_of_3_to_9_digits():
    class Numbers(Random):  # every value a number: random() picks the number branch; randint draws as before
        def random(self):
            return 0.0

        def getrandbits(self, k):
            return super().getrandbits(k)

    docs, rng = _documents(), Numbers(0)
    numbers = [docs._value(rng) for _ in range(500)]
    assert {len(v) for v in numbers} == set(range(3, 10)) and all(v.isdigit() and v[0] != "0" for v in numbers)


def test_a_row_is_documents_joined_by_eos_and_cut_to_its_length():
    docs, tok = _documents(answer_weight=7.0), default_tokenizer()
    rng = Random(5)
    (first, w1), (second, w2) = docs.document(rng), docs.document(rng)
    length = len(first) + 1 + len(second) - 3
    ids, weights = docs.row(Random(5), length)
    assert ids == (first + [tok.eos_token_id] + second)[:length]
    assert weights == (w1 + [1.0] + w2)[:length]


def test_the_recall_share_of_a_batch_is_rounded():
    next_batch = recall_batches(torch.arange(5000) % 300, _documents(), 0.4, context=100, batch_size=4)
    ids, _ = next_batch(torch.Generator().manual_seed(0))
    windows = [bool(((row[1:] - row[:-1]) % 300 == 1).all()) for row in ids]
    assert windows == [False, False, True, True]  # round(1.6) = 2 recall rows, then 2 book windows
