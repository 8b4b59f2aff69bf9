"""Shared pieces of the RULER generators: word lists, random keys/values, essay text, sizing.

Word lists (``wonderwords``):

* NIAH keys -- ``scripts/data/synthetic/niah.py`` l.97-101::

      nouns = wonderwords.random_word._get_words_from_text_file("nounlist.txt")
      adjs = wonderwords.random_word._get_words_from_text_file("adjectivelist.txt")
      words = sorted(list(set(f"{adj}-{noun}" for adj in adjs for noun in nouns)))

  That list has 6.2 M entries (about 20 s and 0.5 GB to build). :class:`AdjNounWords` is the
  same sorted sequence computed by index (``len``/``__getitem__``), so ``rng.choice(words)``
  draws exactly the element RULER's ``random.choice(words)`` would from the same RNG state.
* CWE vocabulary -- ``common_words_extraction.py`` l.72-77: ``sorted(set(nouns + adjs + verbs))``
  shuffled by ``random.Random(seed)``.

Random values -- ``niah.py`` l.108-128: 7-digit numbers ``randint(10**6, 10**7 - 1)``, uuids
``uuid.UUID(int=getrandbits(128), version=4)``.

Essay haystack -- ``niah.py`` l.84-87: ``re.sub(r'\\s+', " ", essay).split(" ")`` (a list of
words), then ``sent_tokenize`` (NLTK punkt) of the first ``num_haystack`` words. Punkt data is
not available offline; :func:`split_sentences` is a small deterministic regex splitter instead.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import re
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from random import Random

from harness.errors import UserError

# ---------------------------------------------------------------------------------------------
# wonderwords lists


@functools.cache
def _wonderwords(name: str) -> tuple[str, ...]:
    try:
        from wonderwords import random_word
    except ImportError as e:  # pragma: no cover - dependency declared in pyproject
        raise UserError("RULER tasks need the 'wonderwords' package: pip install wonderwords") from e
    # RULER calls this private helper itself (niah.py l.97); it returns the file's lines, stripped.
    return tuple(random_word._get_words_from_text_file(name))


def nouns() -> tuple[str, ...]:
    return _wonderwords("nounlist.txt")


def adjectives() -> tuple[str, ...]:
    return _wonderwords("adjectivelist.txt")


def verbs() -> tuple[str, ...]:
    return _wonderwords("verblist.txt")


class AdjNounWords(Sequence):
    """``sorted(set(f"{adj}-{noun}" for adj in adjs for noun in nouns))`` without building it.

    Adjectives are sorted by ``adj + "-"``. Whenever one adjective's ``adj + "-"`` is a prefix of
    another's (``blue`` / ``blue-eyed``), their combinations interleave in the sorted order; such
    a cluster is materialised and sorted (a few of them, ~14 k strings each). Every other
    adjective contributes a contiguous block ``adj-<noun>`` over the sorted nouns. Blocks appear
    in the order of their root key, and no root key is a prefix of another, so concatenating the
    blocks gives the globally sorted list; duplicates can only arise inside a cluster, where the
    ``set`` is applied. ``tests/test_ruler.py`` checks samples of it against the literal definition.
    """

    def __init__(self, adjs: Sequence[str], nns: Sequence[str]):
        self._nouns = sorted(set(nns))
        keys = sorted({a + "-" for a in adjs})
        blocks: list[list[str]] = []
        i = 0
        while i < len(keys):
            root = keys[i]
            j = i + 1
            while j < len(keys) and keys[j].startswith(root):
                j += 1
            blocks.append(keys[i:j])
            i = j
        self._blocks: list[tuple[str, list[str] | None]] = []
        self._starts: list[int] = []
        total = 0
        for members in blocks:
            self._starts.append(total)
            if len(members) == 1:
                self._blocks.append((members[0], None))
                total += len(self._nouns)
            else:
                combos = sorted({k + n for k in members for n in self._nouns})
                self._blocks.append((members[0], combos))
                total += len(combos)
        self._len = total

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(index)
        b = bisect.bisect_right(self._starts, index) - 1
        key, combos = self._blocks[b]
        off = index - self._starts[b]
        return combos[off] if combos is not None else key + self._nouns[off]


@functools.cache
def niah_words() -> AdjNounWords:
    """RULER's NIAH key words (niah.py l.97-101), as an index-computed sorted sequence."""
    return AdjNounWords(adjectives(), nouns())


