"""Text sources of a suite (harness.data.sources) and their memory-mapped token streams (harness.data.tokens)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from harness.data import default_tokenizer, random_windows
from harness.data.sources import Source, open_source
from harness.data.tokenizer import tokenizer_fingerprint
from harness.data.tokens import as_long, stream_dtype, token_stream
from harness.errors import UserError
from harness.plan import documents, plan
from harness.suite import load_suite

DOCS = ["First book.\r\nIt has two lines.\n", "Second book,\n\nwith a blank line.", "Third. " * 3000]


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # its own cache of the local json
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def write_sources(root):
    """The same documents as a text directory, a jsonl file and a json file for datasets."""
    (root / "books").mkdir()
    for i, text in enumerate(DOCS):  # names sort naturally: 2 before 10
        (root / "books" / f"{[2, 10, 11][i]}.txt").write_bytes(text.encode())
    rows = "".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(DOCS))
    (root / "books.jsonl").write_text(rows)
    return {"text": Source(source="text", path=str(root / "books")),
            "jsonl": Source(source="jsonl", path=str(root / "books.jsonl"), field="body"),
            "hf": Source(source="hf", path="json", data_files=str(root / "books.jsonl"), field="body")}


def test_text_jsonl_and_hf_give_the_same_tokens(tmp_path, tmp_cache, tok):
    streams = {}
    for name, src in write_sources(tmp_path).items():
        docs = open_source(src, "data.train")
        assert [d.text for d in docs] == [t.replace("\r\n", "\n") for t in DOCS], name
        streams[name] = token_stream(tok, docs)
    text = streams["text"]
    assert isinstance(text, np.memmap) and text.dtype == np.uint16
    assert all(np.array_equal(text, s) for s in streams.values())
    eos = tok.eos_token_id
    assert int((text == eos).sum()) == len(DOCS) - 1
    assert tok.decode(as_long(text).tolist()).split(tok.eos_token) == [t.replace("\r\n", "\n") for t in DOCS]
    assert len(list((tmp_cache / "tokens").glob("[!.]*"))) == 3  # one entry per source fingerprint


def test_max_tokens_caps_the_stream_and_the_key(tmp_path, tmp_cache, tok):
    src = write_sources(tmp_path)["text"]
    whole = token_stream(tok, open_source(src, "data.train"))
    capped = open_source(src.model_copy(update={"max_tokens": 50}), "data.train")
    assert capped.fingerprint != open_source(src, "data.train").fingerprint
    assert np.array_equal(token_stream(tok, capped), whole[:50])
    assert len(token_stream(tok, capped, max_tokens=20)) == 20  # the smaller of the two caps
    with pytest.raises(UserError, match="max_tokens"):
        token_stream(tok, capped, max_tokens=0)


def test_a_changed_file_is_a_new_stream(tmp_path, tmp_cache, tok):
    src = write_sources(tmp_path)["text"]
    before = open_source(src, "data.train")
    (tmp_path / "books" / "2.txt").write_text("A different first book, longer than before.")
    after = open_source(src, "data.train")
    assert before.fingerprint != after.fingerprint
    assert tok.decode(as_long(token_stream(tok, after)[:9]).tolist()).startswith("A different first book")
    with pytest.raises(UserError, match="2.txt changed since its source was opened"):
        token_stream(tok, before)  # its fingerprint says what the file was, not what it is now


def test_a_tokenizer_with_another_eos_is_another_stream(tmp_path, tmp_cache, tok):
    # the same tokenizer.json with another eos (as Qwen2.5 base vs Instruct) separates documents with another id
    docs = open_source(write_sources(tmp_path)["text"], "data.train")
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.add_special_tokens(["<|eot|>"])
    base, instruct = (PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=e)
                      for e in (tok.eos_token, "<|eot|>"))
    assert tokenizer_fingerprint(base) == tokenizer_fingerprint(instruct)
    seps = [int((token_stream(t, docs) == t.eos_token_id).sum()) for t in (base, instruct)]
    assert seps == [len(DOCS) - 1] * 2


def test_random_windows_read_a_memory_mapped_stream_like_a_tensor(tmp_path, tmp_cache, tok):
    stream = token_stream(tok, open_source(write_sources(tmp_path)["text"], "data.train"))
    a = random_windows(stream, 16, 4, torch.Generator().manual_seed(3))
    b = random_windows(as_long(stream), 16, 4, torch.Generator().manual_seed(3))
    assert a.dtype == torch.long and a.shape == (4, 16) and torch.equal(a, b)


def test_wide_vocabularies_are_stored_as_uint32():
    class Wide:
        def __len__(self):
            return 70_000

    assert stream_dtype(Wide()) == np.uint32


@pytest.mark.parametrize(("setup", "src", "message"), [
    (None, {"source": "text", "path": "{tmp}/nowhere"}, r"data.train.path: .*nowhere does not exist"),
    ("empty_dir", {"source": "text", "path": "{tmp}/d"}, r"holds no \*.txt files"),
    ("empty_files", {"source": "text", "path": "{tmp}/d"}, "no text to tokenize"),
    ("bad_utf8", {"source": "text", "path": "{tmp}/d"}, r"1.txt is not UTF-8"),
    ("no_field", {"source": "jsonl", "path": "{tmp}/x.jsonl", "field": "body"},
     r"data.train.field: .*x.jsonl:2 has no text field 'body' \(fields: other\); fix: set data.train.field"),
    ("not_json", {"source": "jsonl", "path": "{tmp}/x.jsonl", "field": "body"}, r"x.jsonl:2: not JSON"),
    ("no_field", {"source": "text", "path": "{tmp}/x.jsonl"},
     r"data.train.path: .*x.jsonl is .jsonl data, which source text would read as prose; fix: source: jsonl"),
    ("no_field", {"source": "hf", "path": "json", "data_files": "{tmp}/x.jsonl", "field": "txt"},
     r"data.train.field: json has no column 'txt' \(columns: body"),
    (None, {"source": "hf", "path": "no-such-org/no-such-dataset"}, r"load_dataset.*fix: without network"),
])
def test_bad_sources_are_named_and_leave_no_cache_entry(tmp_path, tmp_cache, tok, monkeypatch, setup, src, message):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = tmp_path / "d"
    if setup in ("empty_dir", "empty_files", "bad_utf8"):
        d.mkdir()
    if setup == "empty_files":
        (d / "1.txt").write_text("")
    if setup == "bad_utf8":
        (d / "1.txt").write_bytes(b"ok \xff\xfe")
    if setup in ("no_field", "not_json"):
        second = '{"other": "b"}' if setup == "no_field" else "{not json"
        (tmp_path / "x.jsonl").write_text('{"body": "a"}\n' + second + "\n")
    source = Source(**{k: v.format(tmp=tmp_path) for k, v in src.items()})
    with pytest.raises(UserError, match=message) as e:
        token_stream(tok, open_source(source, "data.train"))
    assert "\n" not in str(e.value)
    assert not list((tmp_cache / "tokens").glob("[!.]*")) if (tmp_cache / "tokens").exists() else True


@pytest.mark.parametrize("hub_id", ["no-such-org/no-such-dataset", "no-such-dataset"])  # owner-less: legacy ids
def test_a_hub_dataset_out_of_reach_fails_at_once(tmp_cache, monkeypatch, hub_id):
    """No network, and offline mode not set: a Hub dataset that is not in the cache fails with its fix at once,
    not after huggingface_hub's retries (1 + 2 + 4 + 8 + 8 s of sleep)."""
    import datasets.config
    import httpx2
    import huggingface_hub
    from huggingface_hub.utils import _http

    def no_network(request):
        raise httpx2.ConnectError("[Errno -2] Name or service not known", request=request)

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    sleeps = []
    monkeypatch.setattr(_http.time, "sleep", sleeps.append)
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(no_network)))
    try:
        with pytest.raises(UserError, match=rf"data.eval: datasets.load_dataset\('{hub_id}'.*"
                                            r"huggingface.co does not answer\); fix: without network it must be in "
                                            r"the HF cache"):
            open_source(Source(source="hf", path=hub_id), "data.eval")
    finally:
        huggingface_hub.set_client_factory(_http.default_client_factory)
    assert sleeps == []
    assert not datasets.config.HF_HUB_OFFLINE  # offline for that one load only


