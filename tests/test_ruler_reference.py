"""harness.data.ruler against NVIDIA/RULER's own generation scripts, draw for draw.

Reference: NVIDIA/RULER commit c3f5e3b ("Merge pull request #108"), ``scripts/data/synthetic/``
``niah.py``, ``variable_tracking.py``, ``common_words_extraction.py`` and
``freq_words_extraction.py``, with the templates of ``scripts/data/synthetic/constants.py`` and
RULER's 'base' model template (template + answer prefix, ``scripts/data/prepare.py``).

How the pinned values were produced (a dev-time script, not part of this repository): each RULER
script was imported as a module with its command-line arguments set to the task's
``scripts/synthetic.yaml`` configuration and the run seed; its tokenizer and manifest imports were
replaced by stubs; ``nltk.tokenize.sent_tokenize`` by NLTK's ``PunktSentenceTokenizer()`` (the
trained English model cannot be downloaded offline; on the haystack below, plain sentences with
no abbreviations, initials or numbers, the two split alike); the essay file by :func:`essay_text`;
wonderwords 2.x supplied the word lists. For every case, RULER's module-global ``random`` was set
to the state of ``random.Random(f"ruler:{task}:{seed}:{index}")`` (the seed the harness gives
sample ``index``) and its ``generate_input_output`` called with the haystack size (and, for cwe,
``--max_seq_length``; for fwe, ``vocab_size = (length - 50) // 50`` and ``num_words``); the
prompt is RULER's ``input_text`` before the answer prefix is split off. For vt, the in-context
example came from ``generate_input_output(size, is_icl=True)`` with the state of
``random.Random(f"ruler:vt:{seed}:icl")``, was appended to as in ``sys_vartrack_w_noise_random``
and passed through ``randomize_icl`` after the sample's own draws, as there. The harness draws
vt's 5-digit values (RULER: ``np.random.randint(10000, 99999)``, a second global RNG) from the
sample's ``random.Random`` instead, a deviation documented in :mod:`harness.data.ruler.vt`; for
these hashes RULER's ``np.random.randint`` was pointed at ``random.randrange`` on its global
``random``, so every other draw is compared exactly. ``sha256`` is of the UTF-8 prompt.

The same script compared several hundred more (task, seed, size) cases, the 11 standard tasks
with their haystacks, and found them all equal.
"""

from __future__ import annotations

import hashlib
from random import Random

import pytest

from harness.data.ruler import cwe, fwe, generate, niah, vt
from harness.data.ruler.haystack import essay_words, fit_size
from harness.data.ruler.tasks import TASKS

_WORDS = (
    "time people way year work day thing life world school state family student group country problem hand "
    "part place case week company system program question number night point home water room mother area "
    "money story fact month lot right study book eye job word business issue side kind head house service "
    "friend father power hour game line end member law car city name team minute idea body back parent face "
    "level office door health person art war history party result change morning reason research moment air"
).split()


def essay_text(n_sents: int = 300) -> str:
    """The essay haystack: plain sentences (no abbreviations, initials or numbers) in paragraphs, ending
    with a newline, so its word list ends with an empty word as RULER's does (2687 words)."""
    rng = Random("ruler-reference-essay")
    paras, sents = [], []
    for i in range(n_sents):
        ws = [rng.choice(_WORDS) for _ in range(rng.randint(3, 15))]
        sents.append(" ".join([ws[0].capitalize(), *ws[1:]]) + rng.choice(".....?!"))
        if i % 7 == 6:
            paras.append(" ".join(sents))
            sents = []
    paras.append(" ".join(sents))
    return "\n\n".join(paras) + "\n"


ESSAY = essay_words(essay_text())
VT_ICL_SIZE = 8  # noise lines of the vt in-context example

