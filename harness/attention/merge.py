"""Attention over a union of disjoint key sets: one attention call per set, merged by log-sum-exp.

A query's softmax over the union of sets K_1..K_n is the mean of its per-set attentions o_i weighted by
exp(lse_i - lse), lse = logaddexp(lse_1, .., lse_n). The backward is as exact: a set's share of the union's
gradient is what a flash backward computes for that set when given the union's output and lse (it needs only
P_ij = exp(s_ij - lse_i) and D_i = dO_i . out_i), so the union's gradient is the sum of the sets' backwards.
This lets the blockwise kernels give every set a mask-free call: all its keys, or a causal triangle.

`attend_calls` runs such unions for slices of the queries: a set is (keys, pattern), keys some positions of
one k, v (a slice, or positions to gather), with pattern
- "all": every key is visible to every query;
- "causal": key t is visible to query r iff t <= r (as many keys as queries);
- "anticausal": t >= r (as many keys as queries), run as causal on reversed queries and keys.

Each set is one call of a kernel that returns the log-sum-exp, and its backward (KERNELS):
- "cpu_flash": torch's fused CPU flash kernel, on CPU;
- "cuda_flash": torch's CUDA flash kernel, for fp16/bf16 on CUDA (as torch's own context-parallel attention
  merges it). It is first checked against `_plain` on this GPU (`_agrees`); where it fails, a warning says so
  and `_plain` runs;
- "plain": `_plain`, the readable version the tests compare the others with, from explicit fp32 scores.
"""

import contextlib
import functools
import warnings

import torch

from . import recording

PATTERNS = ("all", "causal", "anticausal")
_ATEN = torch.ops.aten


def _kernel(q) -> str:
    """The kernel that runs the sets of queries q."""
    if q.device.type == "cpu":
        return "cpu_flash"
    d = q.shape[-1]
    if (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256
            and _agrees("cuda_flash", q.device, q.dtype, d)):
        return "cuda_flash"
    return "plain"


def _merge(parts, dtype):
    """(output in `dtype`, lse (B, H, M) float32 or wider) of the union of sets whose (out, lse, state) are `parts`."""
    if len(parts) == 1:
        return parts[0][0], parts[0][1]
    lse = torch.stack([lse for _, lse, _ in parts]).logsumexp(0)
    return sum((part_lse - lse).exp()[..., None] * o.to(lse.dtype) for o, part_lse, _ in parts).to(dtype), lse


def attend_calls(q, k, v, calls, scale: float) -> torch.Tensor:
    """Attention of q (B, H, M, d) over k, v (B, H, N, d; N = M in the kernels) given as `calls` [(queries,
    sets)]: out[:, :, queries] is the softmax of q[:, :, queries] over the union of sets [(keys, pattern)] of k
    and v, keys a slice of positions or positions (B, H, n) to gather, each set one kernel call. One autograd node
    for all calls: its forward writes each call's output into one tensor and its backward adds each call's
    gradients into full-length ones (slices of q, k, v in the graph would each take a full-length zero gradient
    in their backward, and reshaped blocks of them copies), so beside those only one call's temporaries are held
    at a time."""
    if k.shape[:2] != q.shape[:2] or k.shape != v.shape:
        raise ValueError(f"bad keys: k {tuple(k.shape)}, v {tuple(v.shape)}, q {tuple(q.shape)}")
    for queries, sets in calls:  # an empty set or call is an error: torch's CPU flash kernel dies of it (SIGFPE)
        for keys, pattern in sets:
            if (pattern not in PATTERNS or not _count(keys, k) or not _count(queries, q)
                    or (pattern != "all" and _count(keys, k) != _count(queries, q))):
                raise ValueError(f"bad key set: pattern {pattern!r}, {_count(keys, k)} keys for "
                                 f"{_count(queries, q)} queries")
    kernel = _kernel(q)
    recording.record(f"merge via {kernel}")  # beside the backend's kernel: which kernel ran its calls
    return _Calls.apply(q, k, v, scale, calls, kernel)


def _count(positions, x) -> int:
    """How many positions of x `positions` (a slice, or positions (B, H, n)) names."""
    return len(range(*positions.indices(x.shape[2]))) if isinstance(positions, slice) else positions.shape[-1]


