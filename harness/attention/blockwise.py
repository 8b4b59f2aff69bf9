"""Efficient kernels in plain torch: SDPA calls on reshaped/gathered blocks. They run on any device (on CPU
they are the training path: FlexAttention has no CPU backward) and hand no mask to any call (only full
attention's padding mask is one): each pattern is cut into whole blocks and causal triangles, whose calls
`merge.attend_calls` runs and merges, so a kernel computes the pairs its pattern holds and the causal fast path
skips the rest.

Shapes as in reference.py; grouped kv heads are expanded here (repeat_interleave), which costs O(L*Hq*d).
"""

import math

import torch
import torch.nn.functional as F

from .merge import attend_calls, no_autocast
from .reference import random_scores, s2_group_size


def expand_kv(q, k, v):
    rep = q.shape[1] // k.shape[1]
    return (k, v) if rep == 1 else (k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1))


def _pad_to(x, length):
    """Right-pad the sequence dim (2) of x with zeros to `length`."""
    return x if x.shape[2] == length else F.pad(x, (0, 0, 0, length - x.shape[2]))


def full_sdpa(q, k, v, scale, mask=None):
    """Causal attention aligned to the last key; `mask` (bool, True = attend) is ANDed when given."""
    k, v = expand_kv(q, k, v)
    q_len, k_len = q.shape[2], k.shape[2]
    if mask is None and q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal if mask is None else causal & mask, scale=scale)


def _pieces(start, stop, rows):
    """[start, stop) in slices of at most `rows` queries, one call each (merge.attend_calls): a call's temporaries
    then stay a fraction of the full-length output and gradients. The kernels take the largest pieces that keep
    their peak below dense attention's: torch's CPU flash kernel is faster on long ones (larger query tiles)."""
    return [slice(a, min(a + rows, stop)) for a in range(start, stop, rows)]


def sliding_window(q, k, v, scale, window):
    """Query i sees keys [i - B, i], B = window - 1. In blocks of B queries, a piece [a, b) of a block sees its
    own keys causally, the previous block's [a - B, b - B) anticausally (query a + r sees keys from a - B + r) and
    all of [b - B, a) (of the previous block, or of its own block in the first one): mask-free calls merged by
    log-sum-exp (merge.py). Memory O(L * W) on the fused kernels (CPU; CUDA at fp16/bf16)."""
    k, v = expand_kv(q, k, v)
    length = q.shape[2]
    if window >= length:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if window == 1:  # each query sees only itself
        return _grouped_causal(q, k, v, scale, 1)
    size = window - 1
    rows = max(1, length // 12)  # a call holds about nine pieces: an anticausal set's 5 flipped inputs, 3 gradients
    calls = []
    for start in range(0, length, size):
        for piece in _pieces(start, min(start + size, length), rows):
            a, b = piece.start, piece.stop
            sets = [(piece, "causal")]
            if start:
                sets.append((slice(a - size, b - size), "anticausal"))
            if max(0, b - size) < a:
                sets.append((slice(max(0, b - size), a), "all"))
            calls.append((piece, sets))
    return attend_calls(q, k, v, calls, scale)


def _grouped_causal(q, k, v, scale, group):
    """Causal attention inside consecutive groups of `group` tokens (a shorter last group is right-padded;
    padded keys come after every real query, so causality hides them)."""
    b, h, n, d = q.shape
    n_groups = math.ceil(n / group)

    def split(x):
        return _pad_to(x, n_groups * group).reshape(b, h * n_groups, group, d)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True, scale=scale)
    return out.reshape(b, h, n_groups * group, d)[:, :, :n]


def s2_attn(q, k, v, scale, group_ratio):
    """First ceil(H/2) heads: groups [0,G), [G,2G), ...; others: [0,G//2) then groups of G from G//2."""
    k, v = expand_kv(q, k, v)
    hq, length = q.shape[1], q.shape[2]
    g = s2_group_size(length, group_ratio)
    shift, n_plain = g // 2, hq - hq // 2
    plain = _grouped_causal(q[:, :n_plain], k[:, :n_plain], v[:, :n_plain], scale, g)
    if n_plain == hq:
        return plain
    qs, ks, vs = q[:, n_plain:], k[:, n_plain:], v[:, n_plain:]
    parts = []
    if shift > 0:
        parts.append(F.scaled_dot_product_attention(qs[:, :, :shift], ks[:, :, :shift], vs[:, :, :shift],
                                                    is_causal=True, scale=scale))
    if shift < length:
        parts.append(_grouped_causal(qs[:, :, shift:], ks[:, :, shift:], vs[:, :, shift:], scale, g))
    return torch.cat([plain, torch.cat(parts, dim=2)], dim=1)


