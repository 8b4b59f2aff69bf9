"""A small byte-level BPE tokenizer trained on the corpus itself (no hub download).

Byte-level BPE (GPT-2 style pre-tokenisation) covers every byte, so any text round-trips
exactly and nothing maps to an unknown token. One special token, ``<|endoftext|>``, serves as
bos, eos, pad and unk; :func:`harness.data.tokens.encode_corpus` puts it between documents.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from harness import cache
from harness.data.corpus import Corpus
from harness.errors import UserError

EOS = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4096
MIN_VOCAB_SIZE = 256 + 1  # every byte plus the special token


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        clean_up_tokenization_spaces=False,
        model_max_length=sys.maxsize,  # the harness windows long streams itself; no length warnings
    )


def train_tokenizer(
    corpus: Corpus, vocab_size: int = DEFAULT_VOCAB_SIZE, split: str = "train"
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ``vocab_size`` entries on one split of ``corpus``."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab_size={vocab_size} is too small; use at least {MIN_VOCAB_SIZE}")
    docs = corpus.split(split)
    if not docs:
        raise UserError(f"split {split!r} of corpus {corpus.name!r} is empty; train on a non-empty split")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    return _wrap(tok)


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """Hash of what decides the token ids (vocab, merges, special tokens, pre-tokeniser).

    Padding/truncation settings are left out, so turning them on does not change the hash.
    """
    spec = json.loads(tok.backend_tokenizer.to_str())
    keep = {k: spec.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor")}
    blob = json.dumps(keep, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def text_bytes(tok, ids) -> int:
    """UTF-8 bytes of the text that a tensor of token ids decodes to, special tokens (a document's eos) left out."""
    return len(tok.decode(ids.tolist(), skip_special_tokens=True).encode("utf-8"))


def tokenizer_cache_key(corpus: Corpus, vocab_size: int = DEFAULT_VOCAB_SIZE, split: str = "train") -> str:
    return cache.fingerprint(
        corpus.fingerprint, vocab_size, split, tokenizers.__version__, cache.code_version(sys.modules[__name__])
    )


def cached_tokenizer(
    corpus: Corpus, vocab_size: int = DEFAULT_VOCAB_SIZE, split: str = "train"
) -> PreTrainedTokenizerFast:
    """``train_tokenizer`` once per (corpus, vocab_size, split, code), then load from the cache. Jobs that start
    side by side on a fresh cache take turns on the key's lock, so one trains it and the others load it."""
    key = tokenizer_cache_key(corpus, vocab_size, split)

    def make() -> None:
        t0 = time.perf_counter()
        tok = train_tokenizer(corpus, vocab_size, split)
        meta = {
            "corpus": corpus.name,
            "corpus_fingerprint": corpus.fingerprint,
            "split": split,
            "vocab_size": vocab_size,
            "tokenizers_version": tokenizers.__version__,
            "tokenizer_fingerprint": tokenizer_fingerprint(tok),
            "train_seconds": round(time.perf_counter() - t0, 3),
        }
        with cache.build("tokenizer", key, meta) as tmp:
            tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))

    path = cache.ensure("tokenizer", key, make)
    return _wrap(Tokenizer.from_file(str(path / "tokenizer.json")))


def default_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """The tokenizer trained on the embedded default corpus's train split (cached)."""
    from harness.data.embedded import default_corpus

    return cached_tokenizer(default_corpus(), vocab_size)
