"""LongLoRA's shifted sparse attention (S2-Attn)."""

from .. import blockwise, gpu
from ..reference import s2_group_size, s2_mask
from ..spec import Spec, bad, triangle


def _check(opts: dict) -> dict:
    r = opts["group_ratio"]
    if isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r <= 1:
        raise bad(SPEC, "group_ratio", r)
    return {**opts, "group_ratio": float(r)}


def _groups(length: int, group: int) -> int:
    """Pairs of causal attention inside consecutive groups of `group` tokens."""
    n, rest = divmod(length, group)
    return n * triangle(group) + triangle(rest)


def _pairs(opts: dict, length: int, heads: int) -> int:
    g = s2_group_size(length, opts["group_ratio"])
    shift = g // 2
    shifted = triangle(min(shift, length)) + _groups(max(0, length - shift), g)
    return (heads - heads // 2) * _groups(length, g) + heads // 2 * shifted


SPEC = Spec(
    name="s2_attn",
    description="LongLoRA shifted sparse attention: group size G = ceil(L*group_ratio); the first ceil(H/2) query "
                "heads attend causally inside [0,G), [G,2G), ...; the others inside [0,G//2), [G//2, G//2+G), ... "
                "(no wrap-around); a length not divisible by G leaves a shorter last group (equivalent to "
                "right-padding)",
    defaults={"group_ratio": 0.25},
    allowed={"group_ratio": "float in (0, 1]"},
    validate=_check,
    mask=lambda q, k, v, scale, opts, plan: s2_mask(q.shape[2], q.shape[1], opts["group_ratio"], q.device),
    pairs=_pairs,
    kernels={
        "blockwise": lambda q, k, v, scale, opts, plan, mask: blockwise.s2_attn(q, k, v, scale, opts["group_ratio"]),
        "flash": lambda q, k, v, scale, opts, plan, mask: gpu.s2_attn_flash(q, k, v, scale, opts["group_ratio"]),
    },
    auto=("flash", "blockwise"),
    lr=2e-5,  # LongLoRA's, which the paper keeps for S2 (appendix G); the others fine-tune at 2e-4
    capabilities={"evaluation": "LongLoRA evaluates with full attention; pick `full` for eval"},
)
