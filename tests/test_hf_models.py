"""The fine-tuning methods on HF hybrids (Bamba, Zamba2, NemotronH, Falcon-H1), Llama and our hybrid.

For each model and method: the trainable set equals the one LongLoRA's name rules give (LoRA on the
attention q/k/v/o projections, "embed", "norm", "conv1d" in the name), written out here independently of
the structural discovery in harness.finetune.methods; every trainable tensor gets a non-zero gradient
(checked after one update: LoRA's B starts at zero, so A's first gradient is exactly zero); nothing else
has requires_grad; and a few steps lower the loss on a fixed batch.
"""

import re

import pytest
import torch
import transformers as T

from harness.errors import UserError
from harness.export import merged
from harness.finetune.methods import METHODS, apply_method, load_method, save_method
from harness.models import HybridConfig, HybridForCausalLM

V = 128
MODELS = {
    "bamba": lambda: T.BambaForCausalLM(T.BambaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16)),
    "zamba2": lambda: T.Zamba2ForCausalLM(T.Zamba2Config(
        vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
        mamba_d_state=8, mamba_headdim=16, n_mamba_heads=4, mamba_ngroups=1, chunk_size=16,
        layers_block_type=["mamba", "hybrid", "mamba"], num_mem_blocks=1, intermediate_size=64)),
    "nemotron_h": lambda: T.NemotronHForCausalLM(T.NemotronHConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, hybrid_override_pattern="M*-",
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, mamba_num_heads=4, mamba_head_dim=16,
        n_groups=1, ssm_state_size=8, conv_kernel=4, chunk_size=16)),
    "falcon_h1": lambda: T.FalconH1ForCausalLM(T.FalconH1Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_ssm=64,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1)),
    "harness_hybrid": lambda: HybridForCausalLM(HybridConfig(
        d_model=32, n_layer=3, vocab_size=V, attn_layer_idx=[1], ssm_cfg={"d_state": 8, "headdim": 16, "chunk_size": 8},
        attn_cfg={"num_heads": 2, "head_dim": 16, "rotary_emb_dim": 8, "d_conv": 4})),
}
# The attention projections by name: q/k/v/o_proj everywhere, our hybrid's attention layer's in_proj/out_proj.
ATTN_PROJ = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj)$|^backbone\.layers\.1\.mixer\.(in_proj|out_proj)$")
IDS = torch.randint(0, V, (1, 32), generator=torch.Generator().manual_seed(0))


def build(arch):
    torch.manual_seed(0)
    return MODELS[arch]()


def expected_trainable(model, method):
    names = set(dict(model.named_parameters()))
    lora = {f"{m}.lora_{ab}.default.weight" for m, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and ATTN_PROJ.search(m) for ab in "AB"}
    plus = {n for n in names if "embed" in n or "norm" in n}
    conv = {n for n in names if "conv1d" in n}
    return {"lora": lora, "lora_plus": lora | plus, "hylora": lora | plus | conv, "full": names}[method]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", MODELS)
def test_method_trains_exactly_its_set(arch, method):
    model = build(arch)
    if arch == "llama" and method == "hylora":
        with pytest.raises(UserError, match="no conv1d layers"):
            apply_method(model, method)
        return
    want = expected_trainable(model, method)
    model, summary = apply_method(model, method, rank=4, alpha=8)
    got = {n.removeprefix("base_model.model.").replace(".base_layer.", ".") for n in summary.trainable_names}
    assert got == want
    if method == "hylora":
        assert summary.groups["conv1d"] > 0 and summary.groups["other"] == 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for i in range(5):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.item())
        if i == 1:  # after one update, so that LoRA's A (B was zero) has a gradient too
            for n, p in model.named_parameters():
                assert (p.grad is not None) == p.requires_grad, n
                assert p.grad is None or p.grad.abs().sum() > 0, n
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        final = model(input_ids=IDS, labels=IDS).loss.item()
    assert final < losses[0], (losses, final)


def test_tied_head_follows_embedding():
    model, s = apply_method(build("zamba2"), "lora_plus", rank=4, alpha=8)
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight and base.lm_head.weight.requires_grad
    model, s = apply_method(build("llama"), "lora_plus", rank=4, alpha=8)
    assert not model.get_base_model().lm_head.weight.requires_grad  # untied: LongLoRA leaves it frozen


@pytest.mark.parametrize("arch", ["bamba", "zamba2"])
def test_save_load_round_trip(tmp_path, arch):
    model, _ = apply_method(build(arch), "hylora", rank=4, alpha=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    save_method(model, tmp_path)
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
        assert torch.equal(load_method(build(arch), tmp_path)(input_ids=IDS).logits, ref)
        torch.testing.assert_close(merged(load_method(build(arch), tmp_path))(input_ids=IDS).logits, ref,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["zamba2", "bamba", "harness_hybrid"])
def test_one_attention_layer_is_one_unshared_block(arch):
    v = apply_method(build(arch), "lora")[1].values()
    assert (v["attention_blocks"], v["attention_layers"], v["shared_attention"]) == (1, 1, False)


def _zamba2_shared():
    torch.manual_seed(0)
    return T.Zamba2ForCausalLM(T.Zamba2Config(
        vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
        mamba_d_state=8, mamba_headdim=16, n_mamba_heads=4, mamba_ngroups=1, chunk_size=16,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], num_mem_blocks=1, intermediate_size=64))


