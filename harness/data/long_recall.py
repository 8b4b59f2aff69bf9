"""Fine-tuning rows that ask for recall across the whole context: the `finetune.recall` share of the mixture.

Fine-tuning on book text never asks for anything beyond a sliding window, so at long context every backend would
be judged on what pretraining taught. A spread row is one recall document exactly as long as the fine-tuning
context: its facts lie in the first quarter, filler fills the middle, and its questions lie in the last quarter,
so every answer is more than half the context back: beyond a sliding window or an S\u00b2-Attn group of up to half
the context (the paper's proportions are a window of L/2 and groups of L/4). The facts, questions and filler are
harness.data.recall's (our own phrasing, not RULER's); the answers get the loss weight.
"""

from __future__ import annotations

from random import Random

import torch

from harness.data.recall import ATTRIBUTES, FACTS, INTROS, QUERIES, Batches, RecallDocuments
from harness.data.tokens import random_windows


class SpreadRecallDocuments(RecallDocuments):
    """Recall documents spread over a whole row: facts in the first quarter, questions in the last."""

    def row(self, rng: Random, length: int) -> tuple[list[int], list[float]]:
        def encode(text: str) -> list[int]:
            return self.tokenizer.encode(text, add_special_tokens=False)

        quarter = length // 4
        attribute = rng.choice(ATTRIBUTES)
        ids = encode(rng.choice(INTROS) + "\n")
        facts: dict[str, str] = {}
        while len(facts) < self.max_facts:
            k, v = self._key(rng), self._value(rng)
            filler = self._filler(rng, rng.randint(0, 1)) + " " if facts else ""
            piece = encode(filler + rng.choice(FACTS).format(a=attribute, k=k, v=v) + "\n")
            if len(ids) + len(piece) > quarter:  # left out, not cut: a short row may hold no fact, and no question
                break
            facts[k] = v
            ids += piece
        ids = ids[:quarter]
        while len(ids) < length - quarter:  # filler up to the last quarter
            ids += encode(self._filler(rng, 4) + "\n")
        ids = ids[: length - quarter]
        weights = [1.0] * len(ids)
        asked = list(facts.items())
        rng.shuffle(asked)
        for k, v in asked:
            question, answer = rng.choice(QUERIES)
            q, a = encode(question.format(a=attribute, k=k)), encode(answer.format(v=v) + "\n")
            if len(ids) + len(q) + len(a) > length:  # left out, not cut: a cut answer weights part of a value
                break
            ids += q + a
            weights += [1.0] * len(q) + [self.answer_weight] * len(a)
        while len(ids) < length:
            more = encode(self._filler(rng, 2) + "\n")
            ids += more
            weights += [1.0] * len(more)
        return ids[:length], weights[:length]


def mixed_batches(tokens: torch.Tensor, documents: RecallDocuments, fraction: float, context: int,
                  batch_size: int) -> Batches:
    """`next_batch(generator, step)`: each row is a `documents` row with probability `fraction`, else a random window
    of the book `tokens` (a per-row draw: fine-tuning batches are often one row); (ids, loss weights). All
    randomness comes from `generator`, so a resumed run draws the same batches."""

    def next_batch(generator: torch.Generator, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = [], []
        for u in torch.rand(batch_size, generator=generator).tolist():
            if u < fraction:
                row, w = documents.row(Random(int(torch.randint(0, 2**62, (1,), generator=generator))), context)
                ids.append(torch.tensor(row, dtype=torch.long))
                weights.append(torch.tensor(w, dtype=torch.float32))
            else:
                ids.append(random_windows(tokens, context, 1, generator)[0])
                weights.append(torch.ones(context))
        return torch.stack(ids), torch.stack(weights)

    return next_batch
