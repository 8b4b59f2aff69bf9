"""Data layer: corpora (embedded KJV, PG-19), tokenizer, token streams and batches."""

from harness.data.corpus import Corpus, Document
from harness.data.embedded import default_corpus
from harness.data.pg19 import load_pg19
from harness.data.tokenizer import default_tokenizer, tokenizer_fingerprint, train_tokenizer
from harness.data.tokens import encode_corpus, random_windows

__all__ = [
    "Corpus",
    "Document",
    "default_corpus",
    "default_tokenizer",
    "encode_corpus",
    "load_pg19",
    "random_windows",
    "tokenizer_fingerprint",
    "train_tokenizer",
]
