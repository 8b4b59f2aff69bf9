"""Full causal attention: the baseline, and the only backend that takes a padding mask."""

from .. import blockwise, gpu
from ..reference import causal_mask
from ..spec import Spec, triangle


def _check(opts: dict) -> dict:
    return opts


SPEC = Spec(
    name="full",
    description="causal softmax attention over every previous token",
    defaults={},
    allowed={},
    validate=_check,
    mask=lambda q, k, v, scale, opts, plan: causal_mask(q.shape[2], q.shape[2], q.device),
    pairs=lambda opts, length, heads: heads * triangle(length),
    kernels={
        "sdpa": lambda q, k, v, scale, opts, plan, mask: blockwise.full_sdpa(q, k, v, scale, mask),
        "flash": lambda q, k, v, scale, opts, plan, mask: gpu.full_flash(q, k, v, scale),
    },
    auto=("flash", "sdpa"),
    padding_mask=True,
)
