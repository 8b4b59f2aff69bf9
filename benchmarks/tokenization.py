"""Tokenization of a file source into a memory-mapped stream: throughput and peak memory.

    python benchmarks/tokenization.py [--books DIR] [--source pg19|text] [--repeats N]

Lays the books of DIR (default: the shared PG-19 test split, $HARNESS_PG19_DIR/test) out as the train split of a
PG-19 copy in a scratch directory (symbolic links), tokenizes it with the default tokenizer into a fresh cache
each repeat, and prints MB/s (UTF-8 bytes of the books per second, median of the repeats) and the peak resident
memory of the process before and after tokenizing (the rest of the process: torch, transformers, the tokenizer).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness.data import default_tokenizer
from harness.data.sources import Source, open_source
from harness.data.tokens import token_stream


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "pg19"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--books", type=Path, default=Path(os.environ.get("HARNESS_PG19_DIR", shared)) / "test")
    parser.add_argument("--source", choices=("pg19", "text"), default="pg19")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    books = sorted(args.books.glob("*.txt"))
    if not books:
        sys.exit(f"no .txt books in {args.books}; pass --books DIR or set HARNESS_PG19_DIR")
    size = sum(b.stat().st_size for b in books)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "pg19"
        (root / "train").mkdir(parents=True)
        for b in books:
            (root / "train" / b.name).symlink_to(b.resolve())
        os.environ["HARNESS_CACHE"] = str(Path(scratch) / "cache")
        tok = default_tokenizer()  # trained into the scratch cache once (not timed)
        before = peak_rss_gib()
        src = (Source(source="pg19", path=str(root), split="train") if args.source == "pg19"
               else Source(source="text", path=str(root / "train")))
        seconds, tokens = [], 0
        for i in range(args.repeats):
            os.environ["HARNESS_CACHE"] = str(Path(scratch) / f"cache-{i}")  # a cold stream every repeat
            t0 = time.perf_counter()
            tokens = len(token_stream(tok, open_source(src, "data.train")))
            seconds.append(time.perf_counter() - t0)
        after = peak_rss_gib()
    median = statistics.median(seconds)
    print(f"{len(books)} books, {size / 1e6:.1f} MB -> {tokens:,} tokens "
          f"({args.source} source, {os.cpu_count()} cores)")
    print(f"  {size / 1e6 / median:.2f} MB/s (median of {args.repeats}: "
          f"{', '.join(f'{s:.1f}' for s in seconds)} s), {tokens / median / 1e6:.2f} M tokens/s")
    print(f"  peak RSS: {before:.2f} GiB before tokenizing, {after:.2f} GiB after")


if __name__ == "__main__":
    main()
