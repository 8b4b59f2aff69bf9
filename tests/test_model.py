"""The hybrid LM: shapes, loss, caching/generation, attention backends, checkpoint layout, presets."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from harness.errors import UserError
from harness.finetune.loop import checkpoint_activations
from harness.models import HybridConfig, HybridForCausalLM, preset_config
from harness.models.cache_args import output_cache


def _config(fused=True, mlp=0, kv=4, rotary=8, attn_conv=4, **kw):
    return HybridConfig(
        d_model=64, n_layer=3, d_intermediate=mlp, vocab_size=101, attn_layer_idx=[1],
        ssm_cfg={"d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8},
        attn_cfg={"num_heads": 4, "num_heads_kv": kv, "head_dim": 16, "rotary_emb_dim": rotary,
                  "d_conv": attn_conv, "fused_qkv": fused},
        **kw,
    )


CONFIGS = {
    "fused": dict(),
    "unfused-gqa-mlp": dict(fused=False, kv=2, mlp=96),
    "no-conv-no-rotary": dict(attn_conv=0, rotary=0, kv=1),
    "untied-layernorm": dict(tie_embeddings=False, rms_norm=False, residual_in_fp32=False),
}


def _model(name="fused", attn="eager", seed=0):
    torch.manual_seed(seed)
    return HybridForCausalLM.from_config(_config(**CONFIGS[name]), attn_implementation=attn).eval()


def _ids(b=2, l=21, seed=1):
    return torch.randint(0, 101, (b, l), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_loss_hidden_states_and_logits_to_keep(name):
    model, ids = _model(name), _ids()
    out = model(ids, labels=ids, output_hidden_states=True)
    assert out.logits.shape == (2, 21, 104)  # vocab padded to a multiple of 8
    assert len(out.hidden_states) == model.config.n_layer + 1
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 104), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce)
    torch.testing.assert_close(model.get_output_embeddings()(out.hidden_states[-1]), out.logits)
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 104)
    torch.testing.assert_close(last, out.logits[:, -1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_causal(name):
    model, ids = _model(name), _ids()
    changed = ids.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 101
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])
    torch.testing.assert_close(model(ids[:, :1]).logits, a[:, :1])  # one token, no cache


@pytest.mark.parametrize("name", CONFIGS)
def test_eager_equals_sdpa(name):
    ids = _ids()
    eager, sdpa = _model(name, "eager"), _model(name, "sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    torch.testing.assert_close(eager(ids).logits, sdpa(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arg", ["cache", "past_key_values"])  # transformers >= 5.24 / <= 5.23
def test_cached_steps_match_full_forward(name, attn, arg):
    model, ids = _model(name, attn), _ids(l=19)
    full = model(ids).logits
    out = model(ids[:, :11], use_cache=True)  # prefill
    cache, steps = output_cache(out), [out.logits]
    out = model(ids[:, 11:14], **{arg: cache}, use_cache=True)  # several tokens on top of a cache
    steps.append(out.logits)
    for t in range(14, 19):  # one token at a time
        steps.append(model(ids[:, t : t + 1], **{arg: cache}, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["fused", "unfused-gqa-mlp", "no-conv-no-rotary"])
def test_greedy_generate_matches_teacher_forcing(name):
    model, prompt = _model(name, "sdpa"), _ids(b=1, l=9)
    lengths = []
    model.backbone.embedding.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    gen = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 21)
    assert lengths == [9] + [1] * 11  # the cache is used: one token per step
    logits = model(gen).logits
    torch.testing.assert_close(logits[:, 8:-1].argmax(-1), gen[:, 9:])


def test_a_cache_under_an_unknown_name_is_refused():
    model, ids = _model("fused", "sdpa"), _ids(l=5)
    cache = output_cache(model(ids, use_cache=True))
    with pytest.raises(TypeError, match="'layer_past', which this model does not read"):
        model(ids[:, -1:], layer_past=cache, use_cache=True)
    with pytest.raises(TypeError, match="several names"):
        model(ids[:, -1:], cache=cache, past_key_values=cache, use_cache=True)


def test_custom_registered_attention_backend():
    from transformers import AttentionInterface

    from harness.models.attention import eager_attention

    calls = []

    def backend(module, q, k, v, attention_mask, scaling, dropout=0.0, **kw):
        calls.append((q.shape, k.shape))
        return eager_attention(module, q, k, v, attention_mask, scaling)

    AttentionInterface.register("test_hybrid_backend", backend)
    model, ids = _model("unfused-gqa-mlp", "test_hybrid_backend"), _ids()
    torch.testing.assert_close(model(ids).logits, _model("unfused-gqa-mlp")(ids).logits)
    assert calls and calls[0] == ((2, 4, 21, 16), (2, 2, 21, 16))  # GQA heads not expanded


def test_state_dict_keys_are_mamba_ssm_names():
    model = _model("unfused-gqa-mlp")
    mamba = ["mixer.A_log", "mixer.D", "mixer.conv1d.bias", "mixer.conv1d.weight", "mixer.dt_bias",
             "mixer.in_proj.weight", "mixer.norm.weight", "mixer.out_proj.weight"]
    attn = ["mixer.conv1d.bias", "mixer.conv1d.weight", "mixer.k_proj.bias", "mixer.k_proj.weight",
            "mixer.out_proj.bias", "mixer.out_proj.weight", "mixer.q_proj.bias", "mixer.q_proj.weight",
            "mixer.v_proj.bias", "mixer.v_proj.weight"]
    mlp = ["mlp.fc1.weight", "mlp.fc2.weight", "norm.weight", "norm2.weight"]
    expected = {"backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight"}
    for i, names in enumerate([mamba, attn, mamba]):
        expected |= {f"backbone.layers.{i}.{n}" for n in names + mlp}
    assert set(model.state_dict()) == expected
    fused = _model("fused").state_dict()
    assert fused["backbone.layers.1.mixer.in_proj.weight"].shape == (64 + 2 * 64, 64)
    assert fused["backbone.layers.0.mixer.in_proj.weight"].shape == (2 * 128 + 2 * 2 * 8 + 8, 64)


def test_save_and_load_roundtrip(tmp_path):
    model, ids = _model("unfused-gqa-mlp"), _ids()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert isinstance(loaded, HybridForCausalLM) and loaded.config.attn_cfg == model.config.attn_cfg
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_gradient_reaches_every_parameter_with_checkpointing():
    model = _model("unfused-gqa-mlp").train()
    checkpoint_activations(model)
    model(_ids(), labels=_ids()).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_mamba_ssm_initialisation():
    mixer = _model().backbone.layers[0].mixer
    A = torch.exp(mixer.A_log)
    dt = F.softplus(mixer.dt_bias)
    assert ((A >= 1) & (A <= 16)).all() and ((dt >= 1e-3 - 1e-6) & (dt <= 0.1 + 1e-6)).all()
    assert (mixer.D == 1).all()
    # out_proj and fc2 (residual outputs) at 1/sqrt(fan_in) / sqrt(2 residuals per layer x 3 layers) with an MLP
    model = _model("unfused-gqa-mlp")
    for linear in (model.backbone.layers[0].mixer.out_proj, model.backbone.layers[1].mlp.fc2):
        bound = linear.in_features**-0.5 / 6**0.5
        assert 0.9 * bound < linear.weight.abs().max() <= bound


def test_left_padding_is_refused():
    model = _model()
    mask = torch.ones(2, 21, dtype=torch.long)
    model(_ids(), attention_mask=mask)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="right-padded"):
        model(_ids(), attention_mask=mask)


def test_config_rejects_unknown_and_invalid_fields():
    with pytest.raises(ValueError, match="'d_modle'"):
        HybridConfig(d_modle=3)
    with pytest.raises(ValueError, match="'ssm_cfg.dstate'"):
        HybridConfig(ssm_cfg={"dstate": 3})
    with pytest.raises(ValueError, match="'attn_cfg.num_heads_kv'"):
        HybridConfig(d_model=64, n_layer=2, attn_layer_idx=[0], attn_cfg={"num_heads": 4, "num_heads_kv": 3})


def test_presets():
    cfg = preset_config("tiny-hybrid")
    assert cfg.d_model == 128 and cfg.attn_layer_idx == [1, 3] and cfg.layer_types[1] == "hybrid"
    assert preset_config("mamba2attn-2.7b").padded_vocab_size == 50288
    with pytest.raises(UserError, match="Did you mean 'tiny-hybrid'"):
        preset_config("tiny-hybird")


def test_under_bf16_autocast_the_scan_and_attention_run_in_bf16_and_dt_stays_fp32(monkeypatch):
    """As with mamba_ssm's kernels on CUDA: the conv's output keeps the projection's bf16, so the SSD scan and
    attention see bf16 inputs, while dt (softplus of dt + dt_bias) reaches the scan in fp32, unrounded."""
    from harness.models import mamba2

    seen = {}
    scan = mamba2.ssd_scan
    monkeypatch.setattr(mamba2, "ssd_scan", lambda x, dt, *a, **kw: seen.setdefault("scan", (x.dtype, dt.dtype))
                        and scan(x, dt, *a, **kw))
    model = _model(attn="sdpa")
    model.backbone.layers[1].mixer.out_proj.register_forward_pre_hook(
        lambda module, args: seen.setdefault("attention output", args[0].dtype) and None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(input_ids=_ids()).logits.isfinite().all()
    assert seen == {"scan": (torch.bfloat16, torch.float32), "attention output": torch.bfloat16}


def test_config_bounds_and_mamba_ssms_defaults():
    assert HybridConfig(vocab_size=64, pad_vocab_size_multiple=8).padded_vocab_size == 64  # already a multiple
    assert HybridConfig(vocab_size=65, pad_vocab_size_multiple=8).padded_vocab_size == 72
    assert _config(attn_conv=0).layer_types == ["linear_attention", "full_attention", "linear_attention"]
    assert _config(attn_conv=4).layer_types == ["linear_attention", "hybrid", "linear_attention"]
    assert _config(rotary=16).attn_cfg["rotary_emb_dim"] == 16  # rotary over the whole head
    with pytest.raises(ValueError, match="'attn_cfg.rotary_emb_dim'"):
        _config(rotary=18)
    with pytest.raises(ValueError, match="'attn_layer_idx'"):
        HybridConfig(d_model=64, n_layer=2, attn_layer_idx=[2], attn_cfg={"num_heads": 4})
    # what a mamba_ssm config.json leaves out (its ssm_cfg is often just {"layer": "Mamba2"}) is Mamba2's default
    assert {k: v for k, v in HybridConfig().ssm_cfg.items() if k in (
        "d_state", "d_conv", "expand", "headdim", "ngroups", "A_init_range", "dt_min", "dt_max", "chunk_size")} == {
        "d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1, "A_init_range": [1, 16],
        "dt_min": 0.001, "dt_max": 0.1, "chunk_size": 256}


def test_attention_block_is_causal_softmax_attention_at_one_over_sqrt_head_dim():
    """Without rotary and conv, the block is out_proj of causal attention at mamba_ssm's default scale, its one
    key/value head shared by all four query heads."""
    att = _model("no-conv-no-rotary").backbone.layers[1].mixer
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))
    q, k, v = att.in_proj(x).split([64, 16, 16], dim=-1)
    q = q.view(2, 9, 4, 16).transpose(1, 2)
    k, v = (t.view(2, 9, 1, 16).transpose(1, 2).expand(2, 4, 9, 16) for t in (k, v))
    want = att.out_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 9, 64))
    torch.testing.assert_close(att(x), want, atol=1e-5, rtol=1e-5)


def test_gated_mlp_and_gated_norm_are_mamba_ssms():
    """GatedMLP: hidden width rounded up to 128, fc1's first half the value, its second the gate. RMSNormGated
    with ngroups > 1: each group of features has its own RMS."""
    from harness.models.mamba2 import RMSNorm
    from harness.models.modeling import GatedMLP

    mlp = GatedMLP(16, 48)
    assert mlp.fc1.weight.shape == (256, 16) and mlp.fc2.weight.shape == (16, 128)
    x = torch.randn(2, 3, 16)
    h = x @ mlp.fc1.weight.T
    torch.testing.assert_close(mlp(x), (h[..., :128] * F.silu(h[..., 128:])) @ mlp.fc2.weight.T)
    norm = RMSNorm(8, group_size=4)
    x, z = torch.randn(3, 8), torch.randn(3, 8)
    gated = x * F.silu(z)
    want = torch.cat([g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5) for g in gated.split(4, -1)], -1)
    torch.testing.assert_close(norm(x, z), want)


def test_dt_limit_clamps_the_step_sizes_the_scan_gets(monkeypatch):
    """mamba_ssm clamps softplus(dt + dt_bias) to ssm_cfg.dt_limit when it is not the default (0, inf)."""
    from harness.models import mamba2

    seen = []
    scan = mamba2.ssd_scan
    monkeypatch.setattr(mamba2, "ssd_scan", lambda x, dt, *a, **kw: seen.append(dt) or scan(x, dt, *a, **kw))
    for limit in ([0.0, float("inf")], [0.02, 0.05]):
        torch.manual_seed(0)
        cfg = _config()
        cfg.ssm_cfg["dt_limit"] = limit
        HybridForCausalLM(cfg).eval()(_ids())
    free, clamped = torch.cat([dt.flatten() for dt in seen[:2]]), torch.cat([dt.flatten() for dt in seen[2:]])
    assert free.min() < 0.02 and free.max() > 0.05  # so the limit has something to clamp
    assert clamped.min() >= 0.02 and clamped.max() <= 0.05
