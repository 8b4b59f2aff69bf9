"""CUDA-only fast paths, imported lazily: flash-attn (when installed) and FlexAttention.

The kernels here do not run on CPU (FlexAttention's CPU backward is not implemented; flash-attn needs CUDA);
tests for them live under `pytest -m gpu`. `available(kernel, q)` says whether a kernel can run for tensor q.
SE-Attn's block mask is built from its retrieval on any device (`se_attn_block_mask`, tested on CPU against
FlexAttention's own `create_block_mask`).
"""

import functools
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
        return _flash_attn_func() is not None and q.dtype in (torch.float16, torch.bfloat16)
    if kernel == "flex":  # compiled FlexAttention refuses head dims below 16 on CUDA (inductor's flex lowering)
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None and q.shape[-1] >= 16
    return False


@functools.cache
def _flash_attn_func():
    """flash-attn's kernel, or None when it does not import: not installed, or built for another torch or CUDA
    (an installed wheel that fails to import is common), in which case "auto" takes the next kernel."""
    try:
        from flash_attn import flash_attn_func
    except Exception:
        return None
    return flash_attn_func


def _flash(q, k, v, scale, **kw):
    out = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True,
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


@functools.cache
def _flex_attention():
    """FlexAttention compiled, as it must be to be block-sparse: called eagerly, it evaluates the mask over every
    (query, key) pair and materialises the L x L scores (torch warns so), whatever the block mask says."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_attention(q, k, v, block_mask, scale):
    return _flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def sliding_window_flex(q, k, v, scale, window):
    def mask_mod(b, h, qi, kj):
        return (kj <= qi) & (kj > qi - window)

    return flex_attention(q, k, v, sliding_window_block_mask(q.shape[2], window, mask_mod, q.device), scale)


def se_attn_flex(q, k, v, scale, chunk_size, block_size, top_k, retrieval, per_head, call_seed=0,
                 selection="chunk"):
    """Retrieval as in blockwise (vectorised), then one FlexAttention call with the SE-Attn block mask."""
    b, hq, length, _ = q.shape
    m, s = min(chunk_size, length), block_size
    retrieved = se_attn_retrieved(q, *se_attn_select(q, k, v, scale, m, s, top_k, retrieval, per_head, call_seed,
                                                     selection), m, s)

    def mask_mod(bi, h, qi, kj):
        chunk = qi // m
        return ((kj // m == chunk) & (kj <= qi)) | retrieved[bi, h, chunk, kj // s]

    return flex_attention(q, k, v, se_attn_block_mask(retrieved, length, m, s, mask_mod), scale)


# FlexAttention's block masks are built here from pair counts per (query tile, key tile), in O((L/TILE)²) memory
# per head: create_block_mask would evaluate the mask on the dense L x L grid of every head (32 GB at 32K tokens
# and 32 heads). A tile is full when all its TILE² pairs are allowed (padding beyond L counts as masked, as in
# create_block_mask) and partial when some are; the tests check both against create_block_mask's.
TILE = 128


def se_attn_retrieved(q, index, valid, chunk_size, block_size) -> torch.Tensor:
    """(B, H, chunks, blocks) bool: the key blocks each chunk attends to besides itself (`se_attn_select`'s)."""
    b, hq, length, _ = q.shape
    retrieved = torch.zeros(b, hq, math.ceil(length / chunk_size), math.ceil(length / block_size), dtype=torch.bool,
                            device=q.device)
    if index is not None:
        retrieved.scatter_(-1, index, valid)
    return retrieved


def sliding_window_block_mask(length, window, mask_mod, device=None, tile=TILE):
    """The sliding window's BlockMask: row q sees keys q-window+1..q."""
    pos = torch.arange(length, device=device)
    return _block_mask(_row_pairs((pos - window + 1).clamp(min=0), pos, min(window, length), tile), length,
                       mask_mod, tile)


def se_attn_block_mask(retrieved, length, chunk_size, block_size, mask_mod, tile=TILE):
    """SE-Attn's BlockMask from its retrieval (`se_attn_retrieved`): the chunk's own causal pairs row by row, the
    retrieved ones as (query rows per chunk) @ (retrieved keys per key tile)."""
    pos = torch.arange(length, device=retrieved.device)
    n = math.ceil(length / tile)
    counts = retrieved.double() @ _overlap(pos // block_size, pos // tile, retrieved.shape[-1], n)
    counts = _overlap(pos // tile, pos // chunk_size, n, retrieved.shape[-2]) @ counts
    return _block_mask(counts + _row_pairs(pos // chunk_size * chunk_size, pos, chunk_size, tile), length, mask_mod,
                       tile)


def _row_pairs(first, last, span, tile=TILE) -> torch.Tensor:
    """(query tiles, key tiles) float64: the pairs of a mask where row q sees keys first[q]..last[q] (at most
    `span` of them, so at most ceil(span / tile) + 1 key tiles)."""
    n = math.ceil(first.numel() / tile)
    tiles = first[:, None] // tile + torch.arange(math.ceil(span / tile) + 1, device=first.device)
    pairs = torch.minimum(last[:, None], (tiles + 1) * tile - 1) - torch.maximum(first[:, None], tiles * tile) + 1
    rows = (torch.arange(first.numel(), device=first.device) // tile)[:, None].expand_as(tiles)
    out = torch.zeros(n, n, dtype=torch.float64, device=first.device)
    return out.index_put_((rows, tiles.clamp(max=n - 1)), pairs.clamp(min=0).double(), accumulate=True)


def _overlap(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """(n_rows, n_cols) float64: how many positions fall in each (row group, column group)."""
    out = torch.zeros(n_rows, n_cols, dtype=torch.float64, device=rows.device)
    return out.index_put_((rows, cols), torch.ones_like(rows, dtype=torch.float64), accumulate=True)


def _block_mask(counts: torch.Tensor, length: int, mask_mod, tile=TILE):
    """The BlockMask of allowed-pair `counts` ([B, [H,]] query tiles, key tiles; B and H default to 1, which
    flex_attention broadcasts)."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = counts.reshape((1,) * (4 - counts.dim()) + counts.shape)
    full = counts == tile * tile
    return BlockMask.from_kv_blocks(*_ordered((counts > 0) & ~full), *_ordered(full), BLOCK_SIZE=tile,
                                    mask_mod=mask_mod, seq_lengths=(length, length))


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (.., tiles) bool block map as BlockMask takes it: blocks per row, then their columns first."""
    return (blocks.sum(-1, dtype=torch.int32),
            torch.argsort(blocks.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32))
