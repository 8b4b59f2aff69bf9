"""Induction-head initialisation of a fresh model's attention blocks (the embedded model's pretraining recipe).

Trained from scratch on a CPU budget, a tiny model sits on a long plateau before it learns to copy from
its context (an induction head: attend to where the previous token equals the current one, copy what
followed), and retrieval never starts. This init builds that circuit's query/key half into every
attention block: the causal conv on q/k/v passes the current token to q and the previous token to k,
and W_k = W_q scaled up, so a query matches the keys of positions that follow an earlier occurrence of
its own token. Values, output projections and all other layers keep their default init.

Measured on a copy task (random spans of 8-24 tokens from 64 token types, each repeated once;
tiny-hybrid, batch 16 x 128, LR 3e-3): with the default init the loss on the repeated tokens stayed at
chance (4.17 nats) for 500 steps, as did a Llama of the same size; with this init (scale 4) it was 0.26
after 200 steps. Tying W_k = W_q alone (mimetic init) or scaling alone did not leave the plateau.
"""

from __future__ import annotations

import torch

from harness.errors import UserError
from harness.models.attention import Attention


@torch.no_grad()
def induction_init(model: torch.nn.Module, scale: float = 4.0) -> int:
    """Initialise every attention block of `model` as above; returns how many were initialised."""
    blocks = [m for m in model.modules() if isinstance(m, Attention)]
    if not blocks:
        raise UserError("induction_init: the model has no attention blocks (attn_layer_idx is empty)")
    for attn in blocks:
        if attn.d_conv < 2:
            raise UserError(f"induction_init needs the attention conv (attn_cfg.d_conv >= 2), got {attn.d_conv}")
        q_dim, kv_dim, _ = attn.splits
        w_q, w_k = _projection(attn, 0, q_dim), _projection(attn, q_dim, kv_dim)
        w_q.mul_(scale)
        # each k/v head takes the query weights of the first query head that shares it (GQA)
        per_group = attn.num_key_value_groups * attn.head_dim
        heads = w_q.view(attn.num_heads_kv, per_group, -1)[:, : attn.head_dim]
        w_k.copy_(heads.reshape(kv_dim, -1))
        conv = attn.conv1d
        conv.weight[: q_dim + kv_dim] = 0
        conv.weight[:q_dim, 0, -1] = 1  # q: the current position's projection
        conv.weight[q_dim : q_dim + kv_dim, 0, -2] = 1  # k: the previous position's projection
        if conv.bias is not None:
            conv.bias[: q_dim + kv_dim] = 0
    return len(blocks)


def _projection(attn: Attention, start: int, size: int) -> torch.Tensor:
    """The weight rows (a view) of q, k or v: a slice of the fused in_proj, or the separate projection."""
    if hasattr(attn, "in_proj"):
        return attn.in_proj.weight[start : start + size]
    q_dim = attn.splits[0]
    return (attn.q_proj if start == 0 else attn.k_proj if start == q_dim else attn.v_proj).weight
