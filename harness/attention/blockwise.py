"""Efficient kernels in plain torch: SDPA calls on reshaped/gathered blocks. They run on any device (on CPU
they are the training path: FlexAttention has no CPU backward) and never build an L x L mask.

Shapes as in reference.py; grouped kv heads are expanded here (repeat_interleave), which costs O(L*Hq*d).
"""

import math

import torch
import torch.nn.functional as F

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


def sliding_window(q, k, v, scale, window, query_block=None):
    """Query blocks of B rows attend to the W-1+B keys that can reach them, masked to i-W < j <= i.
    Memory O(L*(W+B)); B defaults to min(W, 512) (at least 16)."""
    k, v = expand_kv(q, k, v)
    length = q.shape[2]
    if window >= length:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    bq = query_block or max(16, min(window, 512))
    outs = []
    for s in range(0, length, bq):
        e = min(length, s + bq)
        ks = max(0, s - window + 1)
        i = torch.arange(s, e, device=q.device)[:, None]
        j = torch.arange(ks, e, device=q.device)[None, :]
        mask = (j <= i) & (j > i - window)
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, ks:e], v[:, :, ks:e], attn_mask=mask,
                                                   scale=scale))
    return torch.cat(outs, dim=2)


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
        blocks = [x[:, :, :n_full * s].reshape(b, hq * n_full, s, d) for x in (q, kx, vx)]
        summaries = F.scaled_dot_product_attention(*blocks, scale=scale).mean(dim=2).reshape(b, hq, n_full, d)
        chunk_sums = _pad_to(q, n_chunks * m).reshape(b, hq, n_chunks, m, d).sum(dim=3)
        if selection == "previous":  # chunk i ranks with chunk i-1's queries (chunk 0 has no candidates)
            chunk_sums = torch.cat([chunk_sums[:, :, :1], chunk_sums[:, :, :-1]], dim=2)
        scores = chunk_sums @ summaries.transpose(-1, -2)  # (B, Hq, T, U_full)
        if not per_head:
            scores = scores.sum(dim=1, keepdim=True)
    chunk_start = torch.arange(n_chunks, device=q.device)[:, None] * m
    block_end = (torch.arange(n_full, device=q.device)[None, :] + 1) * s
    candidate = block_end <= chunk_start  # (T, U_full)
    scores = scores.float().masked_fill(~candidate, float("-inf"))
    index = scores.topk(kk, dim=-1).indices  # (B, H, T, kk)
    valid = candidate.expand(*scores.shape).gather(-1, index)
    return index.expand(b, hq, n_chunks, kk), valid.expand(b, hq, n_chunks, kk)


def se_attn(q, k, v, scale, chunk_size, block_size, top_k, retrieval, per_head, call_seed=0, selection="chunk"):
    """Select blocks, gather them per chunk, then one SDPA call over all chunks with keys
    [retrieved blocks (all visible) ; own chunk (causal)]. Memory O(L * (top_k*S + M))."""
    b, hq, length, d = q.shape
    k, v = expand_kv(q, k, v)
    s = block_size
    m = min(chunk_size, length)  # a chunk longer than the sequence is the whole sequence
    n_chunks = math.ceil(length / m)
    index, valid = se_attn_select(q, k, v, scale, m, s, top_k, retrieval, per_head, call_seed, selection)

    def chunks(x):
        return _pad_to(x, n_chunks * m).reshape(b, hq * n_chunks, m, d)

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    if index is None:
        out = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale)
    else:
        kk, n_full = index.shape[-1], length // s
        gather_at = index.reshape(b, hq, n_chunks * kk, 1).expand(b, hq, n_chunks * kk, s * d)

        def gather(x):
            blocks = x[:, :, :n_full * s].reshape(b, hq, n_full, s * d)
            return blocks.gather(2, gather_at).reshape(b, hq * n_chunks, kk * s, d)

        keys, values = torch.cat([gather(k), kc], dim=2), torch.cat([gather(v), vc], dim=2)
        seen = valid.repeat_interleave(s, dim=-1).reshape(b, hq * n_chunks, 1, kk * s).expand(-1, -1, m, -1)
        own = torch.ones(m, m, dtype=torch.bool, device=q.device).tril().expand(b, hq * n_chunks, m, m)
        out = F.scaled_dot_product_attention(qc, keys, values, attn_mask=torch.cat([seen, own], dim=-1),
                                             scale=scale)
    return out.reshape(b, hq, n_chunks * m, d)[:, :, :length]
