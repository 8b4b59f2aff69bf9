"""Attention backends: full, sliding_window, s2_attn, se_attn (+ the se_attn_nomem / se_attn_random ablations).

    attend(q, k, v, backend="se_attn", chunk_size=64, block_size=8, top_k=2)   # tensors, (B, H, L, d)
    name = register("se_attn", chunk_size=[2048, 4096])                       # a transformers attn_implementation
    with recording() as kernels: model(ids)                                    # {"se_attn via blockwise"}
    available()                                                               # backends, options, kernels

Options are validated (UserError naming the option and its allowed range); each backend is one
Spec in backends/ (its definition, options, reference mask and kernels); reference.py holds the masks.
"""

from functools import lru_cache

import torch

from .backend import Backend
from .backends import SPECS
from .hf import implementation_name, register, registered_backend
from .options import ALIASES, COMMON, COMMON_ALLOWED, resolve
from .recording import kernel_log, recording

__all__ = ["Backend", "attend", "available", "decodes_with_full_attention", "implementation_name", "kernel_log",
           "recording", "register", "registered_backend"]


def decodes_with_full_attention(name: str) -> bool:
    """Whether backend `name` (or an alias) decodes on a KV cache with full attention over every cached key, having
    no rule of its own for one query at a time (Spec.decode_mask); False for names it does not know."""
    target = ALIASES[name][0] if name in ALIASES else name
    return target in SPECS and SPECS[target].decode_mask is None


def available() -> dict:
    """{backend: {description, options: {name: {default, allowed}}, kernels, capabilities}} (aliases included)."""
    out = {}
    for name, spec in SPECS.items():
        allowed = {**spec.allowed, **COMMON_ALLOWED}
        out[name] = {
            "description": spec.description,
            "options": {k: {"default": v, "allowed": allowed[k]} for k, v in {**spec.defaults, **COMMON}.items()},
            "kernels": ["auto", "reference", *spec.kernels],
            "capabilities": {
                "training": True, "prefill": True, "gqa": True,
                "decode": "q_len < k_len (KV cache): full causal attention aligned to the last key, "
                          "reported 'full via sdpa (decode)'",
                "padding_mask": True if spec.padding_mask else "decode only; a padding mask at prefill is an error",
                **spec.capabilities},
        }
    for alias, (target, fixed) in ALIASES.items():
        options = {k: {**v, "default": fixed.get(k, v["default"])} for k, v in out[target]["options"].items()}
        out[alias] = {**out[target], "description": f"{target} with {fixed}", "options": options}
    return out


@lru_cache(maxsize=64)
def _backend(name: str, frozen_options: tuple) -> Backend:
    return Backend(name, **dict(frozen_options))


def _freeze(value):
    return tuple(sorted(value)) if isinstance(value, list | set | frozenset) else value


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "full", *, scale: float | None = None,
           training: bool = False, return_kernel: bool = False, **options):
    """Causal attention output (B, Hq, L, d) of `backend` for q (B, Hq, L, d), k/v (B, Hkv, L, d) (positions
    already encoded). Lq < Lk means decoding on a cache: full attention aligned to the last key.
    `training=True` draws se_attn's chunk size from `chunk_size` (seeded by `seed`, advancing per call of
    the same backend+options); eval uses the largest. `return_kernel=True` returns (out, kernel string)."""
    resolve(backend, options)  # validate before caching
    impl = _backend(backend, tuple(sorted((k_, _freeze(v_)) for k_, v_ in options.items())))
    out, kernel = impl(q, k, v, scale=scale, training=training)
    return (out, kernel) if return_kernel else out
