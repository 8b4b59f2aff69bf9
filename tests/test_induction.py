"""Induction-head init: a query attends to the position after its token's earlier occurrence."""

import pytest
import torch
from transformers import AttentionInterface

from harness.errors import UserError
from harness.models import HybridForCausalLM, preset_config
from harness.models.induction import induction_init

CAPTURED = {}


def _capture(module, q, k, v, mask, scaling, dropout=0.0, **kw):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention
    CAPTURED["scores"] = (q @ k.transpose(-1, -2)) * scaling  # (batch, heads, queries, keys)
    return torch.zeros_like(q).transpose(1, 2), None


AttentionInterface.register("capture_scores", _capture)


@pytest.mark.parametrize("heads_kv", [4, 2])
def test_queries_match_the_key_after_an_earlier_occurrence(heads_kv):
    torch.manual_seed(0)
    cfg = preset_config("tiny-hybrid")
    cfg.attn_cfg = {**cfg.attn_cfg, "num_heads_kv": heads_kv}
    model = HybridForCausalLM(cfg)
    assert induction_init(model, scale=4.0) == len(cfg.attn_layer_idx)
    attn = model.backbone.layers[cfg.attn_layer_idx[0]].mixer
    attn.config._attn_implementation = "capture_scores"
    vocab = torch.nn.functional.normalize(torch.randn(40, cfg.d_model), dim=-1) * cfg.d_model**0.5
    seq = torch.randperm(40)[:30]
    seq = torch.cat([seq, seq[[7, 19, 3]]])  # tokens seen at 7, 19, 3 come back at 30, 31, 32
    attn(vocab[seq][None])
    scores = CAPTURED["scores"][0].mean(0)  # averaged over heads
    for query, earlier in ((30, 7), (31, 19), (32, 3)):
        assert scores[query, : query + 1].argmax().item() == earlier + 1


def test_default_init_does_not_match():
    torch.manual_seed(0)
    cfg = preset_config("tiny-hybrid")
    attn = HybridForCausalLM(cfg).backbone.layers[cfg.attn_layer_idx[0]].mixer
    attn.config._attn_implementation = "capture_scores"
    vocab = torch.nn.functional.normalize(torch.randn(40, cfg.d_model), dim=-1) * cfg.d_model**0.5
    seq = torch.randperm(40)[:30]
    attn(vocab[torch.cat([seq, seq[[7, 19, 3]]])][None])
    scores = CAPTURED["scores"][0].mean(0)
    hits = sum(scores[q, : q + 1].argmax().item() == e + 1 for q, e in ((30, 7), (31, 19), (32, 3)))
    assert hits < 3  # the property above comes from the init, not from the architecture


def test_needs_attention_blocks_with_a_conv():
    cfg = preset_config("tiny-hybrid")
    cfg.attn_layer_idx = []
    with pytest.raises(UserError, match="no attention blocks"):
        induction_init(HybridForCausalLM(cfg))
    cfg = preset_config("tiny-hybrid")
    cfg.attn_cfg = {**cfg.attn_cfg, "d_conv": 0}
    with pytest.raises(UserError, match="d_conv >= 2"):
        induction_init(HybridForCausalLM(cfg))
