"""Question answering (qa_1: SQuAD, qa_2: HotpotQA), after NVIDIA/RULER ``scripts/data/synthetic/qa.py``.

Opt-in: the data files are not shipped and cannot be downloaded here. RULER downloads them with
``scripts/data/synthetic/json/download_qa_dataset.sh``:

* qa_1: SQuAD 2.0 dev, ``https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json``
  (``{"data": [{"paragraphs": [{"context", "qas": [{"question", "answers": [{"text"}],
  "is_impossible"}]}]}]}``);
* qa_2: HotpotQA dev distractor, ``hotpot_dev_distractor_v1.json`` (a list of
  ``{"question", "answer", "context": [[title, [sentence, ...]], ...]}``).

Pass the file as ``generate(..., qa_file=path)``.

* :func:`read_squad` / :func:`read_hotpotqa` = qa.py l.73-113 (documents deduplicated and
  sorted; SQuAD keeps answerable questions and the article's other paragraphs as
  ``more_context``).
* :func:`build` = ``generate_input_output(index, num_docs)`` (l.125-150): the gold documents,
  then the article's other paragraphs, then random other documents up to ``num_docs``; from
  ``num_docs`` = the number of documents on, all of them repeated and cut to ``num_docs``, as
  RULER does since its commit b6cde3e; shuffled by a fresh ``random.Random(seed)``;
  ``"Document {i}:\\n{document}"`` joined by ``"\\n\\n"``. Sample ``i`` asks question ``i`` (RULER:
  ``index + pre_samples``), in file order.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from random import Random

from harness.data.ruler import templates
from harness.errors import UserError

FORMATS = {
    "squad": "SQuAD 2.0 dev JSON (dev-v2.0.json: {'data': [{'paragraphs': [{'context', 'qas': [...]}]}]})",
    "hotpotqa": "HotpotQA dev distractor JSON (hotpot_dev_distractor_v1.json: [{'question', 'answer', 'context'}])",
}


def _load_json(path: Path, dataset: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {dataset} file {str(path)!r} ({e}); expected {FORMATS[dataset]}") from e


def read_squad(data: dict):
    total_docs = [p["context"] for d in data["data"] for p in d["paragraphs"]]
    total_docs = sorted(set(total_docs))
    idx = {c: i for i, c in enumerate(total_docs)}
    qas = []
    for d in data["data"]:
        more_docs = [idx[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            for q in p["qas"]:
                if not q["is_impossible"]:
                    qas.append(
                        {
                            "query": q["question"],
                            "outputs": [a["text"] for a in q["answers"]],
                            "context": [idx[p["context"]]],
                            "more_context": [i for i in more_docs if i != idx[p["context"]]],
                        }
                    )
    return qas, total_docs


def read_hotpotqa(data: list):
    total_docs = [f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]]
    total_docs = sorted(set(total_docs))
    idx = {c: i for i, c in enumerate(total_docs)}
    qas = []
    for d in data:
        qas.append(
            {
                "query": d["question"],
                "outputs": [d["answer"]],
                "context": [idx[f"{t}\n{''.join(p)}"] for t, p in d["context"]],
            }
        )
    return qas, total_docs


@functools.lru_cache(maxsize=4)
def load(dataset: str, path: str, mtime_ns: int):
    p = Path(path)
    data = _load_json(p, dataset)
    try:
        return read_squad(data) if dataset == "squad" else read_hotpotqa(data)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{dataset} file {path!r} has an unexpected layout ({e!r}); expected {FORMATS[dataset]}") from e


def load_file(dataset: str, task: str, qa_file) -> tuple[list, list]:
    if qa_file is None:
        raise UserError(
            f"RULER task {task!r} needs a local {dataset} file: pass qa_file=PATH with the {FORMATS[dataset]} "
            "(RULER downloads it with scripts/data/synthetic/json/download_qa_dataset.sh)"
        )
    p = Path(qa_file)
    if not p.is_file():
        raise UserError(f"RULER task {task!r}: {dataset} file {str(p)!r} not found; expected {FORMATS[dataset]}")
    return load(dataset, str(p), p.stat().st_mtime_ns)


def min_size(qa: dict) -> int:
    return len(qa["context"])


def build(qa: dict, docs: list[str], num_docs: int, rng: Random, run_seed: int):
    curr_docs = qa["context"]
    curr_more = qa.get("more_context", [])
    if num_docs < len(docs):
        if (num_docs - len(curr_docs)) > len(curr_more):
            excluded = set(curr_docs + curr_more)
            addition = [i for i in range(len(docs)) if i not in excluded]
            all_docs = curr_docs + curr_more + rng.sample(addition, max(0, num_docs - len(curr_docs) - len(curr_more)))
        else:
            all_docs = curr_docs + rng.sample(curr_more, num_docs - len(curr_docs))
        all_docs = [docs[i] for i in all_docs]
    else:
        repeats = (num_docs + len(docs) - 1) // len(docs)
        all_docs = (docs * repeats)[:num_docs]
    Random(run_seed).shuffle(all_docs)
    context = "\n\n".join(templates.DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(all_docs))
    prompt = templates.full_template("qa").format(context=context, query=qa["query"])
    return prompt, list(qa["outputs"]), {"num_docs": num_docs}
