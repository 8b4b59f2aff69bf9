"""Depthwise causal conv1d over (b, d, l): causal_conv1d's kernel on CUDA when it imports, else torch."""

import torch
import torch.nn.functional as F
from torch import nn


def _causal_conv1d_fn():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return None
    return causal_conv1d_fn


def causal_conv(x: torch.Tensor, conv: nn.Conv1d, activation: str | None = None) -> torch.Tensor:
    """Causal depthwise conv of x (b, d, l) with `conv`'s current weight and bias (read at call time)."""
    if x.is_cuda and (fn := _causal_conv1d_fn()) is not None:
        return fn(x, conv.weight.squeeze(1), conv.bias, activation=activation)
    # A sum of k shifted products: for short depthwise kernels far faster on CPU than F.conv1d (mkldnn).
    w = conv.weight[:, 0]  # (d, k)
    k, l = w.shape[-1], x.shape[-1]
    xp = F.pad(x, (k - 1, 0))
    y = sum(xp[..., i : i + l] * w[:, i, None] for i in range(k))
    if conv.bias is not None:
        y = y + conv.bias[:, None]
    return F.silu(y) if activation == "silu" else y
