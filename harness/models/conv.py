"""Depthwise causal conv1d over (b, d, l): causal_conv1d's kernel on CUDA when it imports, else torch."""

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


@functools.cache
def _causal_conv1d_fn():
    """causal_conv1d's kernel, or None when it does not import; tried once per process (see ssd._mamba_ssm_scan)."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return None
    return causal_conv1d_fn


class _ShiftedSum(torch.autograd.Function):
    """y[:, t] = bias + sum_i w[:, i] x[:, t - (k - 1 - i)] over x (b, l, d), zero before t = 0.

    For short depthwise kernels far faster on CPU than F.conv1d (mkldnn). Written as a Function because the
    autograd of the shifted-slice form allocates and fills a padded zero tensor per tap; here every tap
    accumulates into one gradient buffer.
    """

    @staticmethod
    def forward(ctx, x, w, bias):
        k, l = w.shape[1], x.shape[1]
        y = x * w[:, k - 1]
        for i in range(max(0, k - l), k - 1):
            s = k - 1 - i
            y[:, s:].addcmul_(x[:, : l - s], w[:, i])
        if bias is not None:
            y += bias
        ctx.save_for_backward(x, w)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        k, l = w.shape[1], x.shape[1]
        taps = range(max(0, k - l), k - 1)
        gx = gy * w[:, k - 1]
        for i in taps:
            s = k - 1 - i
            gx[:, : l - s].addcmul_(gy[:, s:], w[:, i])
        gw = None
        if ctx.needs_input_grad[1]:
            gw = torch.zeros_like(w)
            gw[:, k - 1] = (gy * x).sum((0, 1))
            for i in taps:
                s = k - 1 - i
                gw[:, i] = (gy[:, s:] * x[:, : l - s]).sum((0, 1))
        gb = gy.sum((0, 1)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def causal_conv(x: torch.Tensor, conv: nn.Conv1d, activation: str | None = None) -> torch.Tensor:
    """Causal depthwise conv of x (b, d, l) with `conv`'s current weight and bias (read at call time).

    The torch path computes over x.transpose(1, 2): given the transposed view of a (b, l, d) projection, as
    the mixers pass it, that is the projection's own memory, and the result is a (b, d, l) view of a
    (b, l, d) tensor, so neither transpose copies. The result has x's dtype, as the kernel's: under autocast a
    bf16 projection through an fp32 conv stays bf16 (computed in fp32)."""
    if x.is_cuda and (fn := _causal_conv1d_fn()) is not None:
        return fn(x, conv.weight.squeeze(1), conv.bias, activation=activation)
    y = _ShiftedSum.apply(x.transpose(1, 2), conv.weight[:, 0], conv.bias).to(x.dtype)
    return (F.silu(y) if activation == "silu" else y).transpose(1, 2)
