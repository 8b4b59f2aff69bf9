import pytest
import torch

from harness.errors import UserError
from harness.finetune.methods import apply_method
from harness.models import HybridConfig, HybridForCausalLM


def tiny(fused=True):
    cfg = HybridConfig(d_model=32, n_layer=3, vocab_size=64, attn_layer_idx=[1],
                       ssm_cfg={"d_state": 8, "headdim": 16, "chunk_size": 8},
                       attn_cfg={"num_heads": 2, "head_dim": 16, "rotary_emb_dim": 8, "fused_qkv": fused})
    torch.manual_seed(0)
    return HybridForCausalLM(cfg)


@pytest.mark.parametrize("fused", [True, False])
def test_lora_trains_exactly_the_attention_adapters(fused):
    model, summary = apply_method(tiny(fused), "lora", rank=4, alpha=8)
    names = summary.trainable_names
    assert names and all("lora_" in n and ".layers.1.mixer." in n for n in names)
    ids = torch.randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in names), n
    # lora_B starts at zero, so lora_A gets no gradient on the first step; B must.
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_bad_method_and_rank():
    with pytest.raises(UserError, match="did you mean 'lora'"):
        apply_method(tiny(), "lorra")
    with pytest.raises(UserError, match="rank"):
        apply_method(tiny(), "lora", rank=0)
