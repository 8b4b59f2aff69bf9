"""Corpus containers shared by every data source (embedded KJV, PG-19, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.errors import UserError


@dataclass(frozen=True)
class Document:
    """One long document (a biblical book, a PG-19 book)."""

    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """Named splits of documents, disjoint by document.

    ``fingerprint`` identifies the exact content (data hash plus split rule) and is what
    caches key on; ``source`` is a human-readable description for reports; ``embedded`` is
    True when the data ships inside an installed package (no path or network needed).
    """

    name: str
    splits: dict[str, list[Document]]
    source: str
    fingerprint: str
    embedded: bool = False
    meta: dict = field(default_factory=dict, compare=False)

    def split(self, name: str) -> list[Document]:
        try:
            return self.splits[name]
        except KeyError:
            have = ", ".join(sorted(self.splits)) or "none"
            raise UserError(f"corpus {self.name!r} has no split {name!r}; choose one of: {have}") from None

    def num_chars(self, split: str | None = None) -> int:
        names = [split] if split is not None else list(self.splits)
        return sum(len(d.text) for n in names for d in self.split(n))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"Corpus({self.name!r}, {sizes}, fingerprint={self.fingerprint!r})"