def _take(x, keys):
    """x at positions `keys` (a slice, or positions (B, H, n) to gather)."""
    if isinstance(keys, slice):
        return x[:, :, keys]
    return x.gather(2, keys[..., None].expand(*keys.shape, x.shape[-1]))


def _add(x, keys, grad):
    """x at positions `keys` (as _take) += grad."""
    if isinstance(keys, slice):
        x[:, :, keys] += grad
    else:
        x.scatter_add_(2, keys[..., None].expand(*keys.shape, x.shape[-1]), grad.to(x.dtype))


class _Calls(torch.autograd.Function):
    """attend_calls's node. Forward and backward run outside autocast, which would compute `_plain`'s scores in
    bf16 in the forward (the lse) and in fp32 in a backward called outside it; the kernels take the inputs'
    dtypes. Gradients are summed in lse's dtype (float32 or wider)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, calls, kernel):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32))
        states = []
        with no_autocast(q):
            for queries, sets in calls:
                parts = [_forward(q[:, :, queries], _take(k, keys), _take(v, keys), scale, p, kernel)
                         for keys, p in sets]
                out[:, :, queries], lse[:, :, queries] = _merge(parts, q.dtype)
                states.append([state for _, _, state in parts])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.calls, ctx.kernel, ctx.states = scale, calls, kernel, states
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grads = [torch.zeros_like(x, dtype=lse.dtype) for x in (q, k, v)]
        with no_autocast(q):
            for (queries, sets), states in zip(ctx.calls, ctx.states, strict=True):
                up, qs, outs, lses = (x[:, :, queries] for x in (grad_out, q, out, lse))
                for (keys, pattern), state in zip(sets, states, strict=True):
                    _add_grads(grads, queries, keys, *_backward(up, qs, _take(k, keys), _take(v, keys), outs, lses,
                                                                ctx.scale, pattern, ctx.kernel, state))
        return *(g.to(x.dtype) for g, x in zip(grads, (q, k, v), strict=True)), None, None, None


def _add_grads(grads, queries, keys, dq, dk, dv):
    """One set's gradients into the full-length ones (a function, so that they are freed before the next set's)."""
    grads[0][:, :, queries] += dq
    _add(grads[1], keys, dk)
    _add(grads[2], keys, dv)


def no_autocast(x: torch.Tensor):
    """A context where autocast is off for x's device (where autocast exists for it)."""
    return torch.autocast(x.device.type, enabled=False) if torch.amp.is_autocast_available(x.device.type) \
        else contextlib.nullcontext()


def _flipped(pattern: str, *xs) -> list[torch.Tensor]:
    """`xs` (sequence along dim 2, as are lse's (B, H, M)) reversed when the pattern is anticausal, which makes
    it causal."""
    return [x.flip(2) for x in xs] if pattern == "anticausal" else list(xs)


def _forward(q, k, v, scale, pattern, kernel):
    q, k, v = _flipped(pattern, q, k, v)
    o, lse, state = KERNELS[kernel][0](q, k, v, scale, pattern != "all")
    return *_flipped(pattern, o, lse), state


def _backward(grad_out, q, k, v, out, lse, scale, pattern, kernel, state):
    inputs = _flipped(pattern, grad_out, q, k, v, out, lse)
    grads = KERNELS[kernel][1](*inputs, scale, pattern != "all", state)
    del inputs  # the flipped copies, before the gradients' flips
    return _flipped(pattern, *grads)


# Each kernel: forward(q, k, v, scale, causal) -> (out, lse (B, H, M) float32 or wider, state) and
# backward(grad_out, q, k, v, out, lse, scale, causal, state) -> (dq, dk, dv), where out and lse are the union's.
def _cpu_flash(q, k, v, scale, causal):
    o, lse = _ATEN._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return o, lse, ()


def _cpu_flash_backward(grad_out, q, k, v, out, lse, scale, causal, state):
    return _ATEN._scaled_dot_product_flash_attention_for_cpu_backward(grad_out, q, k, v, out, lse, 0.0, causal,
                                                                      scale=scale)


