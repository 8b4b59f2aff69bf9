"""Token streams for language-model training and evaluation.

:func:`encode_corpus` turns a corpus split into one 1-D stream, LongLoRA-style: documents
tokenized in order (no bos) and joined with the tokenizer's eos token between consecutive
documents. Streams are cached content-addressed (kind ``"tokens"``), keyed by the tokenizer's
fingerprint, the corpus fingerprint, the split, ``max_tokens`` and this module's code.
:func:`random_windows` samples contiguous training windows from such a stream.

Speed: documents are cut into pieces of ~64 k characters at line breaks where GPT-2-style
byte-level pre-tokenisation cannot span the cut (see ``_SAFE_CUT``), so the result is
identical to tokenizing whole documents, while the fast tokenizer's ``encode_batch`` can
use every core and ``max_tokens`` stops early. Tokenizers of other kinds (normalizers,
prefix spaces, Metaspace) are fed whole documents.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from harness import cache
from harness.data.corpus import Corpus
from harness.data.tokenizer import tokenizer_fingerprint
from harness.errors import UserError

PIECE_CHARS = 1 << 16
BATCH_CHARS = 1 << 20
PROGRESS_MIN_CHARS = 4_000_000
# Cuts no GPT-2 pre-token crosses: after the first "\n" of a line break ("\n" or "\n\n") that
# has an ordinary character on both sides ("a.\n|Next", "a.\n|\nNext"). Longer blank runs are
# never cut (the full text would keep "\n\n" together where the pieces would split it).
_SAFE_CUT = re.compile(r"(?<=[A-Za-z0-9.,;:!?\"')\]]\n)(?=\n?[A-Za-z0-9\"(\[])")


def _cuttable(tokenizer) -> bool:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space", False)
        and pre.get("use_regex", True)
    )


def _pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    start = 0
    while len(text) - start > size:
        m = _SAFE_CUT.search(text, start + size)
        if m is None:
            break
        yield text[start : m.start()]
        start = m.start()
    yield text[start:]


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(
            "the tokenizer has no eos token, which encode_corpus puts between documents; "
            "fix: set tokenizer.eos_token (e.g. '<|endoftext|>') before encoding"
        )
    return int(eos)


def _encode(tokenizer, docs, max_tokens: int | None) -> tuple[torch.Tensor, int]:
    eos = _eos_id(tokenizer)
    backend = tokenizer.backend_tokenizer
    cut = _cuttable(tokenizer)
    # encode_batch_fast (tokenizers >= 0.21) skips offsets: ~20 % faster, same ids.
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    total_chars = sum(len(d.text) for d in docs)
    out: list[int] = []
    used_docs = 0
    bar = tqdm(
        total=total_chars,
        unit="char",
        unit_scale=True,
        desc="tokenizing",
        leave=False,
        disable=True if total_chars < PROGRESS_MIN_CHARS else None,
    )
    # Queue of (doc index, piece) batched by characters; a document's eos follows its last piece.
    batch: list[tuple[int, str]] = []
    batch_chars = 0

    def flush() -> None:
        nonlocal batch, batch_chars, used_docs
        encs = encode_batch([p for _, p in batch], add_special_tokens=False)
        for (i, _), enc in zip(batch, encs, strict=True):
            if i != used_docs:  # first piece of a new document
                out.append(eos)
                used_docs = i
            out.extend(enc.ids)
        bar.update(batch_chars)
        batch, batch_chars = [], 0

    for i, doc in enumerate(docs):
        for piece in _pieces(doc.text) if cut else [doc.text]:
            batch.append((i, piece))
            batch_chars += len(piece)
            if batch_chars >= BATCH_CHARS:
                flush()
                if max_tokens is not None and len(out) >= max_tokens:
                    break
        if max_tokens is not None and len(out) >= max_tokens:
            break
    if batch and not (max_tokens is not None and len(out) >= max_tokens):
        flush()
    bar.close()
    if max_tokens is not None:
        del out[max_tokens:]
    return torch.tensor(out, dtype=torch.long), used_docs + 1 if out else 0


def tokens_cache_key(tokenizer, corpus: Corpus, split: str, max_tokens: int | None = None) -> str:
    return cache.fingerprint(
        tokenizer_fingerprint(tokenizer),
        corpus.fingerprint,
        split,
        max_tokens,
        cache.code_version(sys.modules[__name__]),
    )


def encode_corpus(tokenizer, corpus: Corpus, split: str, max_tokens: int | None = None) -> torch.Tensor:
    """One 1-D LongTensor: the split's documents tokenized and joined by eos (cached).

    With ``max_tokens`` the stream is cut to at most that many tokens, and tokenization stops
    as soon as enough text has been encoded.
    """
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens={max_tokens} must be at least 1 (or None for the whole split)")
    docs = corpus.split(split)
    if not docs:
        raise UserError(f"split {split!r} of corpus {corpus.name!r} has no documents")
    key = tokens_cache_key(tokenizer, corpus, split, max_tokens)
    if (path := cache.lookup("tokens", key)) is None:
        t0 = time.perf_counter()
        stream, n_docs = _encode(tokenizer, docs, max_tokens)
        # int32 on disk halves the size; every vocabulary here is far below 2**31.
        with cache.build(
            "tokens",
            key,
            {
                "corpus": corpus.name,
                "corpus_fingerprint": corpus.fingerprint,
                "split": split,
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "max_tokens": max_tokens,
                "tokens": int(stream.numel()),
                "documents": n_docs,
                "chars": sum(len(d.text) for d in docs[:n_docs]),
                "seconds": round(time.perf_counter() - t0, 3),
            },
        ) as tmp:
            torch.save(stream.to(torch.int32), tmp / "tokens.pt")
        return stream
    return torch.load(path / "tokens.pt", weights_only=True).to(torch.long)


def random_windows(
    tokens: torch.Tensor, length: int, batch_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``batch_size`` random contiguous windows of ``length`` tokens, shape (batch_size, length).

    Start positions are uniform over every valid offset, drawn from ``generator`` (seed it for
    reproducible batches). A window may cross document boundaries (eos in between), as in
    LongLoRA's packed training.
    """
    if tokens.dim() != 1:
        raise UserError(f"random_windows needs a 1-D token stream, got shape {tuple(tokens.shape)}")
    if length < 1 or batch_size < 1:
        raise UserError(f"window length ({length}) and batch size ({batch_size}) must be at least 1")
    n = tokens.numel()
    if n < length:
        raise UserError(
            f"token stream has {n} tokens, shorter than the window length {length}; "
            "fix: use a shorter context length, a larger split, or a larger max_tokens"
        )
    starts = torch.randint(0, n - length + 1, (batch_size,), generator=generator)
    index = starts[:, None] + torch.arange(length)
    return tokens[index].to(torch.long)
