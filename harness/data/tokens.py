"""Token streams for language-model training and evaluation.

:func:`token_stream` turns a source's documents (harness.data.sources) into one 1-D stream,
LongLoRA-style: documents tokenized in order (no bos) and joined with the tokenizer's eos token
between consecutive documents. It is written in one streaming pass, batch by batch, to a flat
uint16 (uint32 for vocabularies over 65,536) file in the cache (kind ``"tokens"``), keyed by the
tokenizer's fingerprint, the documents' fingerprint, ``max_tokens`` and this module's code, and
read back memory-mapped: PG-19's train split (billions of tokens) never sits in memory.
:func:`encode_corpus` is the same for an in-memory corpus split, as a LongTensor;
:func:`random_windows` samples contiguous training windows from either.

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

import numpy as np
import torch
from tqdm.auto import tqdm

from harness import cache
from harness.data.corpus import Corpus
from harness.data.sources import Documents
from harness.data.tokenizer import tokenizer_fingerprint
from harness.errors import UserError

PIECE_CHARS = 1 << 16
BATCH_CHARS = 1 << 20
STREAM_FILE = "tokens.bin"
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


def stream_dtype(tokenizer) -> np.dtype:
    """uint16 when every id fits (vocabularies up to 65,536), else uint32."""
    return np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)


def _encode(tokenizer, docs: Documents, max_tokens: int | None, out) -> dict:
    """Write the documents' tokens to the binary file `out` in `stream_dtype`, batch by batch (memory is bounded
    by BATCH_CHARS, not by the size of the source); return counts for the cache entry's meta."""
    eos, dtype = _eos_id(tokenizer), stream_dtype(tokenizer)
    backend = tokenizer.backend_tokenizer
    cut = _cuttable(tokenizer)
    # encode_batch_fast (tokenizers >= 0.21) skips offsets: ~20 % faster, same ids.
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    bar = tqdm(total=docs.count, unit="doc", desc=f"tokenizing {docs.name}", leave=False, delay=2)
    counts = {"tokens": 0, "documents": 0, "chars": 0}
    # Queue of (doc index, piece) batched by characters; a document's eos follows its last piece.
    batch: list[tuple[int, str]] = []
    batch_chars, current = 0, -1

    def flush() -> None:
        nonlocal batch, batch_chars, current
        ids: list[int] = []
        for (i, _), enc in zip(batch, encode_batch([p for _, p in batch], add_special_tokens=False), strict=True):
            if i != current:  # first piece of a new document
                if current >= 0:
                    ids.append(eos)
                current = i
                counts["documents"] += 1
            ids.extend(enc.ids)
        if max_tokens is not None:
            del ids[max_tokens - counts["tokens"]:]
        out.write(np.asarray(ids, dtype=dtype).tobytes())
        counts["tokens"] += len(ids)
        counts["chars"] += batch_chars
        bar.set_postfix(tokens=counts["tokens"], refresh=False)
        batch, batch_chars = [], 0

    def full() -> bool:
        return max_tokens is not None and counts["tokens"] >= max_tokens

    for i, doc in enumerate(docs):
        for piece in _pieces(doc.text) if cut else [doc.text]:
            batch.append((i, piece))
            batch_chars += len(piece)
            if batch_chars >= BATCH_CHARS:
                flush()
                if full():
                    break
        bar.update()
        if full():
            break
    if batch and not full():
        flush()
    bar.close()
    return counts


def tokens_cache_key(tokenizer, docs: Documents, max_tokens: int | None = None) -> str:
    # the separator too: tokenizers that share tokenizer.json can differ in their eos (Qwen2.5 base and Instruct)
    return cache.fingerprint(tokenizer_fingerprint(tokenizer), _eos_id(tokenizer), docs.fingerprint, max_tokens,
                             cache.code_version(sys.modules[__name__]))


def token_stream(tokenizer, docs: Documents, max_tokens: int | None = None) -> np.ndarray:
    """The documents tokenized and joined by eos, as a read-only memory-mapped array (uint16 or uint32) in the
    cache; built in one streaming pass. With `max_tokens` (or the source's own cap, whichever is smaller), the
    first that many tokens: tokenizing stops there."""
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens={max_tokens} must be at least 1 (or None for the whole source)")
    caps = [t for t in (max_tokens, docs.max_tokens) if t is not None]
    max_tokens = min(caps) if caps else None
    key = tokens_cache_key(tokenizer, docs, max_tokens)

    def make() -> None:
        t0 = time.perf_counter()
        meta = {"what": docs.description, "fingerprint": docs.fingerprint, "dtype": stream_dtype(tokenizer).name,
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "max_tokens": max_tokens}
        with cache.build("tokens", key, meta) as tmp:
            with open(tmp / STREAM_FILE, "wb") as f:
                counts = _encode(tokenizer, docs, max_tokens, f)
            if counts["tokens"] == 0:
                raise UserError(f"{docs.description}: no text to tokenize; fix: point the source at documents")
            meta.update(counts, seconds=round(time.perf_counter() - t0, 3))

    path = cache.ensure("tokens", key, make)  # under the key's lock: jobs side by side tokenize it once
    dtype = json.loads((path / cache.META).read_text())["dtype"]
    return np.memmap(path / STREAM_FILE, dtype=dtype, mode="r")


def as_long(tokens: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A token array (or a slice of a memory-mapped stream) as a LongTensor in memory."""
    return tokens.to(torch.long) if isinstance(tokens, torch.Tensor) else torch.from_numpy(tokens.astype(np.int64))


def encode_corpus(tokenizer, corpus: Corpus, split: str, max_tokens: int | None = None) -> torch.Tensor:
    """One 1-D LongTensor: a corpus split's documents tokenized and joined by eos (cached: `token_stream`)."""
    return as_long(token_stream(tokenizer, Documents.of_corpus(corpus, split), max_tokens))


def random_windows(
    tokens: torch.Tensor | np.ndarray, length: int, batch_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``batch_size`` random contiguous windows of ``length`` tokens, a LongTensor (batch_size, length).

    ``tokens`` is a 1-D tensor or array (a memory-mapped stream: only the windows are read). Start positions
    are uniform over every valid offset, drawn from ``generator`` (seed it for reproducible batches). A window
    may cross document boundaries (eos in between), as in LongLoRA's packed training.
    """
    if tokens.ndim != 1:
        raise UserError(f"random_windows needs a 1-D token stream, got shape {tuple(tokens.shape)}")
    if length < 1 or batch_size < 1:
        raise UserError(f"window length ({length}) and batch size ({batch_size}) must be at least 1")
    n = len(tokens)
    if n < length:
        raise UserError(
            f"token stream has {n} tokens, shorter than the window length {length}; "
            "fix: use a shorter context length, a larger split, or a larger max_tokens"
        )
    starts = torch.randint(0, n - length + 1, (batch_size,), generator=generator)
    return torch.stack([as_long(tokens[s : s + length]) for s in starts.tolist()])
