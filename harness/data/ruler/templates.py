"""RULER's prompt templates, answer prefixes, generation budgets, needle/haystack strings.

Everything here is copied verbatim from NVIDIA/RULER (commit c3f5e3b, "Merge pull request #108"):

* ``scripts/data/synthetic/constants.py`` -- ``TASKS[family]``: ``tokens_to_generate``,
  ``template``, ``answer_prefix`` (reproduced in :data:`FAMILIES`).
* ``scripts/data/prepare.py`` lines 96-101 -- the prompt template actually handed to the task
  scripts is ``Templates[model_template_type].format(task_template=template) + answer_prefix``;
  the harness uses RULER's ``'base'`` model template (``"{task_template}"``,
  ``scripts/data/template.py``), so the template is ``template + answer_prefix``
  (:func:`full_template`).
* ``scripts/data/synthetic/niah.py`` -- the needle sentence, the "noise" haystack line and
  ``DEPTHS`` (also in ``variable_tracking.py``).
"""

from __future__ import annotations

import numpy as np

# scripts/data/synthetic/constants.py (TASKS), verbatim.
FAMILIES: dict[str, dict] = {
    "niah": {
        "tokens_to_generate": 128,
        "template": (
            "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
            "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
            "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
        ),
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": (
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
            "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
        ),
        "answer_prefix": (
            " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
            "variables are assigned the value {query}, they are: "
        ),
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": (
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n{context}\n"
            "Question: What are the 10 most common words in the above list?"
        ),
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": (
            "Read the following coded text and track the frequency of each coded word. Find the three "
            "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
            "Please ignore the dots '....'. What are the three most frequently appeared words in the "
            "above coded text?"
        ),
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",
    },
    "qa": {
        "tokens_to_generate": 32,
        "template": (
            "Answer the question based on the given documents. Only give me the answer and do not output "
            "any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question "
            "based on the given documents. Only give me the answer and do not output any other words."
            "\n\nQuestion: {query}"
        ),
        "answer_prefix": " Answer:",
    },
}

# scripts/data/template.py: Templates['base'] (the harness evaluates base models).
MODEL_TEMPLATE_BASE = "{task_template}"


def full_template(family: str) -> str:
    """The template a RULER task script receives (prepare.py l.96-101 with the 'base' template)."""
    cfg = FAMILIES[family]
    return MODEL_TEMPLATE_BASE.format(task_template=cfg["template"]) + cfg["answer_prefix"]


def tokens_to_generate(family: str) -> int:
    return int(FAMILIES[family]["tokens_to_generate"])


# scripts/data/synthetic/niah.py l.83: needle = "One of the special magic {type_needle_v} for {key} is: {value}."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

# scripts/data/synthetic/niah.py l.89 and variable_tracking.py l.86: the "noise" haystack line.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# scripts/data/synthetic/niah.py l.105 / variable_tracking.py l.91:
# DEPTHS = list(np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int))
DEPTHS: list[int] = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]

# scripts/data/synthetic/qa.py l.116
DOCUMENT_PROMPT = "Document {i}:\n{document}"
