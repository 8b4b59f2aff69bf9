"""The SSD scan of Mamba-2: a chunked pure-torch form, a step-by-step reference, and mamba_ssm's kernel on CUDA.

Shapes follow mamba_ssm's `mamba_chunk_scan_combined`: x (b, l, h, p), dt (b, l, h) already biased and
softplus'ed, A (h,), B and C (b, l, g, n) with h divisible by g, D (h,) or (h, p), states (b, h, p, n).
"""

import functools

import torch
import torch.nn.functional as F

TORCH_SSD = "ssd via torch-chunked"
TRITON_SSD = "ssd via mamba_ssm-triton"


@functools.cache
def _mamba_ssm_scan():
    """mamba_ssm's Triton chunk scan, or None when mamba_ssm does not import (it needs CUDA); tried once per
    process, as a failed import is not remembered by Python and each retry searches the path again."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:
        return None
    return mamba_chunk_scan_combined


def ssd_kernel_name(device: torch.device | str) -> str:
    """Which implementation `ssd_scan` runs for tensors on `device`."""
    if torch.device(device).type == "cuda" and _mamba_ssm_scan() is not None:
        return TRITON_SSD
    return TORCH_SSD


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, initial_states=None, return_final_states=False):
    """Run the SSD scan with mamba_ssm's kernel on CUDA when available, else `ssd_chunked`."""
    if ssd_kernel_name(x.device) == TRITON_SSD:
        return _mamba_ssm_scan()(
            x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states,
            return_final_states=return_final_states,
        )
    return ssd_chunked(x, dt, A, B, C, chunk_size, D, initial_states, return_final_states)


def _heads(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """(..., g, n) -> (..., h, n), each group shared by h // g consecutive heads."""
    g = t.shape[-2]
    return t if g == nheads else t.repeat_interleave(nheads // g, dim=-2)


def _skip(y, x, D):
    if D is None:
        return y
    return y + x * (D[:, None] if D.dim() == 1 else D)


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, initial_states=None, return_final_states=False):
    """Chunked SSD ("minimal SSD"): quadratic form inside each chunk, a recurrence over chunk states.

    The h // g heads of a group share B and C, so C.B^T is computed once per group and the products with
    B or C run over all heads of a group in one matmul. Memory is O(l * chunk_size * h + (l / chunk_size)
    * h * p * n): linear in l.
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    hg = h // g
    dtype = x.dtype
    work = torch.promote_types(dtype, torch.float32)
    pad = (-l) % chunk_size
    c, s = (l + pad) // chunk_size, chunk_size
    # Padding dt with zeros makes padded steps identity updates (decay 1, zero input).
    xs, dts, Bs, Cs = (F.pad(t.to(work), (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t.to(work)
                       for t in (x, dt, B, C))
    # Group-major layouts: X (b, g, hg, c, s, p), B and C (b, g, c, s, n), a (b, g, hg, c, s).
    X = (xs * dts[..., None]).view(b, c, s, g, hg, p).permute(0, 3, 4, 1, 2, 5)
    Bg = Bs.view(b, c, s, g, n).permute(0, 3, 1, 2, 4)
    Cg = Cs.view(b, c, s, g, n).permute(0, 3, 1, 2, 4)
    a = (dts * A.to(work)).view(b, c, s, g, hg).permute(0, 3, 4, 1, 2)
    acum = a.cumsum(-1)

    def group_rows(t):  # (b, g, hg, c, s, p) -> (b, g, c, s, hg * p)
        return t.permute(0, 1, 3, 4, 2, 5).reshape(b, g, c, s, hg * p)

    # 1. Within chunks: y_i = sum_{j<=i} C_i.B_j exp(acum_i - acum_j) dt_j x_j.
    seg = acum[..., :, None] - acum[..., None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
    decay = seg.masked_fill(~causal, float("-inf")).exp()
    y = ((Cg @ Bg.transpose(-1, -2))[:, :, None] * decay) @ X  # (b, g, hg, c, s, p)

    # 2. State contributed by each chunk, as seen at its end: (b, g, c, hg, p, n).
    weighted = group_rows(X * (acum[..., -1:] - acum).exp()[..., None])
    chunk_states = (weighted.transpose(-1, -2) @ Bg).view(b, g, c, hg, p, n)

    # 3. Recurrence over chunks: the state entering chunk k, (b, g, hg, p, n) each.
    state = x.new_zeros(b, h, p, n, dtype=work) if initial_states is None else initial_states.to(work)
    state = state.view(b, g, hg, p, n)
    chunk_decay = acum[..., -1].exp()  # (b, g, hg, c)
    # The chunks one by one. Eager, by unbind: the backward of indexing fills a zero tensor of all c chunks per
    # index, quadratic in the length (16 ms of a 490 ms fine-tuning step at 4096 tokens). Compiled, by indexing:
    # inductor fuses that backward, 2 ms a pretraining step faster than unbind, and the default model keeps its bits.
    if torch.compiler.is_compiling():
        decay_at, states_at = (lambda k: chunk_decay[..., k, None, None]), (lambda k: chunk_states[:, :, k])
    else:
        decay_at, states_at = chunk_decay[..., None, None].unbind(3).__getitem__, chunk_states.unbind(2).__getitem__
    entering = []
    for k in range(c):
        entering.append(state)
        state = state * decay_at(k) + states_at(k)
    entering = torch.stack(entering, dim=2).view(b, g, c, hg * p, n)

    # 4. Entering state read out inside each chunk, for all heads of a group at once.
    readout = (Cg @ entering.transpose(-1, -2)).view(b, g, c, s, hg, p)
    readout = readout * acum.exp().permute(0, 1, 3, 4, 2)[..., None]
    y = y.permute(0, 3, 4, 1, 2, 5) + readout.permute(0, 2, 3, 1, 4, 5)  # (b, c, s, g, hg, p)
    y = y.reshape(b, c * s, h, p)[:, :l]
    y = _skip(y, x.to(work), D).to(dtype)
    return (y, state.view(b, h, p, n).to(dtype)) if return_final_states else y


def ssd_step(state, x, dt, A, B, C, D=None):
    """One recurrence step. state (b, h, p, n), x (b, h, p), dt (b, h), B and C (b, g, n).

    Returns (y (b, h, p), new state); computed in the state's dtype.
    """
    h = x.shape[1]
    work = state.dtype
    x, dt, B, C = x.to(work), dt.to(work), _heads(B, h).to(work), _heads(C, h).to(work)
    decay = (dt * A.to(work)).exp()
    state = state * decay[..., None, None] + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    y = (state @ C[..., None]).squeeze(-1)
    return _skip(y, x, D), state


def ssd_recurrent(x, dt, A, B, C, D=None, initial_states=None, return_final_states=False):
    """Readable reference: the recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t."""
    b, l, h, p = x.shape
    work = torch.promote_types(x.dtype, torch.float32)
    n = B.shape[-1]
    state = x.new_zeros(b, h, p, n, dtype=work) if initial_states is None else initial_states.to(work)
    ys = []
    for t in range(l):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    y = torch.stack(ys, dim=1).to(x.dtype)
    return (y, state.to(x.dtype)) if return_final_states else y
