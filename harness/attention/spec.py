"""What an attention backend is. Each backend is one `Spec` in `backends/`, the only code that knows its name.

A Spec holds what the backend computes (description), its options (defaults, allowed ranges, validation),
its readable reference as a boolean mask, how many query-key pairs that mask holds (what an exact kernel must
compute at least; the efficiency report's limit), the kernels that run it and which to prefer, any per-call
choice (se_attn draws a chunk size), and what other modules derive from it: the fine-tuning learning rate and
the shortest training context its options fit.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UserError


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    defaults: dict  # option -> default (beyond the common `kernel` and `fallback`)
    allowed: dict  # option -> its allowed range, in words (errors and `harness list` show it)
    validate: Callable[[dict], dict]  # complete options -> normalised options; raises UserError (see `bad`)
    mask: Callable  # (q, k, v, scale, opts, plan) -> bool (B|1, Hq|1, L, L), True = may attend
    pairs: Callable[[dict, int, int], float]  # (opts, length, heads) -> True entries of the mask over the heads
    # of one sequence (a mean over the chunk sizes that training draws from, for se_attn)
    kernels: dict  # kernel name -> fn(q, k, v, scale, opts, plan, mask); mask is None unless padding_mask
    auto: tuple  # kernel preference on CUDA; the last entry runs everywhere
    lr: float = 2e-4  # the paper's fine-tuning learning rate with this backend
    plan: Callable | None = None  # (opts, call_seed, training) -> per-call choices passed to mask and kernels
    min_context: Callable[[dict], int] = lambda opts: 1  # shortest training context the options fit
    padding_mask: bool = False  # whether a padding mask is allowed at prefill/training
    # (q_len, k_len, opts, device) -> bool (Lq, Lk), True = may attend: the keys that queries decoded on a KV cache
    # (the last q_len positions) see under the pattern; None: every earlier key, full attention (a pattern whose
    # queries depend on later ones, as SE-Attn's chunk retrieval and S²-Attn's groups do, has no rule per token)
    decode_mask: Callable | None = None
    aliases: dict = field(default_factory=dict)  # alias name -> the options it fixes
    capabilities: dict = field(default_factory=dict)


def triangle(n: int) -> int:
    """Query-key pairs of causal attention over n tokens."""
    return n * (n + 1) // 2


# Seeds end here: torch's generators raise at 2**64 and above, and take a negative seed for its 2**64 complement,
# so [0, SEED_END) is where each seed is its own generator.
SEED_END = 2**63


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def bad(spec: Spec, option: str, value) -> UserError:
    return UserError(f"attention backend {spec.name!r}: option {option}={value!r} is invalid; "
                     f"allowed: {spec.allowed[option]}")
