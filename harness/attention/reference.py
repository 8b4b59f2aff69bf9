"""Readable references: every backend's pattern as an explicit boolean mask over dense softmax attention.

Shapes: q (B, Hq, L, d), k and v (B, Hkv, L, d) with Hq a multiple of Hkv (query head h reads kv head
h // (Hq/Hkv)). Masks are (B or 1, Hq or 1, L, L) booleans, True = the query (row) may see the key (column).
Memory is O(L^2): these are for tests and for `kernel="reference"`, not for long sequences.
"""

import math

import torch


def dense_attention(q, k, v, mask, scale):
    """softmax(q k^T * scale, masked) v; every row of `mask` must allow at least one key."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Query i (of the last q_len positions) sees every key up to its own position (aligned to the last key)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)[None, None]


def sliding_window_mask(length: int, window: int, device=None, queries: int | None = None) -> torch.Tensor:
    """Key j visible to query i iff i - window < j <= i: `window` keys including the query's own. `queries`: only
    the rows of the last that many positions (queries decoded on a KV cache of `length` keys)."""
    i = torch.arange(length - (length if queries is None else queries), length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return ((j <= i) & (j > i - window))[None, None]


def s2_group_size(length: int, group_ratio: float) -> int:
    """G = ceil(L * group_ratio), at least 1 (rounded first so 1/3 * 9 is 3, not 4)."""
    return max(1, math.ceil(round(length * group_ratio, 9)))


def s2_mask(length: int, heads: int, group_ratio: float, device=None) -> torch.Tensor:
    """LongLoRA S2-Attn: causal inside groups; the first ceil(H/2) heads use groups [0,G), [G,2G), ...,
    the other floor(H/2) heads use groups shifted by G//2: [0,G//2), [G//2, G//2+G), ... No wrap-around."""
    g = s2_group_size(length, group_ratio)
    shift = g // 2
    pos = torch.arange(length, device=device)
    plain = pos // g
    shifted = torch.where(pos < shift, 0, (pos - shift) // g + 1)
    masks = []
    for h in range(heads):
        group = plain if h < heads - heads // 2 else shifted
        masks.append((group[:, None] == group[None, :]) & (pos[None, :] <= pos[:, None]))
    return torch.stack(masks)[None]


def random_scores(batch: int, heads: int, chunks: int, blocks: int, call_seed: int, device=None) -> torch.Tensor:
    """The scores random-block retrieval ranks by: uniform draws from a generator seeded per forward call.
    Part of the definition of `retrieval="random"`, so every kernel draws exactly these."""
    g = torch.Generator().manual_seed(call_seed)
    return torch.rand(batch, heads, chunks, blocks, generator=g).to(device)


@torch.no_grad()
def se_attn_retrieval(q, k, v, scale, chunk_size, block_size, top_k, retrieval, per_head, call_seed=0,
                      selection="chunk"):
    """SE-Attn's retrieval, computed explicitly. Returns a bool tensor (B, Hq, T, U): chunk i retrieves block j.

    1. blocks of S tokens (the last may be shorter): summary c_j = mean over the block's rows of the non-causal
       in-block attention softmax(Q_j K_j^T * scale) V_j;
    2. relevancy R_ij = (sum of chunk i's queries) . c_j in fp32 (whatever the inputs' dtype), per query head;
       summed over heads when not per_head.
       selection="previous" ranks with the sum of chunk i-1's queries instead (chunk 0 has no candidates):
       then what a chunk retrieves depends on no token of the chunk, so no output depends on a later token.
       With the paper's "chunk", a query's blocks depend on the later queries of its chunk;
    3. candidates: blocks entirely before chunk i ((j+1)*S <= i*M); the top_k highest-scoring candidates are
       retrieved (all candidates when fewer exist). retrieval="random" ranks by `random_scores` instead,
       retrieval="none" retrieves nothing.
    """
    b, hq, length, _ = q.shape
    rep = hq // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    m, s = chunk_size, block_size
    n_chunks, n_blocks = math.ceil(length / m), math.ceil(length / s)
    summaries = []
    for j in range(n_blocks):
        sl = slice(j * s, (j + 1) * s)
        a = ((q[:, :, sl] @ k[:, :, sl].transpose(-1, -2)) * scale).softmax(-1) @ v[:, :, sl]
        summaries.append(a.float().mean(dim=2))
    summaries = torch.stack(summaries, dim=2)  # (B, Hq, U, d)
    ranked_by = [max(i - 1, 0) if selection == "previous" else i for i in range(n_chunks)]  # chunk 0: no candidates
    chunk_sums = torch.stack([q[:, :, r * m:(r + 1) * m].float().sum(dim=2) for r in ranked_by], dim=2)
    relevancy = chunk_sums @ summaries.transpose(-1, -2)  # (B, Hq, T, U)
    if not per_head:
        relevancy = relevancy.sum(dim=1, keepdim=True)
    if retrieval == "random":
        relevancy = random_scores(b, relevancy.shape[1], n_chunks, n_blocks, call_seed, q.device)
    retrieved = torch.zeros(b, relevancy.shape[1], n_chunks, n_blocks, dtype=torch.bool, device=q.device)
    if retrieval != "none":
        for i in range(n_chunks):
            candidates = [j for j in range(n_blocks) if (j + 1) * s <= i * m]
            for bi in range(b):
                for h in range(relevancy.shape[1]):
                    best = sorted(candidates, key=lambda j: -relevancy[bi, h, i, j].item())[:top_k]
                    retrieved[bi, h, i, best] = True
    return retrieved.expand(b, hq, n_chunks, n_blocks)


def se_attn_mask(retrieved: torch.Tensor, length: int, chunk_size: int, block_size: int) -> torch.Tensor:
    """Query t of chunk i sees its own chunk causally, plus every token of the blocks chunk i retrieved."""
    pos = torch.arange(length, device=retrieved.device)
    chunk_of, block_of = pos // chunk_size, pos // block_size
    own = (chunk_of[:, None] == chunk_of[None, :]) & (pos[None, :] <= pos[:, None])
    # retrieved[b, h, chunk_of[query], block_of[key]] for every (query, key) pair
    seen = retrieved[:, :, chunk_of][:, :, :, block_of]
    return own | seen