@torch.no_grad()
def se_attn_select(q, k, v, scale, chunk_size, block_size, top_k, retrieval, per_head, call_seed, selection="chunk"):
    """Vectorised SE-Attn retrieval. Returns (index (B, Hq, T, kk) of retrieved blocks, valid (B, Hq, T, kk)),
    kk = min(top_k, number of complete blocks). Only complete blocks can ever be candidates (a block is a
    candidate of chunk i iff it ends at or before the chunk's start, and a partial block ends at L)."""
    b, hq, length, d = q.shape
    m, s = chunk_size, block_size
    n_chunks, n_full = math.ceil(length / m), length // s
    kk = 0 if retrieval == "none" else min(top_k, n_full)
    if kk == 0:
        return None, None
    if retrieval == "random":
        heads = hq if per_head else 1
        scores = random_scores(b, heads, n_chunks, math.ceil(length / s), call_seed, q.device)[..., :n_full]
    else:
        kx, vx = expand_kv(q, k, v)
        # (B * Hq, blocks, S, d): CUDA kernels put batch and heads on grid.y and grid.z, each at most 65535, and
        # Hq * blocks is 65536 at 64K tokens, 32 heads and S = 32
        blocks = [x[:, :, :n_full * s].reshape(b * hq, n_full, s, d) for x in (q, kx, vx)]
        # relevancy in fp32 (autocast would round it to bf16 in a fine-tune, and pick other blocks than an
        # evaluation of the same weights): a sum of M fp16 queries overflows to inf (and ranks a candidate as a
        # non-candidate)
        with no_autocast(q):
            summaries = F.scaled_dot_product_attention(*blocks, scale=scale).float().mean(dim=2)
            chunk_sums = _pad_to(q, n_chunks * m).float().reshape(b, hq, n_chunks, m, d).sum(dim=3)
            if selection == "previous":  # chunk i ranks with chunk i-1's queries (chunk 0 has no candidates)
                chunk_sums = torch.cat([chunk_sums[:, :, :1], chunk_sums[:, :, :-1]], dim=2)
            scores = chunk_sums @ summaries.reshape(b, hq, n_full, d).transpose(-1, -2)  # (B, Hq, T, U_full)
        if not per_head:
            scores = scores.sum(dim=1, keepdim=True)
    chunk_start = torch.arange(n_chunks, device=q.device)[:, None] * m
    block_end = (torch.arange(n_full, device=q.device)[None, :] + 1) * s
    candidate = block_end <= chunk_start  # (T, U_full)
    # every candidate ranks above every non-candidate (se_attn reads a chunk's valid blocks as its first ones)
    scores = scores.float().nan_to_num(nan=0.0).clamp(-3e38, 3e38).masked_fill(~candidate, float("-inf"))
    index = scores.topk(kk, dim=-1).indices  # (B, H, T, kk)
    valid = candidate.expand(*scores.shape).gather(-1, index)
    return index.expand(b, hq, n_chunks, kk), valid.expand(b, hq, n_chunks, kk)


def valid_counts(length: int, chunk_size: int, block_size: int, kk: int) -> list[int]:
    """How many of its `kk` selected blocks each chunk may read: its complete blocks before it, at most kk. Chunk
    i's valid blocks are its first ones (`se_attn_select` ranks every candidate above the -inf of the rest), and
    how many depends on i alone, so it is counted here, on the host, not read back from the device (a sync)."""
    return [min(kk, i * chunk_size // block_size) for i in range(math.ceil(length / chunk_size))]


def se_attn(q, k, v, scale, chunk_size, block_size, top_k, retrieval, per_head, call_seed=0, selection="chunk"):
    """Select blocks (`se_attn_select`), then per piece of a chunk mask-free calls of the piece on itself (causal),
    on the chunk's keys before it and on the chunk's gathered blocks (all visible), merged by log-sum-exp.
    Memory O(L * (top_k*S + M))."""
    length = q.shape[2]
    k, v = expand_kv(q, k, v)
    s = block_size
    m = min(chunk_size, length)  # a chunk longer than the sequence is the whole sequence
    index, _ = se_attn_select(q, k, v, scale, m, s, top_k, retrieval, per_head, call_seed, selection)
    counts = valid_counts(length, m, s, 0 if index is None else index.shape[-1])
    offsets = torch.arange(s, device=q.device)
    rows = max(1, length // 5)  # a call holds about four pieces: a set's 3 gradients, the kernel's own copy
    calls = []
    for i, count in enumerate(counts):
        chunk = i * m
        for piece in _pieces(chunk, min(chunk + m, length), rows):
            sets = [(piece, "causal")]
            if piece.start > chunk:  # the chunk's keys before the piece
                sets.append((slice(chunk, piece.start), "all"))
            if count:  # the positions of its blocks, (B, H, count * S)
                sets.append(((index[:, :, i, :count, None] * s + offsets).flatten(2), "all"))
            calls.append((piece, sets))
    return attend_calls(q, k, v, calls, scale)