# (task, run seed, sample index, haystack size, cwe/fwe max_seq_length, sha256 of RULER's prompt, RULER's answers)
# Sizes above len(ESSAY) (2687) take RULER's repeat path (niah.py l.151-154).
# fmt: off
CASES = [
    ("niah_single_1", 42, 0, 37, None,
     "597bd485e9a786ae4d118e9d940192abcb78c715f89eff10aeec892ca94fea4b",
     ["3349651"]),
    ("niah_single_2", 42, 0, 333, None,
     "3808f2187a118ba374c4f4780f209ec2475899e4791d1f793348a6c059218bc8",
     ["6189413"]),
    ("niah_single_2", 42, 1, 1500, None,
     "29ca0f6d630f381e4e2353bf8f618b4cee58f67acc6f7e8aae7a45034289a446",
     ["5801167"]),
    ("niah_single_2", 7, 2, 6000, None,
     "b99bdb55f5c2b9d578ba4564f45a1d832538776348dfe1ee5843ee91c7eea3f2",
     ["6537800"]),
    ("niah_single_3", 42, 0, 700, None,
     "3a538aad0c1cadae28ea91e159892f02f10dd0a1898056f7568970829565ab4d",
     ["ef990ed0-85c7-4ca1-938c-4f0f386cfeb5"]),
    ("niah_multikey_1", 42, 0, 1500, None,
     "18b7964346f6f2285192c0d68eb320c267bab7b3abcc33e9aa1ed556f3660bc7",
     ["6119153"]),
    ("niah_multikey_1", 7, 1, 5500, None,
     "abb2ab61ab0674d35059eef6ba0ac471ec8e3c362fc821f07203ab086f7aa859",
     ["2578847"]),
    ("niah_multikey_2", 42, 0, 40, None,
     "4a012a04fd51396b10b2da58760047e61de92930554155655e1d7fee12815ebf",
     ["1654930"]),
    ("niah_multikey_3", 7, 0, 25, None,
     "767fbff4dc27ac6c8de3565a5a40045bf284b65a6dd387c039d12f75e4e197ed",
     ["79940ef5-4be7-4b88-9b7a-b68d36b69dda"]),
    ("niah_multivalue", 42, 0, 900, None,
     "68480f491a79ba995fd09dfc8f3d36378d59100c10a1f108b1c49c57b6a5b3d9",
     ["2299413", "9816593", "8452866", "6469897"]),
    ("niah_multiquery", 42, 1, 2000, None,
     "444c14c729f67c39076d19997b6d8dacdd3135475e6d014a421fc6d1bf22bf77",
     ["2673354", "6918109", "1000609", "7131780"]),
    ("vt", 42, 0, 5, None,
     "c583513059c0b1d0038159c247661fb84663f47caa855d186057071e3fd2ad56",
     ["BLSDG", "DGJHA", "CYYAP", "KYRIX", "MHJJW"]),
    ("vt", 42, 1, 23, None,
     "4dd47027da442f1eb57d38db3db02aefeb17a1a696699286b23b39e48cf524c5",
     ["ABXAO", "BLTDJ", "QKZST", "AMNSQ", "NEMQV"]),
    ("vt", 7, 0, 200, None,
     "a60bfe48169743e8ffdb51c67dc1d65aeb1c771aa02cd0a3000ebb627221c3b0",
     ["NUQFF", "JMENX", "ZYJBI", "UOKWG", "AWNSS"]),
    ("cwe", 42, 0, 11, 1024,
     "78047da0563b1d4614fc2d2936fd99143e879d60b133f03d00cc83e345ec7da8",
     ["snowstorm", "stinger", "hydrolyse", "roof", "church", "education", "peer", "prepare", "pocket", "part"]),
    ("cwe", 42, 1, 97, 1024,
     "9933c2fc4024b47e50b178d9a2c0039d3a46e795ed83ef6c1b2578ad1070ec4a",
     ["wicked", "patio", "witty", "hen", "lot", "bracelet", "beginner", "rank", "mama", "thrift"]),
    ("cwe", 7, 0, 97, 8192,
     "328a34459a31094dfec2ba34a00b254ed12ea3541f0aed4d9130dcaee46ca91d",
     ["clam", "miter", "variation", "scholarship", "professional",
      "pit", "dishwasher", "justify", "disadvantage", "patent"]),
    ("cwe", 42, 2, 600, 8192,
     "ebd52b7902e9c3e4a807a0edac3c998736f1297df3023457fc5298b8ca1c82d9",
     ["anticipation", "west", "ethics", "airmail", "breeze", "prove", "complication", "score", "outlaw", "policy"]),
    ("fwe", 42, 0, 10, 512,
     "84ccf8b206dcaaea082df1736f77ba2350e3e511b01c9f095a2d2f9c8ab170ed",
     ["usonua", "vqjqqk", "mkbcgw"]),
    ("fwe", 42, 1, 1234, 512,
     "d307389828a3ef87be5870671a61b0458b3de1c9a5c67f409a3cb72f860c2515",
     ["pizqns", "qroagu", "hspwcs"]),
    ("fwe", 7, 0, 9000, 16384,
     "1ea2cbf10028d57dd676f81049776c0036bb72f7cf6b4f61fa9e8ad12eaf4b59",
     ["spxozz", "gillfp", "mvgsgo"]),
]
# fmt: on


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _build(task, seed, index, size, length):
    spec = TASKS[task]
    ss = f"ruler:{task}:{seed}:{index}"
    if spec.family == "niah":
        essay = ESSAY if spec.args["type_haystack"] == "essay" else None
        prompt, answers, _ = niah.build(spec.args, size, ss, seed, essay)
        return prompt, answers
    if spec.family == "variable_tracking":
        icl = vt.icl_text(*vt.build(spec.args, VT_ICL_SIZE, Random(f"ruler:vt:{seed}:icl"), is_icl=True)[:2])
        rng = Random(ss)
        prompt, answers, _ = vt.build(spec.args, size, rng)
        return vt.randomize_icl(icl, spec.args["num_hops"], rng) + "\n" + prompt, answers
    if spec.family == "common_words_extraction":
        eff = cwe.effective_args(spec.args, length)
        prompt, answers, _ = cwe.build(eff, size, Random(ss), seed, cwe.vocabulary(seed))
        return prompt, answers
    prompt, answers, _ = fwe.build(spec.args, size, Random(ss), seed, fwe.vocab_size(length))
    return prompt, answers


