"""Sliding-window attention: each query sees its `window` most recent keys."""

from .. import blockwise, gpu
from ..reference import sliding_window_mask
from ..spec import Spec, bad, is_int, triangle


def _check(opts: dict) -> dict:
    if not (is_int(opts["window"]) and opts["window"] >= 1):
        raise bad(SPEC, "window", opts["window"])
    return opts


SPEC = Spec(
    name="sliding_window",
    description="each query sees the `window` most recent keys INCLUDING itself "
                "(key j visible to query i iff i-window < j <= i)",
    defaults={"window": 4096},
    allowed={"window": "int >= 1 (keys per query, including the query's own key)"},
    validate=_check,
    mask=lambda q, k, v, scale, opts, plan: sliding_window_mask(q.shape[2], opts["window"], q.device),
    pairs=lambda opts, length, heads: heads * (triangle(min(opts["window"], length))
                                               + max(0, length - opts["window"]) * opts["window"]),
    kernels={
        "blockwise": lambda q, k, v, scale, opts, plan, mask: blockwise.sliding_window(q, k, v, scale, opts["window"]),
        "flash": lambda q, k, v, scale, opts, plan, mask: gpu.sliding_window_flash(q, k, v, scale, opts["window"]),
        "flex": lambda q, k, v, scale, opts, plan, mask: gpu.sliding_window_flex(q, k, v, scale, opts["window"]),
    },
    auto=("flash", "flex", "blockwise"),
    decode_mask=lambda q_len, k_len, opts, device: sliding_window_mask(k_len, opts["window"], device, q_len)[0, 0],
    capabilities={"decode": "q_len < k_len (KV cache): each query sees its `window` most recent keys, reported "
                            "'sliding_window via sdpa (decode)'"},
)