@pytest.mark.parametrize(("data", "message"), [
    ("train: {source: text}", "source text needs a path"),
    ("train: {source: text, path: x, split: train}", "split: a text source is one split"),
    ("train: {source: embedded, field: text}", "field: not an option of source embedded"),
    ("eval: {source: parquet}", r"data.eval.source: Input should be 'embedded', 'pg19'"),
    ("split: test", r"data.split: unknown field \(allowed: pg19, train, eval\)"),
])
def test_bad_data_blocks_fail_validation(tmp_path, data, message):
    (tmp_path / "s.yaml").write_text(f"name: s\ndata:\n  {data}\n")
    with pytest.raises(UserError, match=message):
        load_suite(tmp_path / "s.yaml")


def test_defaults_and_the_pg19_root(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_PG19_DIR", raising=False)
    (tmp_path / "s.yaml").write_text("name: s\n")
    data = load_suite(tmp_path / "s.yaml").data
    assert data.source("train") == Source(source="embedded", split="train")
    assert data.source("eval") == Source(source="embedded", split="test")
    monkeypatch.setenv("HARNESS_PG19_DIR", "/env")
    assert data.source("eval") == Source(source="pg19", split="test", path="/env")
    assert data.source("eval", pg19="/flag").path == "/flag"
    (tmp_path / "s.yaml").write_text("name: s\ndata:\n  pg19: /suite\n  train: {source: pg19}\n"
                                     "  eval: {source: pg19, split: validation, path: /own}\n")
    data = load_suite(tmp_path / "s.yaml").data
    assert data.source("train") == Source(source="pg19", split="train", path="/suite")
    assert data.source("eval") == Source(source="pg19", split="validation", path="/own")
    assert data.source("eval", pg19="/flag").path == "/flag"
    # local files through datasets are one split, "train": the eval role's "test" failed with "Unknown split"
    (tmp_path / "s.yaml").write_text("name: s\ndata:\n  eval: {source: hf, path: json, data_files: /x.jsonl}\n")
    assert load_suite(tmp_path / "s.yaml").data.source("eval").split == "train"


def test_the_training_text_determines_the_finetuned_cells_only(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_PG19_DIR", raising=False)
    srcs = write_sources(tmp_path)
    hashes = {}
    for name, train in (("embedded", ""), ("text", f"data:\n  train: {{source: text, path: {srcs['text'].path}}}\n")):
        (tmp_path / "s.yaml").write_text("name: s\nmethods: [lora]\n" + train)
        suite = load_suite(tmp_path / "s.yaml")
        jobs = plan(suite, documents(suite, "eval").fingerprint, documents(suite, "train").fingerprint)
        hashes[name] = {c["id"]: c["hash"] for j in jobs for c in j.cells}
    assert hashes["embedded"].keys() == hashes["text"].keys()
    changed = {i for i in hashes["text"] if hashes["text"][i] != hashes["embedded"][i]}
    assert changed and all("/lora/" in i for i in changed)
    assert all(hashes["text"][i] == hashes["embedded"][i] for i in hashes["text"] if "/pretrain" in i)


def test_a_change_to_the_tokenizing_code_is_another_stream(tmp_path, monkeypatch, tok):
    """A stream is kept in the cache by its key: a fix to how documents are cut and joined must not be served the
    streams the old code wrote."""
    from harness import cache
    from harness.data.tokens import tokens_cache_key

    docs = open_source(write_sources(tmp_path)["text"], "data.train")
    before = tokens_cache_key(tok, docs)
    monkeypatch.setattr(cache, "code_version", lambda *modules: "edited")
    assert tokens_cache_key(tok, docs) != before


def test_documents_text_joins_by_blank_lines_up_to_the_one_that_reaches_max_chars(tmp_path):
    docs = open_source(write_sources(tmp_path)["text"], "data.train")
    first, second = (t.replace("\r\n", "\n") for t in DOCS[:2])
    assert docs.text(len(first) + 2) == first  # the first document reaches it: the second is not read
    assert docs.text(len(first) + 3) == first + "\n\n" + second


def test_sources_default_to_their_train_split(tmp_path):
    from harness.data import default_corpus
    from harness.data.sources import Documents

    assert open_source(Source(), "data.train").fingerprint == Documents.of_corpus(default_corpus(), "train").fingerprint
    assert Documents.of_corpus(default_corpus(), "train").fingerprint != \
        Documents.of_corpus(default_corpus(), "test").fingerprint  # a split's stream is not another's
    for split in ("train", "test"):
        (tmp_path / "pg" / split).mkdir(parents=True)
        (tmp_path / "pg" / split / "1.txt").write_text(f"The {split} book.")
    docs = open_source(Source(source="pg19", path=str(tmp_path / "pg")), "data.train")
    assert [d.text for d in docs] == ["The train book."]


def test_text_sources_read_every_txt_file_below_a_directory_or_a_recursive_glob_once(tmp_path):
    (tmp_path / "d" / "sub" / "deeper").mkdir(parents=True)
    for name, text in {"10.txt": "ten", "2.txt": "two", "notes.md": "not read", "sub/3.txt": "three",
                       "sub/deeper/1.txt": "one"}.items():
        (tmp_path / "d" / name).write_text(text)
    by_dir = [d.text for d in open_source(Source(source="text", path=str(tmp_path / "d")), "x")]
    assert by_dir == ["two", "ten", "three", "one"]  # natural path order; notes.md is not text
    by_glob = [d.text for d in open_source(Source(source="text", path=str(tmp_path / "d" / "**" / "*.txt")), "x")]
    assert by_glob == by_dir


def test_a_lone_carriage_return_is_a_line_end_in_every_source(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.txt").write_bytes(b"old\rMac\r\nline ends\n")
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "old\rMac\r\nline ends\n"}) + "\n")
    for src in (Source(source="text", path=str(tmp_path / "d")), Source(source="jsonl", path=str(tmp_path / "x.jsonl")),
                Source(source="hf", path="json", data_files=str(tmp_path / "x.jsonl"))):
        assert [d.text for d in open_source(src, "data.train")] == ["old\nMac\nline ends\n"], src.source


