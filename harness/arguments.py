"""Argument types for the CLI: each parses and range-checks one argument up front, so a bad value is one line
naming the argument (argparse adds the usage and exits 2), never a traceback from deep inside a run."""

from __future__ import annotations

import argparse
from pathlib import Path


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} must be >= {least}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of distinct integers >= 1, e.g. '1024,4096'."""
    items = text.split(",")
    if any(not item.strip() for item in items):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers without empty items, e.g. 1024,4096")
    values = [positive_int(item.strip()) for item in items]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a value")
    return values


def backend_names(text: str) -> list[str]:
    """A comma-separated list of distinct attention backend names."""
    from harness.attention.options import resolve
    from harness.errors import UserError

    names = [n.strip() for n in text.split(",")]
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a backend")
    for name in names:
        try:
            resolve(name, {})
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


def directory(text: str) -> str:
    """A directory to write into: it may not exist yet, but it may not be a file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a directory (it is created if missing)")
    return text


def new_file_in_existing_directory(text: str) -> str:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"directory {path.parent} does not exist; create it first")
    return text


def existing_directory(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no directory {text}")
    return text