@functools.cache
def cwe_words_sorted() -> tuple[str, ...]:
    """``sorted(list(set(nouns + adjs + verbs)))`` (common_words_extraction.py l.72-77), before
    RULER's ``random.Random(seed).shuffle``."""
    return tuple(sorted(set(nouns() + adjectives() + verbs())))


# ---------------------------------------------------------------------------------------------
# random values (niah.py l.108-128)


def random_number(rng: Random, num_digits: int = 7) -> str:
    return str(rng.randint(10 ** (num_digits - 1), 10**num_digits - 1))


def random_uuid(rng: Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_value(rng: Random, kind: str) -> str:
    if kind == "numbers":
        return random_number(rng)
    if kind == "words":
        return rng.choice(niah_words())
    if kind == "uuids":
        return random_uuid(rng)
    raise ValueError(f"unknown needle type {kind!r}")


# ---------------------------------------------------------------------------------------------
# essay haystack text

ESSAY_DEVIATION = "book text instead of Paul Graham essays"

# Abbreviations after which a period does not end a sentence (lower-cased, without the period).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc e.g i.e cf fig no vol ch p pp mt ft gen rev col capt lt sgt"
    " messrs mme mlle inc ltd co jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_SENT_END = re.compile(r"""[.!?]+["'\u2019\u201d)\]]*$""")
_SENT_START = re.compile(r"""^["'\u2018\u201c(\[]*[A-Z0-9]""")


def split_sentences(text: str) -> list[str]:
    """Deterministic stand-in for NLTK's ``sent_tokenize`` (RULER niah.py l.155).

    Splits on whitespace between a word ending in ``.``, ``!`` or ``?`` (optionally followed by
    closing quotes/brackets) and a word starting (after optional opening quotes/brackets) with an
    upper-case letter or a digit -- unless the word ending in ``.`` is a known abbreviation
    (``Mr.``, ``Dr.``, ``e.g.`` ...) or a single letter (an initial, ``J.``). Sentences are
    returned without surrounding whitespace (like NLTK's, the spaces between two sentences are
    dropped, however many); joining them with single spaces restores ``text`` when its whitespace
    was already single spaces (RULER normalises it so, except where a repeated essay wraps round).
    """
    # Words and the runs of spaces between them: a run of several spaces (RULER's repeated essay has
    # one where its last, empty word meets its first) separates two words like a single space does.
    parts = re.split(r"( +)", text.strip())
    words, gaps = parts[0::2], parts[1::2]
    sents: list[str] = []
    cur: list[str] = []
    for i, w in enumerate(words):
        cur.append(w)
        if i + 1 == len(words):
            break
        if not _SENT_END.search(w) or not _SENT_START.match(words[i + 1]):
            cur.append(gaps[i])
            continue
        stem = w.rstrip("\"'\u2019\u201d)]")
        if stem.endswith(".") and not stem.endswith(".."):
            base = stem[:-1].lstrip("\"'\u2018\u201c([").lower()
            if base in _ABBREVIATIONS or (len(base) == 1 and base.isalpha()):
                cur.append(gaps[i])
                continue
        sents.append("".join(cur))
        cur = []
    if cur and any(cur):
        sents.append("".join(cur))
    return [s for s in sents if s]


def essay_words(text: str) -> list[str]:
    """``re.sub(r'\\s+', " ", essay).split(" ")`` (niah.py l.87)."""
    return re.sub(r"\s+", " ", text).split(" ")


def load_essay_file(path: str | Path) -> str:
    """A user-supplied essay file: RULER's ``PaulGrahamEssays.json`` (``{"text": ...}``) or plain text."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"essay file {str(p)!r} not found; pass RULER's PaulGrahamEssays.json (a JSON object with a "
            "'text' field, built by RULER's scripts/data/synthetic/json/download_paulgraham_essay.py) or a "
            "UTF-8 text file"
        )
    raw = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            obj = json.loads(raw)
            text = obj["text"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"essay file {str(p)!r}: expected a JSON object with a 'text' string field") from e
        if not isinstance(text, str):
            raise UserError(f"essay file {str(p)!r}: the 'text' field must be a string")
        return text
    return raw


# ---------------------------------------------------------------------------------------------
# Riemann zeta (freq_words_extraction.py uses scipy.special.zeta; scipy is not a dependency)


def zeta(s: float) -> float:
    """Riemann zeta for real ``s > 1`` by Euler-Maclaurin summation (relative error < 1e-15)."""
    if s <= 1:
        raise ValueError("zeta needs s > 1")
    n = 64
    total = math.fsum(k**-s for k in range(1, n))
    # tail sum_{k>=n} k^-s = n^(1-s)/(s-1) + n^-s/2 + sum_j B_2j/(2j)! * s(s+1)..(s+2j-2) n^(-s-2j+1)
    tail = n ** (1 - s) / (s - 1) + 0.5 * n**-s
    bern = [1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66]
    poch = s
    fact = 2.0
    for j, b in enumerate(bern, start=1):
        tail += b / fact * poch * n ** (-s - 2 * j + 1)
        poch *= (s + 2 * j - 1) * (s + 2 * j)
        fact *= (2 * j + 1) * (2 * j + 2)
    return total + tail


# ---------------------------------------------------------------------------------------------
# tokens and sizing


def count_tokens(tokenizer, text: str) -> int:
    """Prompt tokens without special tokens (RULER: ``len(TOKENIZER.text_to_tokens(text))``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast HF tokenizer: skip the wrapper
    if backend is not None:
        return len(backend.encode(text, add_special_tokens=False).ids)
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    if hasattr(ids, "ids"):  # a raw tokenizers.Encoding
        ids = ids.ids
    return len(ids)


def fit_size(
    build: Callable[[int], str],
    ntokens: Callable[[str], int],
    budget: int,
    min_size: int,
    max_size: int | None = None,
) -> tuple[int, int] | None:
    """The largest haystack size whose prompt has ``<= budget`` tokens, and its token count.

    RULER (niah.py ``generate_samples`` l.209-262, likewise the other scripts) binary-searches the
    haystack size on one random draw and then steps down by a fixed increment per sample until
    the prompt fits. Here the search runs per sample on that sample's own (deterministic) draw:
    an estimate from the tokens per unit, a bracket around it, then bisection. Every accepted
    size was built and tokenized, so the returned prompt is guaranteed to fit; prompt length is
    assumed to grow with the size (true up to tokenizer merges at the insertion points, which at
    worst make the answer a few units short of the true maximum). Returns ``None`` when even
    ``min_size`` does not fit. ``max_size`` caps the search (the size itself is then returned if
    it fits).
    """
    cache: dict[int, int] = {}

    def tokens(size: int) -> int:
        if size not in cache:
            cache[size] = ntokens(build(size))
        return cache[size]

    t0 = tokens(min_size)
    if t0 > budget:
        return None
    if max_size is not None and tokens(max_size) <= budget:
        return max_size, cache[max_size]
    probe = min_size + max(8, min_size)
    if max_size is not None:
        probe = min(probe, max_size)
    per_unit = max((tokens(probe) - t0) / max(probe - min_size, 1), 1e-3)
    est = min_size + int((budget - t0) / per_unit)
    lo, hi = min_size, None  # lo fits; hi (when known) does not
    if tokens(probe) <= budget:
        lo = probe
    else:
        hi = probe
    step = max(2, int(0.02 * est))
    if hi is None:
        guess = max(lo + 1, est - step)
        if max_size is not None:
            guess = min(guess, max_size)
        while True:
            if tokens(guess) <= budget:
                lo = guess
                if max_size is not None and guess >= max_size:
                    return lo, cache[lo]
                guess = guess + step
                step *= 2
                if max_size is not None:
                    guess = min(guess, max_size)
            else:
                hi = guess
                break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tokens(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo, cache[lo]
