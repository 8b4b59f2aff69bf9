"""Attention block like mamba_ssm's MHA; the attention itself goes through transformers' AttentionInterface."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .config import HybridConfig
from .conv import causal_conv


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Dense attention. attention_mask: boolean (True = attend) or None (causal, aligned to the last key)."""
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scores = (query @ key.transpose(-1, -2)).float() * scaling
    q_len, k_len = scores.shape[-2:]
    if attention_mask is None:
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    scores = scores.masked_fill(~attention_mask, float("-inf"))
    probs = F.dropout(scores.softmax(-1).to(value.dtype), p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), probs


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, dim: int, base: float, interleaved: bool):
    """Rotate the first `dim` features of x (b, l, h, d) by positions (b, l) or (l,); the rest pass through."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = positions.float()[..., None] * inv_freq  # (..., l, dim/2)
    if angles.dim() == 2:
        angles = angles[None]
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    rot, rest = x[..., :dim].float(), x[..., dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([out.to(x.dtype), rest], dim=-1)


class Attention(nn.Module):
    """Multi-head (grouped-query) attention with optional causal conv over qkv and partial rotary."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        a = config.attn_cfg
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = a["num_heads"]
        self.num_heads_kv = a["num_heads_kv"] or self.num_heads
        self.head_dim = a["head_dim"] or config.d_model // self.num_heads
        self.num_key_value_groups = self.num_heads // self.num_heads_kv
        self.is_causal = True
        self.scaling = a["softmax_scale"] or self.head_dim**-0.5
        self.rotary_dim, self.rotary_base = a["rotary_emb_dim"], a["rotary_emb_base"]
        self.rotary_interleaved = a["rotary_emb_interleaved"]
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_heads_kv * self.head_dim
        self.splits = [q_dim, kv_dim, kv_dim]
        bias = a["qkv_proj_bias"]
        if a["fused_qkv"]:
            self.in_proj = nn.Linear(config.d_model, q_dim + 2 * kv_dim, bias=bias)
        else:
            self.q_proj = nn.Linear(config.d_model, q_dim, bias=bias)
            self.k_proj = nn.Linear(config.d_model, kv_dim, bias=bias)
            self.v_proj = nn.Linear(config.d_model, kv_dim, bias=bias)
        self.d_conv = a["d_conv"]
        if self.d_conv > 0:
            dim = q_dim + 2 * kv_dim
            self.conv1d = nn.Conv1d(dim, dim, self.d_conv, padding=self.d_conv - 1, groups=dim)
        self.out_proj = nn.Linear(q_dim, config.d_model, bias=a["out_proj_bias"])

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "in_proj"):
            return self.in_proj(x)
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    def forward(self, x: torch.Tensor, cache=None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, l, _ = x.shape
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        qkv = self._qkv(x)
        if self.d_conv > 0:
            qkv = qkv.transpose(1, 2)
            if cache is not None:
                qkv = cache.update_conv_state(qkv, self.layer_idx, conv_kernel_size=self.d_conv)
            qkv = causal_conv(qkv, self.conv1d)[..., -l:].transpose(1, 2).contiguous()
        q, k, v = qkv.split(self.splits, dim=-1)
        q = q.view(b, l, self.num_heads, self.head_dim)
        k = k.view(b, l, self.num_heads_kv, self.head_dim)
        v = v.view(b, l, self.num_heads_kv, self.head_dim)
        if self.rotary_dim > 0:
            pos = position_ids if position_ids is not None else torch.arange(past, past + l, device=x.device)
            q = apply_rotary(q, pos, self.rotary_dim, self.rotary_base, self.rotary_interleaved)
            k = apply_rotary(k, pos, self.rotary_dim, self.rotary_base, self.rotary_interleaved)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        mask = None
        if past > 0 and l > 1:  # continuing a cache with several tokens: causal, aligned to the last key
            mask = torch.ones(l, past + l, dtype=torch.bool, device=x.device).tril(past)[None, None]
        impl = self.config._attn_implementation or "eager"
        fn = eager_attention if impl == "eager" else ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention)
        out, _ = fn(self, q, k, v, mask, scaling=self.scaling, dropout=0.0)
        return self.out_proj(out.reshape(b, l, -1))
