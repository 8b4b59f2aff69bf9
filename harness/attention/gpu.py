"""CUDA-only fast paths, imported lazily: flash-attn (when installed) and FlexAttention.

Nothing here runs on CPU (FlexAttention's CPU backward is not implemented; flash-attn needs CUDA); tests
for these live under `pytest -m gpu`. `available(kernel, q)` says whether a kernel can run for tensor q.
"""

import importlib.util
import math

import torch

from .blockwise import expand_kv, se_attn_select


def available(kernel: str, q: torch.Tensor) -> bool:
    if kernel in ("reference", "sdpa", "blockwise"):
        return True
    if not (q.is_cuda and torch.cuda.is_available()):
        return False
    if kernel == "flash":
        return importlib.util.find_spec("flash_attn") is not None and q.dtype in (torch.float16, torch.bfloat16)
    if kernel == "flex":
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    return False


def _flash(q, k, v, scale, **kw):
    from flash_attn import flash_attn_func  # lazy: importing it needs CUDA

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True,
                          **kw)
    return out.transpose(1, 2)


def full_flash(q, k, v, scale):
    return _flash(q, k, v, scale)  # flash-attn handles grouped kv heads natively


def sliding_window_flash(q, k, v, scale, window):
    return _flash(q, k, v, scale, window_size=(window - 1, 0))  # (left, right): window-1 earlier keys + itself


def s2_attn_flash(q, k, v, scale, group_ratio):
    """Same split as blockwise.s2_attn, each group a batch row of one flash-attn call."""
    from .reference import s2_group_size

    k, v = expand_kv(q, k, v)
    b, hq, length, d = q.shape
    g = s2_group_size(length, group_ratio)
    shift, n_plain = g // 2, hq - hq // 2

    def grouped(qx, kx, vx):
        n, h = qx.shape[2], qx.shape[1]
        n_groups = math.ceil(n / g)
        pad = n_groups * g - n

        def split(x):
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
            return x.reshape(b, h, n_groups, g, d).permute(0, 2, 1, 3, 4).reshape(b * n_groups, h, g, d)

        out = _flash(split(qx), split(kx), split(vx), scale)
        return out.reshape(b, n_groups, h, g, d).permute(0, 2, 1, 3, 4).reshape(b, h, n_groups * g, d)[:, :, :n]

    plain = grouped(q[:, :n_plain], k[:, :n_plain], v[:, :n_plain])
    if n_plain == hq:
        return plain
    qs, ks, vs = q[:, n_plain:], k[:, n_plain:], v[:, n_plain:]
    parts = [_flash(qs[:, :, :shift], ks[:, :, :shift], vs[:, :, :shift], scale)] if shift else []
    parts.append(grouped(qs[:, :, shift:], ks[:, :, shift:], vs[:, :, shift:]))
    return torch.cat([plain, torch.cat(parts, dim=2)], dim=1)


def _flex(q, k, v, scale, mask_mod):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, hq, length, _ = q.shape
    block_mask = create_block_mask(mask_mod, b, hq, length, length, device=q.device)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != hq)


def sliding_window_flex(q, k, v, scale, window):
    def mask_mod(b, h, qi, kj):
        return (kj <= qi) & (kj > qi - window)

    return _flex(q, k, v, scale, mask_mod)


def se_attn_flex(q, k, v, scale, chunk_size, block_size, top_k, retrieval, per_head, call_seed=0,
                 selection="chunk"):
    """Retrieval as in blockwise (vectorised), then one FlexAttention call with the SE-Attn block mask."""
    b, hq, length, _ = q.shape
    m, s = min(chunk_size, length), block_size
    n_chunks, n_blocks = math.ceil(length / m), math.ceil(length / s)
    retrieved = torch.zeros(b, hq, n_chunks, n_blocks, dtype=torch.bool, device=q.device)
    index, valid = se_attn_select(q, k, v, scale, m, s, top_k, retrieval, per_head, call_seed, selection)
    if index is not None:
        retrieved.scatter_(-1, index, valid)

    def mask_mod(bi, h, qi, kj):
        chunk = qi // m
        return ((kj // m == chunk) & (kj <= qi)) | retrieved[bi, h, chunk, kj // s]

    return _flex(q, k, v, scale, mask_mod)