@pytest.mark.parametrize(
    ("task", "seed", "index", "size", "length", "sha", "answers"),
    CASES,
    ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in CASES],
)
def test_build_matches_ruler(task, seed, index, size, length, sha, answers):
    prompt, got = _build(task, seed, index, size, length)
    assert list(got) == answers
    assert _sha(prompt) == sha


class _Whitespace:
    def encode(self, text):
        return text.split()


# generate() with a whitespace tokenizer (prompt tokens grow with the haystack): (task, length, seed, haystack size
# chosen, vt in-context example size, prompt tokens, sha256 of RULER's prompt at that size, RULER's answers).
# fmt: off
GENERATED = [
    ("niah_single_1", 1024, 42, 44, None, 894,
     "f18198de1e1faadde03c8a69dc8a16467756b3dd1467194d148da4b0005701ae",
     ["3349651"]),
    ("niah_multikey_1", 2048, 5, 1832, None, 1920,
     "e0f62af8def970ce335b56c47316d94fccf7f8a6b470a0f4ada0ae896427b3df",
     ["5013220"]),
    ("niah_multikey_3", 2048, 42, 186, None, 1918,
     "4e15d5df62a432b55159922641e65e8d3b8c43156100da91ec34dcd22f684083",
     ["12d66570-0a15-43ca-9016-ca96b2dc5f91"]),
    ("vt", 1024, 42, 22, 22, 985,
     "e91d076196d61f078e56d22da584ca0ed7a801318bc09316035ec161f91af37d",
     ["BLSDG", "DGJHA", "CYYAP", "KYRIX", "MHJJW"]),
    ("cwe", 4096, 42, 490, None, 3976,
     "24fc54e0333fa9dc16e14e3fc9ccdd1ae69102440dcde90af3378c6e03fdb079",
     ["muscatel", "confidence", "biopsy", "border", "waiter",
      "yellowjacket", "apparel", "awareness", "disarmament", "color"]),
    ("fwe", 2048, 42, 1990, None, 1998,
     "a5536c77ddf16cd08230250000e5969d5f7f40a4f95c00a28878a323ff48b29f",
     ["wslnco", "bhkcdr", "eiauku"]),
]
# fmt: on


@pytest.mark.parametrize(
    ("task", "length", "seed", "size", "icl_size", "ntokens", "sha", "answers"),
    GENERATED,
    ids=[c[0] for c in GENERATED],
)
def test_generate_matches_ruler(task, length, seed, size, icl_size, ntokens, sha, answers):
    (s,) = generate(task, length, _Whitespace(), 1, seed, haystack_text=essay_text())
    assert s.metadata["haystack_size"] == size and s.metadata.get("icl_haystack_size") == icl_size
    assert s.length == ntokens and s.outputs == answers
    assert _sha(s.input) == sha


@pytest.mark.parametrize("growth", [lambda n: 3 * n + 7, lambda n: n + n * n // 40, lambda n: 50 + (n // 4) * 5])
@pytest.mark.parametrize(("min_size", "max_size"), [(1, None), (4, None), (10, 60), (2, 9)])
def test_fit_size_is_the_largest_size_within_budget(growth, min_size, max_size):
    """RULER keeps a size when ``tokens <= max_seq_length`` (niah.py l.249, l.269): the boundary is inclusive.
    For every budget, the harness's search returns the largest size whose prompt fits, or None."""
    for budget in range(0, growth(max_size or 150) + 5):
        hi = max_size if max_size is not None else 10**6
        fits = [n for n in range(min_size, min(hi, 400) + 1) if growth(n) <= budget]
        want = (fits[-1], growth(fits[-1])) if fits else None
        assert fit_size(lambda n: "x " * growth(n), lambda t: len(t.split()), budget, min_size, max_size) == want, (
            budget
        )
