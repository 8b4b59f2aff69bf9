"""Backend names and options as users write them: `resolve(name, options)` validates them against the
backend's Spec (backends/) and returns (canonical backend name, complete options with defaults filled in).
Every mistake is a UserError that names the option and its allowed range.
"""

import difflib

from ..errors import UserError
from .backends import SPECS
from .spec import Spec

KERNEL_CHOICES = ("auto", "reference", "sdpa", "blockwise", "flash", "flex")
COMMON = {"kernel": "auto", "fallback": False}
COMMON_ALLOWED = {
    "kernel": f"one of {list(KERNEL_CHOICES)} that the backend supports",
    "fallback": "bool (True lets an unavailable requested kernel fall back to the automatic choice)",
}
ALIASES: dict[str, tuple[str, dict]] = {alias: (spec.name, fixed) for spec in SPECS.values()
                                        for alias, fixed in spec.aliases.items()}


def names() -> list[str]:
    return [*SPECS, *ALIASES]


def spec(name: str) -> Spec:
    """The Spec of a backend or alias name."""
    return SPECS[ALIASES[name][0] if name in ALIASES else name]


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def resolve(name: str, options: dict) -> tuple[str, dict]:
    """Validate `options` for backend `name`; return (canonical name, complete options with defaults filled in)."""
    if name not in SPECS and name not in ALIASES:
        raise UserError(f"unknown attention backend {name!r}; available: {', '.join(names())}."
                        + _did_you_mean(name, names()))
    fixed = {}
    if name in ALIASES:
        name, fixed = ALIASES[name]
    s = SPECS[name]
    known = {**COMMON, **s.defaults}
    for key in options:
        if key not in known:
            raise UserError(f"attention backend {name!r} has no option {key!r}; its options: "
                            f"{', '.join(known)}." + _did_you_mean(key, known))
    for key, value in fixed.items():
        if key in options and options[key] != value:
            raise UserError(f"attention backend alias fixes {key}={value!r}; got {key}={options[key]!r}")
    opts = {**known, **options, **fixed}
    if opts["kernel"] not in ("auto", "reference", *s.kernels):
        raise UserError(f"attention backend {name!r}: option kernel={opts['kernel']!r} is invalid; allowed: "
                        f"{['auto', 'reference', *s.kernels]}")
    if not isinstance(opts["fallback"], bool):
        raise UserError(f"attention backend {name!r}: option fallback={opts['fallback']!r} is invalid; allowed: "
                        f"{COMMON_ALLOWED['fallback']}")
    return name, s.validate(opts)
