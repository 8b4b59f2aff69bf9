"""Datasets of the local tasks, read from the jsonl files beside this file (lm-eval's `custom_dataset`)."""

from pathlib import Path

import datasets


def _load(name: str) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name(name))})


def multiple_choice(**_metadata) -> datasets.DatasetDict:
    return _load("multiple_choice.jsonl")


def generation(**_metadata) -> datasets.DatasetDict:
    return _load("generation.jsonl")
