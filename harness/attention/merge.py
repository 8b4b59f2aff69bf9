"""Attention over a union of disjoint key sets: one attention call per set, merged by log-sum-exp.

A query's softmax over the union of sets K_1..K_n is the mean of its per-set attentions o_i weighted by
exp(lse_i - lse), lse = logaddexp(lse_1, .., lse_n). The backward is as exact: a set's share of the union's
gradient is what a flash backward computes for that set when given the union's output and lse (it needs only
P_ij = exp(s_ij - lse_i) and D_i = dO_i . out_i), so the union's gradient is the sum of the sets' backwards.
This lets the blockwise kernels give every set a mask-free call: all its keys, or a causal triangle.

A set is (k, v, pattern), with pattern
- "all": every key is visible to every query;
- "causal": key t is visible to query r iff t <= r (len(k) == len(q));
- "anticausal": t >= r (len(k) == len(q)), run as causal on reversed queries and keys.

On CPU each set is one call of torch's fused flash kernel and its backward
(`_scaled_dot_product_flash_attention_for_cpu`); elsewhere `_plain`, the readable version the tests compare
the fused one with, computes the same in a few lines of torch.
"""

import torch

PATTERNS = ("all", "causal", "anticausal")


def attend_sets(q, sets: list[tuple[torch.Tensor, torch.Tensor, str]], scale: float) -> torch.Tensor:
    """softmax attention of q (B, H, M, d) over the union of `sets` [(k, v, pattern)], k, v (B, H, N_i, d)."""
    for k, v, pattern in sets:
        if pattern not in PATTERNS or k.shape != v.shape or (pattern != "all" and k.shape[2] != q.shape[2]):
            raise ValueError(f"bad key set: pattern {pattern!r}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                             f"q {tuple(q.shape)}")
    patterns = tuple(p for _, _, p in sets)
    tensors = [t for k, v, _ in sets for t in (k, v)]
    return _Union.apply(q, scale, patterns, *tensors)


def _fused(q) -> bool:
    """Whether torch's fused CPU flash kernel (which returns the log-sum-exp) runs the sets."""
    return q.device.type == "cpu"


class _Union(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, scale, patterns, *kv):
        fused = _fused(q)
        parts = [_forward(q, kv[2 * i], kv[2 * i + 1], scale, p, fused) for i, p in enumerate(patterns)]
        lse = torch.stack([lse for _, lse in parts]).logsumexp(0)  # (B, H, M), float32 or wider
        out = sum((part_lse - lse).exp()[..., None] * o.to(lse.dtype) for o, part_lse in parts).to(q.dtype)
        ctx.save_for_backward(q, out, lse, *kv)
        ctx.scale, ctx.patterns, ctx.fused = scale, patterns, fused
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, out, lse, *kv = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_q, grad_kv = torch.zeros_like(q, dtype=lse.dtype), []
        for i, pattern in enumerate(ctx.patterns):
            dq, dk, dv = _backward(grad_out, q, kv[2 * i], kv[2 * i + 1], out, lse, ctx.scale, pattern, ctx.fused)
            grad_q += dq
            grad_kv += [dk, dv]
        return grad_q.to(q.dtype), None, None, *grad_kv


def _flipped(pattern: str, *xs) -> list[torch.Tensor]:
    """`xs` (sequence along dim 2, as are lse's (B, H, M)) reversed when the pattern is anticausal, which makes
    it causal."""
    return [x.flip(2) for x in xs] if pattern == "anticausal" else list(xs)


def _forward(q, k, v, scale, pattern, fused):
    q, k, v = _flipped(pattern, q, k, v)
    causal = pattern != "all"
    if fused:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    else:
        o, lse = _plain(q, k, v, scale, causal)
    return _flipped(pattern, o, lse)


def _backward(grad_out, q, k, v, out, lse, scale, pattern, fused):
    grad_out, q, k, v, out, lse = _flipped(pattern, grad_out, q, k, v, out, lse)
    causal = pattern != "all"
    if fused:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, causal, scale=scale)
    else:
        grads = _plain_backward(grad_out, q, k, v, out, lse, scale, causal)
    return _flipped(pattern, *grads)


def _wide(x):
    """x in float32, or wider when it is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _scores(q, k, scale, causal):
    s = (_wide(q) @ _wide(k).transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return s


def _plain(q, k, v, scale, causal):
    """(attention output, its log-sum-exp (B, H, M), float32 or wider) from explicit scores."""
    s = _scores(q, k, scale, causal)
    lse = s.logsumexp(-1)
    return ((s - lse[..., None]).exp() @ _wide(v)).to(q.dtype), lse


def _plain_backward(grad_out, q, k, v, out, lse, scale, causal):
    """(dq, dk, dv) of the keys' share of a union whose output and log-sum-exp are `out` and `lse`."""
    p = (_scores(q, k, scale, causal) - lse[..., None]).exp()
    g = _wide(grad_out)
    ds = p * (g @ _wide(v).transpose(-1, -2) - (g * _wide(out)).sum(-1, keepdim=True))
    return (ds @ _wide(k) * scale).to(q.dtype), (ds.transpose(-1, -2) @ _wide(q) * scale).to(k.dtype), \
        (p.transpose(-1, -2) @ g).to(v.dtype)