def _cuda_flash(q, k, v, scale, causal):
    q, k, v = (x.contiguous() for x in (q, k, v))
    o, lse, cum_q, cum_k, max_q, max_k, rng, unused, _ = _ATEN._scaled_dot_product_flash_attention(
        q, k, v, 0.0, causal, False, scale=scale)
    return o, lse, (cum_q, cum_k, max_q, max_k, rng, unused)


def _cuda_flash_backward(grad_out, q, k, v, out, lse, scale, causal, state):
    cum_q, cum_k, max_q, max_k, rng, unused = state
    q, k, v, out, lse = (x.contiguous() for x in (q, k, v, out, lse))
    return _ATEN._scaled_dot_product_flash_attention_backward(grad_out, q, k, v, out, lse, cum_q, cum_k, max_q,
                                                              max_k, 0.0, causal, rng, unused, scale=scale)


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
    return ((s - lse[..., None]).exp() @ _wide(v)).to(q.dtype), lse, ()


def _plain_backward(grad_out, q, k, v, out, lse, scale, causal, state):
    """(dq, dk, dv) of the keys' share of a union whose output and log-sum-exp are `out` and `lse`."""
    p = (_scores(q, k, scale, causal) - lse[..., None]).exp()
    g = _wide(grad_out)
    ds = p * (g @ _wide(v).transpose(-1, -2) - (g * _wide(out)).sum(-1, keepdim=True))
    return (ds @ _wide(k) * scale).to(q.dtype), (ds.transpose(-1, -2) @ _wide(q) * scale).to(k.dtype), \
        (p.transpose(-1, -2) @ g).to(v.dtype)


KERNELS = {"cpu_flash": (_cpu_flash, _cpu_flash_backward), "cuda_flash": (_cuda_flash, _cuda_flash_backward),
           "plain": (_plain, _plain_backward)}


@torch.compiler.disable  # run once, eagerly, also when called from a compiled model
@functools.cache
def _agrees(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `kernel` gives `_plain`'s union, output and gradients, on this device: checked once per (kernel,
    device, dtype, head dim) on a small problem with every pattern and lengths that no tile divides. A kernel that
    fails or disagrees here is not used: a warning names it and `_plain` runs."""
    tol = 5e-2 if torch.finfo(dtype).bits <= 16 else 1e-4
    # the first call may come from evaluation (inference mode, no grad) or from training under autocast
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        g = torch.Generator().manual_seed(0)
        q, up, *kv = (torch.randn(1, 2, n, head_dim, generator=g).to(device, dtype) for n in [150] * 6 + [200] * 2)
        sets = list(zip(kv[::2], kv[1::2], ("causal", "anticausal", "all"), strict=True))
        try:
            got, want = (_with_grads(name, q, sets, up) for name in (kernel, "plain"))
            error = max(((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
                        for a, b in zip(got, want, strict=True))
            if error <= tol:
                return True
            why = f"its output or gradients are {error:.2g} from the reference's (relative to their largest; " \
                  f"tolerance {tol})"
        except Exception as e:  # any failure means: not this kernel, and say why
            why = f"it fails: {type(e).__name__}: {(str(e).splitlines() or [''])[0].rstrip('.')}"
    warnings.warn(f"attention merge kernel {kernel!r} is not used on {device} for {dtype} with head dim {head_dim}: "
                  f"{why}. SE-Attn and the blockwise sliding window use the explicit-score path instead, which is "
                  f"exact but slower and holds each call's scores in memory.", stacklevel=2)
    return False


def _with_grads(kernel, q, sets, up) -> list[torch.Tensor]:
    """The union's output by `kernel` and its gradients for q and each set's k and v, given output gradient up:
    k and v are the sets' keys and values concatenated, each set a slice of them."""
    k, v = (torch.cat([x[i] for x in sets], 2) for i in (0, 1))
    keys, end = [], 0
    for set_k, _, pattern in sets:
        keys.append((slice(end, end + set_k.shape[2]), pattern))
        end += set_k.shape[2]
    calls = [(slice(0, q.shape[2]), keys)]
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    out = _Calls.apply(*inputs, 0.3, calls, kernel)
    return [out, *torch.autograd.grad(out, inputs, up)]
