"""RULER task generation (harness.data.ruler) and scoring (harness.metrics.ruler)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter

import pytest

from harness.data.ruler import GROUPS, PAPER_TASKS, TASKS, generate, niah
from harness.data.ruler.haystack import AdjNounWords, count_tokens, split_sentences, zeta
from harness.errors import UserError
from harness.metrics import ruler as metric

# Prompts must use at least this fraction of the prompt budget (length - max_new_tokens). The
# coarsest haystack unit is a distractor uuid needle (~50 tokens) at 512 tokens: ~86 %.
MIN_FILL = 0.80
ESSAY_TASKS = {n for n, s in TASKS.items() if s.args.get("type_haystack") == "essay"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from harness.data import default_tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield default_tokenizer()


@pytest.fixture(scope="module")
def book():
    from harness.data import default_corpus

    return " ".join(d.text for d in default_corpus().split("validation"))


class WhitespaceTokenizer:
    def encode(self, text):
        return text.split()


_cache: dict = {}


def gen(task, length, tok, book, n=2, seed=1):
    key = (task, length, n, seed, id(tok))
    if key not in _cache:
        _cache[key] = generate(task, length, tok, n, seed, haystack_text=book if task in ESSAY_TASKS else None)
    return _cache[key]


def _min_from(err: UserError) -> int:
    return int(re.search(r"at least (\d+) tokens", str(err)).group(1))


def _context_and_question(task, prompt):
    """Split a prompt into its haystack part and the trailing question + answer prefix."""
    markers = {
        "niah": "\nWhat ",
        "variable_tracking": "\nQuestion:",
        "common_words_extraction": "\nQuestion:",
        "freq_words_extraction": "\nQuestion:",
    }
    cut = prompt.rindex(markers[TASKS[task].family])
    return prompt[:cut], prompt[cut:]


def test_registry_matches_ruler_yaml():
    assert PAPER_TASKS == (
        "niah_single_1",
        "niah_single_2",
        "niah_single_3",
        "niah_multikey_1",
        "niah_multikey_2",
        "niah_multikey_3",
        "niah_multivalue",
        "niah_multiquery",
        "vt",
        "cwe",
        "fwe",
    )
    assert set(TASKS) == set(PAPER_TASKS) | {"qa_1", "qa_2"}
    budgets = {t: TASKS[t].max_new_tokens for t in TASKS}
    assert {budgets[t] for t in PAPER_TASKS if t.startswith("niah")} == {128}
    assert (budgets["vt"], budgets["cwe"], budgets["fwe"], budgets["qa_1"]) == (30, 120, 50, 32)
    assert TASKS["cwe"].args == {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}
    assert TASKS["vt"].args["num_hops"] == 4 and TASKS["fwe"].args["alpha"] == 2.0
    assert TASKS["niah_multikey_3"].args["type_needle_k"] == "uuids"
    assert GROUPS["NIAH-M-QV"] == ("niah_multivalue", "niah_multiquery") and GROUPS["average"] == PAPER_TASKS


@pytest.mark.parametrize("length", [512, 1024])
@pytest.mark.parametrize("task", PAPER_TASKS)
def test_prompts_fit_and_contain_references(task, length, tok, book):
    spec = TASKS[task]
    try:
        samples = gen(task, length, tok, book)
    except UserError as e:
        # vt (in-context example of ~500 tokens) and cwe (one few-shot list) do not fit in 512 tokens
        assert length == 512 and task in {"vt", "cwe"}, e
        minimum = _min_from(e)
        assert 512 < minimum <= 1024
        ok = generate(task, minimum, tok, 1, 1)  # the stated minimum is enough ...
        assert ok[0].length + spec.max_new_tokens <= minimum
        with pytest.raises(UserError):  # ... and it is the minimum
            generate(task, minimum - 1, tok, 1, 1)
        return
    budget = length - spec.max_new_tokens
    assert len(samples) == 2
    for s in samples:
        assert s.max_new_tokens == spec.max_new_tokens
        assert s.length == count_tokens(tok, s.input)
        assert MIN_FILL * budget <= s.length <= budget
        assert s.metadata["task"] == task
        assert s.metadata["prompt_sha256"] == hashlib.sha256(s.input.encode("utf-8")).hexdigest()
        assert s.outputs and all(isinstance(o, str) and o for o in s.outputs)
        context, question = _context_and_question(task, s.input)
        if spec.family == "niah":
            kind = spec.args["type_needle_v"]
            for o in s.outputs:
                assert o in context
            for nd in s.metadata["needles"]:
                assert f"One of the special magic {kind} for {nd['key']} is: {nd['value']}." in context
            for q in s.metadata["queries"]:
                assert q in question
            n_q = spec.args["num_needle_q"] * spec.args["num_needle_v"]
            assert len(s.outputs) == n_q
            assert question.endswith("mentioned in the provided text " + ("is" if n_q == 1 else "are"))
            if task in ESSAY_TASKS:
                assert s.metadata["haystack_deviation"] == "book text instead of Paul Graham essays"
        elif spec.family == "variable_tracking":
            assert len(s.outputs) == 5
            value = s.metadata["value"]
            main = context[context.rindex("Memorize and track") :]
            chain = [f"VAR {s.outputs[0]} = {value}"] + [
                f"VAR {b} = VAR {a} " for a, b in zip(s.outputs, s.outputs[1:], strict=False)
            ]
            lines = main.split("\n")
            idx = [lines.index(c) for c in chain]
            assert idx == sorted(idx)
            assert question.endswith(f"5 variables are assigned the value {value}, they are: ")
            assert context.count("Memorize and track") == 2  # in-context example + question
        elif spec.family == "common_words_extraction":
            last = context[context.rindex("Below is a numbered list") :]
            entries = Counter(re.findall(r"\d+\. (\S+)", last))
            freq = s.metadata["freq_cw"]
            assert freq == (6 if length < 4096 else 30)
            assert len(s.outputs) == 10
            assert all(entries[w] == freq for w in s.outputs)
            assert all(c == s.metadata["freq_ucw"] for w, c in entries.items() if w not in s.outputs)
        elif spec.family == "freq_words_extraction":
            words = Counter(context.split("coded words. ", 1)[1].split())
            assert [words[w] for w in s.outputs] == s.metadata["counts"]
            others = [c for w, c in words.items() if w not in s.outputs and w != "..."]
            assert min(s.metadata["counts"]) > max(others, default=0)


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_3", "niah_multikey_2", "vt", "cwe", "fwe"])
def test_deterministic_per_seed(task, tok, book):
    a = gen(task, 1024, tok, book)
    b = generate(task, 1024, tok, 2, 1, haystack_text=book if task in ESSAY_TASKS else None)
    assert [(s.input, s.outputs, s.metadata) for s in a] == [(s.input, s.outputs, s.metadata) for s in b]
    c = generate(task, 1024, tok, 2, 2, haystack_text=book if task in ESSAY_TASKS else None)
    assert a[0].input != c[0].input and a[0].outputs != c[0].outputs
    assert a[0].input != a[1].input
    # sample i does not depend on n
    one = generate(task, 1024, tok, 1, 1, haystack_text=book if task in ESSAY_TASKS else None)
    assert one[0].input == a[0].input


def test_depth_metadata_matches_needle_position(tok, book):
    # noise haystack: the needle is on line `line_index` of the haystack lines
    for s in gen("niah_single_1", 1024, tok, book):
        context, _ = _context_and_question("niah_single_1", s.input)
        lines = context.split("\n")[1:]  # the first line is the instruction
        (nd,) = s.metadata["needles"]
        assert lines[nd["line_index"]].endswith(f"is: {nd['value']}.")
        assert nd["depth"] == pytest.approx(100 * nd["line_index"] / s.metadata["num_haystack"])
        assert s.metadata["depth"] == nd["depth"]
    # among distractor needles (which end alike, with other values), the line of the one asked for
    for task in ("niah_multikey_2", "niah_multikey_3"):
        for s in gen(task, 1024, tok, book):
            lines = _context_and_question(task, s.input)[0].split("\n")
            for nd in s.metadata["needles"]:
                assert lines[1 + nd["line_index"]].endswith(f"is: {nd['value']}."), (task, nd)
    # several needles in a noise or needle haystack (no registered task has them): each on its own final line
    for haystack in ("noise", "needle"):
        args = {"type_haystack": haystack, "type_needle_k": "words", "type_needle_v": "numbers",
                "num_needle_k": 5, "num_needle_v": 1, "num_needle_q": 1}
        for seed in range(5):
            prompt, _, meta = niah.build(args, 12, f"s{seed}", 42, None)
            lines = _context_and_question("niah_multikey_2", prompt)[0].split("\n")[1:]
            for nd in meta["needles"]:
                assert lines[nd["line_index"]].endswith(f"{nd['key']} is: {nd['value']}."), (haystack, seed, nd)
    # essay haystack: the needle precedes sentence int(n_sents * depth / 100)
    for task in ("niah_single_2", "niah_multikey_1", "niah_multivalue"):
        for s in gen(task, 1024, tok, book):
            context, _ = _context_and_question(task, s.input)
            body = context.split("\n", 1)[1]
            for nd in s.metadata["needles"]:
                assert nd["depth"] in {float(d) for d in range(0, 101)}
                pos = body.index(f"is: {nd['value']}.") / len(body)
                assert abs(pos - nd["depth"] / 100) < 0.15, (task, pos, nd)
    # vt: chain line positions
    s = gen("vt", 1024, tok, book)[0]
    assert s.metadata["depths"] == sorted(s.metadata["depths"])


def test_long_prompt_4096(tok, book):
    (s,) = generate("niah_single_2", 4096, tok, 1, 3, haystack_text=book)
    assert 0.99 * (4096 - 128) <= s.length <= 4096 - 128
    assert s.outputs[0] in s.input
    (c,) = generate("cwe", 4096, tok, 1, 3)
    assert c.metadata["freq_cw"] == 30 and c.metadata["freq_ucw"] == 3 and c.length <= 4096 - 120


def test_whitespace_tokenizer():
    wt = WhitespaceTokenizer()
    (s,) = generate("niah_single_1", 512, wt, 1, 0)
    assert s.length == len(s.input.split()) <= 512 - 128
    assert s.length > 512 - 128 - 20  # one noise line is 19 words


def test_errors(tok, book):
    with pytest.raises(UserError, match="did you mean 'niah_single_1'"):
        generate("niah_singel_1", 1024, tok, 1, 0)
    with pytest.raises(UserError, match="at least"):
        generate("niah_single_1", 200, tok, 1, 0)
    with pytest.raises(UserError, match="at least"):
        generate("niah_single_1", 100, tok, 1, 0)
    with pytest.raises(UserError, match="haystack_text"):
        generate("niah_single_2", 1024, tok, 1, 0)
    with pytest.raises(UserError, match="qa_file"):
        generate("qa_1", 1024, tok, 1, 0)
    with pytest.raises(UserError, match="not found"):
        generate("qa_2", 1024, tok, 1, 0, qa_file="/nonexistent/hotpot.json")


def test_essay_file_and_qa_file(tmp_path, tok, book):
    ef = tmp_path / "PaulGrahamEssays.json"
    ef.write_text(json.dumps({"text": book[:20000]}))
    (s,) = generate("niah_single_2", 1024, tok, 1, 0, essay_file=ef)
    assert "haystack_deviation" not in s.metadata and s.outputs[0] in s.input
    squad = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": f"Paragraph {i} says the colour of box {i} is shade{i}.",
                        "qas": [
                            {
                                "question": f"What colour is box {i}?",
                                "answers": [{"text": f"shade{i}"}],
                                "is_impossible": False,
                            }
                        ],
                    }
                    for i in range(60)
                ]
            }
        ]
    }
    qf = tmp_path / "squad.json"
    qf.write_text(json.dumps(squad))
    qs = generate("qa_1", 1024, tok, 2, 0, qa_file=qf)
    for i, s in enumerate(qs):
        assert s.outputs == [f"shade{i}"] and f"box {i} is shade{i}." in s.input
        assert s.input.endswith(f"Question: What colour is box {i}? Answer:")
        assert s.max_new_tokens == 32 and s.length <= 1024 - 32
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="unexpected layout"):
        generate("qa_1", 1024, tok, 1, 0, qa_file=bad)
    empty = tmp_path / "empty.json"
    empty.write_text('{"data": []}')
    with pytest.raises(UserError, match="has no answerable questions"):
        generate("qa_1", 16, tok, 0, 0, qa_file=empty)


@pytest.mark.parametrize("task,length,n", [("niah_single_2", 128, 4), ("fwe", 128, 4), ("fwe", 40, 1)])
def test_a_too_short_length_is_told_one_at_which_every_sample_fits(tok, book, task, length, n):
    """The minimum took sample 0 alone (niah_single_2 with 4 samples: "at least 254", then at 254 "at least 260"),
    only the generation budget at or below it ("129"), and a fixed 250 for fwe."""
    with pytest.raises(UserError, match=r"at least (\d+)") as e:
        generate(task, length, tok, n, 0, haystack_text=book)
    least = int(re.search(r"at least (\d+)", str(e.value)).group(1))
    assert len(generate(task, least, tok, n, 0, haystack_text=book)) == n


def test_adj_noun_words_is_sorted_set():
    adjs = ["blue", "blue-eyed", "high", "high-pitched", "old", "zany", "Early", "a b", "blue"]
    nouns = ["eye", "eyed-cat", "cat", "e-book", "ATM", "arm-rest", "zebra", "apple", "cat"]
    literal = sorted(set(f"{a}-{n}" for a in adjs for n in nouns))
    w = AdjNounWords(adjs, nouns)
    assert len(w) == len(literal) and list(w) == literal and w[-1] == literal[-1]


def test_sentence_splitter_and_zeta():
    text = 'Mr. Smith went to Washington. He said "Hello!" Then 3 dogs ran. e.g. this stays. J. Doe wrote it? Yes.'
    assert split_sentences(text) == [
        "Mr. Smith went to Washington.",
        'He said "Hello!"',
        "Then 3 dogs ran. e.g. this stays.",
        "J. Doe wrote it?",
        "Yes.",
    ]
    assert " ".join(split_sentences(text)) == text
    assert zeta(2.0) == pytest.approx(math.pi**2 / 6, rel=1e-14)
    assert zeta(4.0) == pytest.approx(math.pi**4 / 90, rel=1e-14)


def test_scoring():
    refs = [["1234567"], ["ABC", "def"], ["x", "y", "z", "w"]]
    preds = [" 1234567.", "abc and DEF", "x y"]
    assert metric.per_sample("niah_single_1", preds, refs) == [1.0, 1.0, 0.5]
    assert metric.score("niah_single_1", preds, refs) == round(250 / 3, 2) == 83.33
    assert metric.score("vt", ["abc"], [["ABC", "def"]]) == 50.0
    # string_match_part (qa): any reference counts
    assert metric.per_sample("qa_1", ["the Def"], [["abc", "def"]]) == [1.0]
    assert metric.score("qa_2", ["none", "ABC"], [["abc", "def"], ["abc"]]) == 50.0
    # postprocessing: control characters become newlines, then strip
    assert metric.postprocess("  ab\x00cd\t\n") == "ab\ncd"
    assert metric.per_sample("fwe", ["ab\x01cd"], [["ab\ncd"]]) == [1.0]
    # a plain string reference is one reference
    assert metric.per_sample("cwe", ["foo"], ["foo"]) == [1.0]
    with pytest.raises(UserError):
        metric.score("niah_single_1", ["a"], [["a"], ["b"]])
    with pytest.raises(UserError):
        metric.score("niah_single_1", [], [])
    with pytest.raises(UserError, match="did you mean"):
        metric.score("niah_multikey_4", ["a"], [["a"]])


def test_group_scores():
    scores = {t: float(i * 10) for i, t in enumerate(PAPER_TASKS)}  # 0, 10, ..., 100
    g = metric.group_scores(scores)
    assert list(g) == ["NIAH-S", "NIAH-M", "NIAH-M-QV", "VT", "CF-WE", "average"]
    assert g["NIAH-S"] == 10.0 and g["NIAH-M"] == 40.0 and g["NIAH-M-QV"] == 65.0
    assert g["VT"] == 80.0 and g["CF-WE"] == 95.0 and g["average"] == 50.0
    partial = metric.group_scores({"vt": 12.5, "cwe": 10.0})
    assert partial == {"VT": 12.5}
    with pytest.raises(UserError):
        metric.group_scores({"bogus": 1.0})


def test_sentence_splitter_splits_at_a_run_of_spaces():
    # RULER's essay words end with "" when the text ends with whitespace (re.sub(r"\s+", " ", ...).split(" ")),
    # so a repeated essay has two spaces where it wraps round; NLTK's sent_tokenize splits there and drops them.
    assert split_sentences("Two dogs ran.  Then the end.   Yes. No") == ["Two dogs ran.", "Then the end.", "Yes.", "No"]
    assert split_sentences("Dr.  Smith came.  So  did I.") == ["Dr.  Smith came.", "So  did I."]


def test_scoring_edge_cases_as_ruler():
    # every character in [\x00-\x1f] becomes a newline, \x1f (the last) as much as \x00
    assert metric.postprocess("a\x1fb\x1e") == "a\nb"
    assert metric.per_sample("vt", ["A\x1fB"], [["a\nb"]]) == [1.0]
    # a plain string reference is one reference, not a list of its characters
    assert metric.per_sample("cwe", ["of"], ["foo"]) == [0.0]
    assert metric.per_sample("qa_1", ["of"], ["foo"]) == [0.0]
    # a sample without references is an error, not a zero division or a free point
    with pytest.raises(UserError, match="reference list is empty"):
        metric.score("niah_single_1", ["a"], [[]])
    with pytest.raises(UserError, match="reference list is empty"):
        metric.score("qa_1", ["a"], [[]])


def test_prompt_lengths_count_no_special_tokens(tok):
    # a tokenizer that puts a BOS first (as Llama's): RULER's lengths count the text's tokens alone
    import transformers
    from tokenizers import Tokenizer, processors

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single=f"{tok.eos_token} $A",
                                                           special_tokens=[(tok.eos_token, tok.eos_token_id)])
    bos = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tok.eos_token)
    text = "The grass is green."
    assert len(bos.encode(text)) == len(tok.encode(text, add_special_tokens=False)) + 1
    assert count_tokens(bos, text) == count_tokens(tok, text) == len(tok.encode(text, add_special_tokens=False))
    (s,) = generate("niah_single_1", 512, bos, 1, 0)
    assert s.length == len(bos.encode(s.input, add_special_tokens=False)) <= 512 - 128


def test_qa_documents_are_chosen_and_ordered_as_rulers():
    """qa.py l.125-150: the gold documents, then the article's other paragraphs, then random other documents (as
    many as fit), drawn from the sample's RNG; shuffled by a fresh random.Random(seed), so with every document in the
    prompt all samples list them in one order."""
    from random import Random

    from harness.data.ruler import qa

    docs = [f"doc {i}" for i in range(10)]
    question = {"query": "q", "outputs": ["a"], "context": [2], "more_context": [5, 7, 8]}

    def listed(num_docs, rng, seed):
        prompt, outputs, meta = qa.build(question, docs, num_docs, rng, seed)
        assert outputs == ["a"] and meta == {"num_docs": num_docs}
        return [line for line in prompt.split("\n") if line.startswith("doc ")]

    def ruler(chosen, seed):
        Random(seed).shuffle(chosen)
        return [docs[i] for i in chosen]

    rng = Random(1)
    assert listed(3, Random(1), 5) == ruler([2, *rng.sample([5, 7, 8], 2)], 5)  # gold + some of the article's
    rng = Random(1)
    assert listed(6, Random(1), 5) == ruler([2, 5, 7, 8, *rng.sample([0, 1, 3, 4, 6, 9], 2)], 5)  # + others
    every = listed(10, Random(1), 5)
    assert every == listed(10, Random(2), 5) == ruler(list(range(10)), 5) != listed(10, Random(1), 6)


def _ruler_cells(monkeypatch, tok, **fields):
    """The ruler plugin's cells of one pretrained variant, with `tok` as the model's tokenizer."""
    from types import SimpleNamespace

    import harness.artefacts
    from harness.metrics.plugins.ruler import Ruler, RulerConfig

    monkeypatch.setattr(harness.artefacts, "tokenizer", lambda model: tok)
    plan = SimpleNamespace(suite=SimpleNamespace(model=lambda name: name), memo={}, data_fingerprint="data")
    return Ruler().cells(RulerConfig(**fields), SimpleNamespace(model="m", seed=0, stage="pretrained"), plan)


def test_the_ruler_cells_check_every_sample_at_the_shortest_length(monkeypatch, tok):
    # fwe, seed 0: sample 0 fits in 263 tokens, sample 1 needs 265
    assert len(_ruler_cells(monkeypatch, tok, tasks=["fwe"], lengths=[263, 512], samples=1)) == 2
    with pytest.raises(UserError, match=r"^metrics\.ruler\.lengths \(in models\.m's tokens\): RULER task 'fwe' "
                                        r"cannot fit in length 263: it needs at least 265 tokens"):
        _ruler_cells(monkeypatch, tok, tasks=["fwe"], lengths=[263, 512], samples=2)


def test_the_ruler_cells_hash_their_sample_count(monkeypatch, tok):
    (_, two), = _ruler_cells(monkeypatch, tok, tasks=["fwe"], lengths=[512], samples=2)
    (_, three), = _ruler_cells(monkeypatch, tok, tasks=["fwe"], lengths=[512], samples=3)
    assert two["metric"]["samples"] == 2 and two != three
    assert two == {"metric": {"samples": 2, "essay_file": None, "qa_files": {}}, "data": "data"}
