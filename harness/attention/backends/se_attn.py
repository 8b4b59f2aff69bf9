"""SE-Attn (Expansion Span paper, sec. 3.3) and its ablations: no retrieval, random blocks."""

import torch

from .. import blockwise, gpu
from ..reference import se_attn_mask, se_attn_retrieval
from ..spec import SEED_END, Spec, bad, is_int, triangle

RETRIEVALS = ("relevancy", "random", "none")
SELECTIONS = ("chunk", "previous")


def _sizes(opts: dict) -> tuple:
    cs = opts["chunk_size"]
    return (cs,) if is_int(cs) else tuple(cs)


def _check(opts: dict) -> dict:
    cs = opts["chunk_size"]
    sizes = [cs] if is_int(cs) else list(cs) if isinstance(cs, list | tuple | set | frozenset) else None
    if not sizes or not all(is_int(m) and m >= 1 for m in sizes):
        raise bad(SPEC, "chunk_size", cs)
    s = opts["block_size"]
    if not (is_int(s) and 1 <= s <= min(sizes)):
        raise bad(SPEC, "block_size", s)
    if not (is_int(opts["top_k"]) and opts["top_k"] >= 0):
        raise bad(SPEC, "top_k", opts["top_k"])
    for option, ok in (("retrieval", opts["retrieval"] in RETRIEVALS), ("per_head", isinstance(opts["per_head"], bool)),
                       ("seed", is_int(opts["seed"]) and 0 <= opts["seed"] < SEED_END),
                       ("selection", opts["selection"] in SELECTIONS)):
        if not ok:
            raise bad(SPEC, option, opts[option])
    return {**opts, "chunk_size": sizes[0] if len(set(sizes)) == 1 else tuple(sorted(set(sizes)))}


def _plan(opts: dict, call_seed: int, training: bool) -> dict:
    """Eval: the largest chunk size and the `seed` option; training: a chunk size drawn with the call's seed."""
    sizes = _sizes(opts)
    if not training:
        return {"chunk_size": max(sizes), "call_seed": opts["seed"]}
    pick = torch.Generator().manual_seed(call_seed)
    return {"chunk_size": sizes[int(torch.randint(0, len(sizes), (), generator=pick))], "call_seed": call_seed}


def _mask(q, k, v, scale, opts, plan):
    retrieved = se_attn_retrieval(q, k, v, scale, plan["chunk_size"], opts["block_size"], opts["top_k"],
                                  opts["retrieval"], opts["per_head"], plan["call_seed"], opts["selection"])
    return se_attn_mask(retrieved, q.shape[2], plan["chunk_size"], opts["block_size"])


def _pairs(opts: dict, length: int, heads: int) -> float:
    """Chunk i (r tokens from i*M) sees itself causally and r x S keys per retrieved block: min(top_k, the
    complete blocks before it), none with retrieval "none"."""
    s = opts["block_size"]
    top_k = 0 if opts["retrieval"] == "none" else opts["top_k"]

    def one(m: int) -> int:
        total, m = 0, min(m, length)
        for start in range(0, length, m):
            r = min(m, length - start)
            total += triangle(r) + r * s * min(top_k, start // s)
        return total

    sizes = _sizes(opts)
    return heads * sum(one(m) for m in sizes) / len(sizes)


def _kernel(fn):
    def run(q, k, v, scale, opts, plan, mask):
        return fn(q, k, v, scale, plan["chunk_size"], opts["block_size"], opts["top_k"], opts["retrieval"],
                  opts["per_head"], plan["call_seed"], opts["selection"])
    return run


SPEC = Spec(
    name="se_attn",
    description="SE-Attn (Expansion Span paper, sec. 3.3): chunks of `chunk_size` attend causally to themselves plus "
                "the `top_k` memory blocks of `block_size` tokens (entirely before the chunk) most relevant to them",
    # Paper defaults (Mamba-2-Hybrid at 8192). per_head=True is the default: applying the paper's
    # single-head definition to every head independently, as multi-head attention does with everything
    # else; summing relevancy over heads (per_head=False) mixes scores from unrelated subspaces. With
    # grouped kv heads, "per head" means per QUERY head: head h ranks blocks with its own queries and
    # summaries (its queries against kv head h // (Hq/Hkv)) and gathers those blocks from that kv head.
    # selection="chunk" is the paper's: a chunk's blocks are ranked with the sum of all its queries, so the
    # blocks an early query of the chunk sees depend on the chunk's later tokens (a non-causal dependence: at
    # evaluation with the fine-tuning attention, perplexity is then not a strictly causal score).
    # "previous" ranks with the previous chunk's queries: causal.
    defaults={"chunk_size": (2048, 4096), "block_size": 32, "top_k": 8, "retrieval": "relevancy", "per_head": True,
              "seed": 0, "selection": "chunk"},
    allowed={
        "chunk_size": "int >= 1, or a non-empty list/tuple/set of them (drawn per forward call in training; the "
                      "largest is used in eval)",
        "block_size": "int >= 1 and <= the smallest chunk_size",
        "top_k": "int >= 0 (0 retrieves nothing)",
        "retrieval": f"one of {list(RETRIEVALS)}",
        "per_head": "bool (True: each query head retrieves its own blocks; False: one selection shared by all heads)",
        "seed": "int in [0, 2**63) (seeds chunk-size draws and random retrieval)",
        "selection": f"one of {list(SELECTIONS)} (chunk: the paper's, ranked by the chunk's own queries, which "
                     "makes early queries depend on later ones; previous: ranked by the previous chunk's, causal)",
    },
    validate=_check,
    mask=_mask,
    pairs=_pairs,
    kernels={"blockwise": _kernel(blockwise.se_attn), "flex": _kernel(gpu.se_attn_flex)},
    auto=("blockwise",),  # flex is opt-in for se_attn: it rebuilds a block mask every call
    plan=_plan,
    min_context=lambda opts: max(_sizes(opts)),  # a chunk longer than the training context never trains
    # The paper's ablations, spelled as backends.
    aliases={"se_attn_nomem": {"retrieval": "none"}, "se_attn_random": {"retrieval": "random"}},
)