def test_zamba2s_tied_attention_block_is_reported_as_shared():
    v = apply_method(_zamba2_shared(), "hylora")[1].values()
    assert (v["attention_blocks"], v["attention_layers"], v["shared_attention"]) == (1, 2, True)


def _saved(path):
    save_method(apply_method(build("bamba"), "hylora", rank=4, alpha=8)[0], path)
    return path


def test_adapters_over_a_tied_weight_are_not_merged(tmp_path):
    """Each of Zamba2's hybrid layers has its own adapter over the one shared block: merging added both layers'
    updates to the shared weight (the merged export's logits were off by 1%)."""
    model, _ = apply_method(_zamba2_shared(), "lora", rank=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    save_method(model, tmp_path)
    ref = model.eval()(input_ids=IDS).logits
    torch.testing.assert_close(load_method(_zamba2_shared(), tmp_path)(input_ids=IDS).logits, ref)
    with pytest.raises(UserError, match=r"share one \(tied\) weight.*without --merge"):
        merged(load_method(_zamba2_shared(), tmp_path))
    # one adapter on an lm_head tied to the embedding: merged, the embedding would carry it too
    def tied_llama():
        torch.manual_seed(0)
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2, tie_word_embeddings=True))

    model, _ = apply_method(tied_llama(), "lora", rank=4, alpha=8, target_modules=["q_proj", "lm_head"])
    save_method(model, tmp_path / "llama")
    with pytest.raises(UserError, match=r"^model.embed_tokens and lm_head.base_layer share one \(tied\) weight"):
        merged(load_method(tied_llama(), tmp_path / "llama"))
    merged(load_method(build("bamba"), _saved(tmp_path / "bamba")))  # nothing tied: merged


# Hybrids beyond the walkthroughs: Mamba-1 + attention + MoE (Jamba), gated DeltaNet + gated attention (Qwen3-Next),
# short convolutions + attention (LFM2), Zamba v1 (one attention block shared by two layers), and a pure SSM.
MORE = {
    "jamba": (lambda: T.JambaForCausalLM(T.JambaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, num_experts=2, num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=4, attn_layer_offset=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
        mamba_dt_rank=4)), (1, 1)),
    "qwen3_next": (lambda: T.Qwen3NextForCausalLM(T.Qwen3NextConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, linear_num_value_heads=2, linear_num_key_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=2,
        num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        layer_types=["linear_attention", "full_attention"])), (1, 1)),
    "lfm2": (lambda: T.Lfm2ForCausalLM(T.Lfm2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, layer_types=["conv", "full_attention"])), (1, 1)),
    "zamba": (lambda: T.ZambaForCausalLM(T.ZambaConfig(  # transformers needs two hybrid layers to tie their block
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, attention_hidden_size=64, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
        mamba_dt_rank=4, n_mamba_heads=2, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"])), (1, 2)),
}


@pytest.mark.parametrize("arch", MORE)
def test_hylora_and_a_sliding_window_reach_more_hybrids(arch):
    """HyLoRA finds each one's attention projections and its depthwise convolutions (LFM2's is named `conv`), every
    trained tensor gets a gradient, and a sliding window replaces the model's own attention (its output differs from
    full attention's, and the backend's kernel is what ran)."""
    from harness.attention.hf import register, uses_attention_interface
    from harness.attention.recording import recording

    build_it, (blocks, layers) = MORE[arch]
    torch.manual_seed(0)
    model = build_it()
    assert uses_attention_interface(model)
    ids = torch.randint(0, V, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.eval()(input_ids=ids).logits
        model.set_attn_implementation(register("sliding_window", window=8))
        with recording() as kernels:
            windowed = model(input_ids=ids).logits
    assert not torch.equal(windowed, full) and any(k.startswith("sliding_window via") for k in kernels), kernels
    model, summary = apply_method(model.train(), "hylora", rank=4, alpha=8)
    assert summary.groups["conv1d"] > 0 and summary.groups["lora"] > 0 and summary.groups["other"] == 0
    assert (summary.attention_blocks, summary.attention_layers) == (blocks, layers)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # the second backward reaches LoRA's A too (B starts at zero)
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum()] == []


def test_a_pure_ssm_has_no_attention_to_replace_or_adapt():
    from harness.attention.hf import uses_attention_interface

    model = T.FalconMambaForCausalLM(T.FalconMambaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                         state_size=8, conv_kernel=4, expand=2, time_step_rank=4))
    assert not uses_attention_interface(model)
    with pytest.raises(UserError, match="no attention projection found"):
        apply_method(model, "hylora")