def test_jsonl_rows_field_text_by_default_blank_lines_skipped(tmp_path, tmp_cache):
    rows = [{"text": "one", "title": "A"}, {"text": "two", "title": "B"}]
    (tmp_path / "x.jsonl").write_text(json.dumps(rows[0]) + "\n\n  \n" + json.dumps(rows[1]) + "\n")
    for kind in ("jsonl", "hf"):
        extra = {"data_files": str(tmp_path / "x.jsonl"), "path": "json"} if kind == "hf" else {
            "path": str(tmp_path / "x.jsonl")}
        text = open_source(Source(source=kind, **extra), "data.train")
        assert [d.text for d in text] == ["one", "two"], kind
        title = open_source(Source(source=kind, field="title", **extra), "data.train")
        assert [d.text for d in title] == ["A", "B"], kind
        assert title.fingerprint != text.fingerprint, kind  # another field is another stream


def test_a_file_edited_to_the_same_size_or_the_same_mtime_is_another_source(tmp_path):
    import os

    src = write_sources(tmp_path)["text"]
    book = tmp_path / "books" / "2.txt"
    before = open_source(src, "data.train").fingerprint
    st = book.stat()
    book.write_bytes(book.read_bytes().upper())  # the same size, a later mtime
    os.utime(book, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    same_size = open_source(src, "data.train").fingerprint
    book.write_bytes(book.read_bytes() + b"More.")  # another size, the mtime of before
    os.utime(book, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    same_mtime = open_source(src, "data.train").fingerprint
    assert len({before, same_size, same_mtime}) == 3


@pytest.mark.parametrize(("size", "dtype"), [(65_535, np.uint16), (65_536, np.uint16), (65_537, np.uint32)])
def test_a_vocabulary_of_65536_ids_still_fits_uint16(size, dtype):
    class Vocab:
        def __len__(self):
            return size

    assert stream_dtype(Vocab()) == dtype  # ids 0 .. size - 1


def test_a_uint32_stream_holds_the_same_tokens(tmp_path, tmp_cache, tok, monkeypatch):
    from harness.data import tokens

    docs = open_source(write_sources(tmp_path)["text"], "data.train")
    narrow = np.array(token_stream(tok, docs))
    monkeypatch.setattr(tokens, "stream_dtype", lambda tokenizer: np.dtype(np.uint32))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache32"))
    wide = token_stream(tok, docs)
    assert wide.dtype == np.uint32 and np.array_equal(wide, narrow)


def test_tokenizers_with_a_normalizer_get_whole_documents(tmp_path, tmp_cache, tok):
    from tokenizers import normalizers

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Strip()  # strips each piece's ends: a cut document would lose its line ends
    stripping = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tok.eos_token)
    (tmp_path / "d").mkdir()
    text = "A line of the book.\nAnother line.\n" * 4000  # over 64 k characters: pieces for a ByteLevel tokenizer
    (tmp_path / "d" / "1.txt").write_text(text)
    stream = token_stream(stripping, open_source(Source(source="text", path=str(tmp_path / "d")), "data.train"))
    assert as_long(stream).tolist() == backend.encode(text, add_special_tokens=False).ids


def test_max_tokens_stops_reading_documents(tmp_path, tmp_cache, tok, monkeypatch):
    from harness.data import tokens
    from harness.data.corpus import Document
    from harness.data.sources import Documents

    monkeypatch.setattr(tokens, "BATCH_CHARS", 100)  # a batch per document
    read = []

    def five():
        for _ in range(5):
            read.append(len(read))
            yield Document(str(len(read)), "", "Some words of a document, long enough to fill a batch. " * 3)

    docs = Documents("five", None, "five documents", "five-fp", False, None, five)
    first = tok.encode(next(five()).text, add_special_tokens=False)
    read.clear()
    stream = token_stream(tok, docs, max_tokens=2 * len(first) + 1)  # exactly the first two and their eos
    assert as_long(stream).tolist() == first + [tok.eos_token_id] + first
    assert len(read) == 2
