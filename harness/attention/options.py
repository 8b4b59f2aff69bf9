"""The backends' names, options (their names are API), defaults, allowed ranges and capabilities.

`resolve(name, options)` validates user input and returns (canonical backend name, full option dict);
every mistake is a UserError that names the option and its allowed range.
"""

import difflib
from dataclasses import dataclass, field

from ..errors import UserError

KERNEL_CHOICES = ("auto", "reference", "sdpa", "blockwise", "flash", "flex")
RETRIEVALS = ("relevancy", "random", "none")


@dataclass(frozen=True)
class Spec:
    description: str
    defaults: dict
    kernels: tuple  # kernel names this backend can run, besides "auto" and "reference"
    capabilities: dict = field(default_factory=dict)


_COMMON = {"kernel": "auto", "fallback": False}

SPECS = {
    "full": Spec(
        "causal softmax attention over every previous token",
        {},
        ("sdpa", "flash"),
    ),
    "sliding_window": Spec(
        "each query sees the `window` most recent keys INCLUDING itself "
        "(key j visible to query i iff i-window < j <= i)",
        {"window": 4096},
        ("blockwise", "flash", "flex"),
    ),
    "s2_attn": Spec(
        "LongLoRA shifted sparse attention: group size G = ceil(L*group_ratio); the first ceil(H/2) query heads attend "
        "causally inside [0,G), [G,2G), ...; the others inside [0,G//2), [G//2, G//2+G), ... (no wrap-around); "
        "a length not divisible by G leaves a shorter last group (equivalent to right-padding)",
        {"group_ratio": 0.25},
        ("blockwise", "flash"),
    ),
    "se_attn": Spec(
        "SE-Attn (Expansion Span paper, sec. 3.3): chunks of `chunk_size` attend causally to themselves plus the "
        "`top_k` memory blocks of `block_size` tokens (entirely before the chunk) most relevant to them",
        # Paper defaults (Mamba-2-Hybrid at 8192). per_head=True is the default: applying the paper's
        # single-head definition to every head independently, as multi-head attention does with everything
        # else; summing relevancy over heads (per_head=False) mixes scores from unrelated subspaces. With
        # grouped kv heads, "per head" means per QUERY head: head h ranks blocks with its own queries and
        # summaries (its queries against kv head h // (Hq/Hkv)) and gathers those blocks from that kv head.
        {"chunk_size": (2048, 4096), "block_size": 32, "top_k": 8, "retrieval": "relevancy", "per_head": True,
         "seed": 0},
        ("blockwise", "flex"),
    ),
}
for _spec in SPECS.values():
    _spec.capabilities.update({
        "training": True, "prefill": True,
        "decode": "q_len < k_len (KV cache): full causal attention aligned to the last key, reported '(decode)'",
        "gqa": True, "padding_mask": "decode only; a padding mask at prefill is an error (except for full)",
    })
SPECS["s2_attn"].capabilities["evaluation"] = "LongLoRA evaluates with full attention; pick `full` for eval"

# Named variants: the paper's ablations, spelled as backends (options fixed on top of se_attn's).
ALIASES = {
    "se_attn_nomem": ("se_attn", {"retrieval": "none"}),
    "se_attn_random": ("se_attn", {"retrieval": "random"}),
}

ALLOWED = {
    "window": "int >= 1 (keys per query, including the query's own key)",
    "group_ratio": "float in (0, 1]",
    "chunk_size": "int >= 1, or a non-empty list/tuple/set of them (drawn per forward call in training; the "
                  "largest is used in eval)",
    "block_size": "int >= 1 and <= the smallest chunk_size",
    "top_k": "int >= 0 (0 retrieves nothing)",
    "retrieval": f"one of {list(RETRIEVALS)}",
    "per_head": "bool (True: each query head retrieves its own blocks; False: one selection shared by all heads)",
    "seed": "int (seeds chunk-size draws and random retrieval)",
    "kernel": f"one of {list(KERNEL_CHOICES)} that the backend supports",
    "fallback": "bool (True lets an unavailable requested kernel fall back to the automatic choice)",
}


def names() -> list[str]:
    return [*SPECS, *ALIASES]


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _bad(backend: str, option: str, value) -> UserError:
    return UserError(f"attention backend {backend!r}: option {option}={value!r} is invalid; allowed: {ALLOWED[option]}")


def resolve(name: str, options: dict) -> tuple[str, dict]:
    """Validate `options` for backend `name`; return (canonical name, complete options with defaults filled in)."""
    if name not in SPECS and name not in ALIASES:
        raise UserError(f"unknown attention backend {name!r}; available: {', '.join(names())}."
                        + _did_you_mean(name, names()))
    fixed = {}
    if name in ALIASES:
        name, fixed = ALIASES[name]
    spec = SPECS[name]
    known = {**_COMMON, **spec.defaults}
    for key in options:
        if key not in known:
            raise UserError(f"attention backend {name!r} has no option {key!r}; its options: "
                            f"{', '.join(known)}." + _did_you_mean(key, known))
    for key, value in fixed.items():
        if key in options and options[key] != value:
            raise UserError(f"attention backend alias fixes {key}={value!r}; got {key}={options[key]!r}")
    opts = {**known, **options, **fixed}

    if opts["kernel"] not in ("auto", "reference", *spec.kernels):
        raise UserError(f"attention backend {name!r}: option kernel={opts['kernel']!r} is invalid; allowed: "
                        f"{['auto', 'reference', *spec.kernels]}")
    if not isinstance(opts["fallback"], bool):
        raise _bad(name, "fallback", opts["fallback"])
    if name == "sliding_window" and not (_is_int(opts["window"]) and opts["window"] >= 1):
        raise _bad(name, "window", opts["window"])
    if name == "s2_attn":
        r = opts["group_ratio"]
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r <= 1:
            raise _bad(name, "group_ratio", r)
        opts["group_ratio"] = float(r)
    if name == "se_attn":
        cs = opts["chunk_size"]
        sizes = [cs] if _is_int(cs) else list(cs) if isinstance(cs, list | tuple | set | frozenset) else None
        if not sizes or not all(_is_int(m) and m >= 1 for m in sizes):
            raise _bad(name, "chunk_size", cs)
        opts["chunk_size"] = sizes[0] if len(set(sizes)) == 1 else tuple(sorted(set(sizes)))
        s = opts["block_size"]
        if not (_is_int(s) and 1 <= s <= min(sizes)):
            raise _bad(name, "block_size", s)
        if not (_is_int(opts["top_k"]) and opts["top_k"] >= 0):
            raise _bad(name, "top_k", opts["top_k"])
        if opts["retrieval"] not in RETRIEVALS:
            raise UserError(f"attention backend {name!r}: option retrieval={opts['retrieval']!r} is invalid; "
                            f"allowed: {ALLOWED['retrieval']}." + _did_you_mean(str(opts["retrieval"]), RETRIEVALS))
        if not isinstance(opts["per_head"], bool):
            raise _bad(name, "per_head", opts["per_head"])
        if not _is_int(opts["seed"]):
            raise _bad(name, "seed", opts["seed"])
    return name, opts
