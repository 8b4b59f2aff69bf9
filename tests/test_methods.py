import json

import pytest
import torch

from harness.errors import UserError
from harness.export import merged
from harness.finetune.loop import checkpoint_activations
from harness.finetune.methods import (
    METHODS,
    PAPER_DEFAULTS,
    apply_method,
    default_lr,
    load_method,
    save_method,
)
from harness.models import HybridConfig, HybridForCausalLM


def tiny(fused=True, attn_conv=0, seed=0, d_intermediate=0):
    cfg = HybridConfig(d_model=32, n_layer=3, vocab_size=64, attn_layer_idx=[1], d_intermediate=d_intermediate,
                       ssm_cfg={"d_state": 8, "headdim": 16, "chunk_size": 8},
                       attn_cfg={"num_heads": 2, "head_dim": 16, "rotary_emb_dim": 8, "fused_qkv": fused,
                                 "d_conv": attn_conv})
    torch.manual_seed(seed)
    return HybridForCausalLM(cfg)


IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def base_names(model):
    """Trainable names with PEFT's prefixes and wrappers removed: names of the original model."""
    return {n.removeprefix("base_model.model.").replace(".base_layer.", ".") for n, p in model.named_parameters()
            if p.requires_grad}


def expected(method, fused=True, attn_conv=0):
    """The trainable set by LongLoRA-style name rules, written out independently of the discovery code."""
    names = set(dict(tiny(fused, attn_conv).named_parameters()))
    projs = ["in_proj"] if fused else ["q_proj", "k_proj", "v_proj"]
    lora = {f"backbone.layers.1.mixer.{m}.lora_{ab}.default.weight" for m in [*projs, "out_proj"] for ab in "AB"}
    emb = {n for n in names if "embedding" in n}
    norms = {n for n in names if "norm" in n}
    conv = {n for n in names if "conv1d" in n}
    return {"lora": lora, "lora_plus": lora | emb | norms, "hylora": lora | emb | norms | conv, "full": names}[method]


def step(model, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fused,attn_conv", [(True, 0), (False, 4)])
def test_trainable_set_and_gradients(method, fused, attn_conv):
    model, summary = apply_method(tiny(fused, attn_conv), method, rank=4, alpha=8)
    assert base_names(model) == expected(method, fused, attn_conv)
    assert summary.trainable_names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert summary.trainable_params == sum(summary.groups.values())
    assert summary.values()["trainable_by_group"] == summary.groups
    assert summary.total_params == sum(p.numel() for p in tiny(fused, attn_conv).parameters()) + summary.groups["lora"]
    step(model)  # lora_B starts at zero, so lora_A's first gradient is zero: look after one update
    model(input_ids=IDS, labels=IDS).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_groups_and_tied_head():
    model, s = apply_method(tiny(attn_conv=4), "hylora", rank=4, alpha=8)
    base = model.get_base_model()
    assert base.lm_head.weight is base.backbone.embedding.weight and base.lm_head.weight.requires_grad
    assert s.groups["embeddings"] == base.backbone.embedding.weight.numel()
    assert s.groups["other"] == 0
    # the Mamba mixers' gated norm is a norm (LongLoRA: "norm" in the name); the attention conv is a conv1d
    assert any(".mixer.norm." in n for n in s.group_names["norms"])
    assert any(".layers.1.mixer.conv1d." in n for n in s.group_names["conv1d"])
    assert s.groups["lora"] == 4 * (32 + 96) + 4 * (32 + 32)  # in_proj 32->96 and out_proj 32->32 at r=4


@pytest.mark.parametrize("method", METHODS)
def test_what_trains_is_fp32_in_a_bf16_model(method):
    # a checkpoint loaded in bf16: AdamW steps on bf16 norms near 1 round away, and FSDP2 refuses mixed units
    model, _ = apply_method(tiny(attn_conv=4).to(torch.bfloat16), method, rank=4, alpha=8)
    trains = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trains == {torch.float32} and frozen <= {torch.bfloat16}
    base = model.get_base_model() if method != "full" else model
    assert base.lm_head.weight is base.backbone.embedding.weight


@pytest.mark.parametrize("method", ["lora_plus", "hylora"])
def test_forward_reads_the_trained_weights(method):
    """Every fully trained tensor is the one the forward uses: perturbing it changes the logits."""
    model, s = apply_method(tiny(attn_conv=4), method, rank=4, alpha=8)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
        params = dict(model.named_parameters())
        for g in ("embeddings", "norms", "conv1d"):
            for n in s.group_names[g]:
                p = params[n]
                p.add_(0.5)
                assert not torch.allclose(model(input_ids=IDS).logits, ref), n
                p.sub_(0.5)


def test_lora_plus_loss_falls():
    model, _ = apply_method(tiny(), "lora_plus", rank=4, alpha=8)
    with torch.no_grad():
        before = model(input_ids=IDS, labels=IDS).loss.item()
    for _ in range(5):
        step(model)
    with torch.no_grad():
        assert model(input_ids=IDS, labels=IDS).loss.item() < before


def test_explicit_targets_and_extra_trainable():
    model, s = apply_method(tiny(), "lora", rank=2, alpha=4, target_modules=["out_proj"],
                            extra_trainable=[r"\.dt_bias$", r"layers\.0\.mixer\.D$"])
    # "out_proj" is a suffix: every layer's out_proj (Mamba and attention), as PEFT matches
    assert {n.split(".lora_")[0] for n in s.group_names["lora"]} == {
        f"base_model.model.backbone.layers.{i}.mixer.out_proj" for i in range(3)}
    assert sorted(s.group_names["other"]) == sorted(
        [f"base_model.model.backbone.layers.{i}.mixer.dt_bias" for i in (0, 2)]
        + ["base_model.model.backbone.layers.0.mixer.D"])
    _, s = apply_method(tiny(), "lora", target_modules=r"backbone\.layers\.1\.mixer\.in_proj")
    assert len(s.group_names["lora"]) == 2


def test_user_errors():
    with pytest.raises(UserError, match="did you mean 'lora'"):
        apply_method(tiny(), "lorra")
    with pytest.raises(UserError, match="rank"):
        apply_method(tiny(), "lora", rank=0)
    with pytest.raises(UserError, match="alpha"):
        apply_method(tiny(), "hylora", alpha=0)
    with pytest.raises(UserError, match="no module named 'q_prj'"):
        apply_method(tiny(), "lora", target_modules=["q_prj"])
    with pytest.raises(UserError, match="no module named 'proj'"):  # a suffix is whole name parts, as PEFT's
        apply_method(tiny(), "lora", target_modules=["proj"])
    with pytest.raises(UserError, match=r"linear layers only \(nn.Linear, transformers' Conv1D\); "
                                        r"'backbone.*conv1d' is Conv1d"):
        apply_method(tiny(), "lora", target_modules=["conv1d"])
    with pytest.raises(UserError, match="matches no module"):
        apply_method(tiny(), "lora", target_modules=r"nothing\.here")
    with pytest.raises(UserError, match="matches no parameter"):
        apply_method(tiny(), "lora_plus", extra_trainable=["conv2d"])
    with pytest.raises(UserError, match="no effect"):
        apply_method(tiny(), "full", extra_trainable=["conv1d"])
    no_attn = HybridForCausalLM(HybridConfig(d_model=32, n_layer=2, vocab_size=64,
                                             ssm_cfg={"d_state": 8, "headdim": 16, "chunk_size": 8}))
    with pytest.raises(UserError, match="no attention projection"):
        apply_method(no_attn, "hylora")


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(tmp_path, method):
    model, _ = apply_method(tiny(attn_conv=4), method, rank=4, alpha=8)
    for _ in range(2):
        step(model)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
        assert not torch.allclose(ref, tiny(attn_conv=4)(input_ids=IDS).logits)
    save_method(model, tmp_path / "m")
    loaded = load_method(tiny(attn_conv=4), tmp_path / "m")
    assert not any(m.training for m in loaded.modules())  # loaded for evaluation
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, ref)
    plain = merged(load_method(tiny(attn_conv=4), tmp_path / "m"))
    assert not any(".lora_" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, ref, atol=1e-5, rtol=1e-5)


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not a saved fine-tuning method"):
        load_method(tiny(), tmp_path)
    model, _ = apply_method(tiny(attn_conv=4), "hylora", rank=4, alpha=8)
    save_method(model, tmp_path / "m")
    with pytest.raises(UserError, match="does not fit"):
        load_method(tiny(attn_conv=0), tmp_path / "m")  # the model has no attention conv1d


def test_paper_defaults():
    assert default_lr("s2_attn") == 2e-5 and default_lr("se_attn") == default_lr("full") == 2e-4
    assert PAPER_DEFAULTS["mamba2attn-2.7b"]["rank"] == 32 and PAPER_DEFAULTS["mamba2attn-2.7b"]["alpha"] == 64
    assert (PAPER_DEFAULTS["llama-7b"]["rank"], PAPER_DEFAULTS["llama-7b"]["alpha"]) == (8, 16)


@pytest.mark.parametrize("method", ["lora", "hylora"])
def test_gradient_checkpointing_still_reaches_every_trainable_parameter(method):
    # With frozen embeddings, reentrant checkpointing would cut the graph before the adapters.
    torch.manual_seed(0)
    model = HybridForCausalLM(HybridConfig(d_model=32, n_layer=3, vocab_size=64, attn_layer_idx=[1],
                                           ssm_cfg={"d_state": 8, "headdim": 16, "chunk_size": 8},
                                           attn_cfg={"num_heads": 2, "head_dim": 16, "rotary_emb_dim": 8}))
    checkpoint_activations(model)
    peft_model, _ = apply_method(model, method, rank=4, alpha=8)
    peft_model.train()
    ids = torch.randint(0, 64, (2, 16))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    for name, p in peft_model.named_parameters():
        if p.requires_grad and "lora_A" not in name:  # lora_B starts at 0, so A's first gradient is 0
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_lora_on_a_model_without_attention_says_what_to_use():
    from harness.finetune.methods import attention_targets

    with pytest.raises(UserError, match="no attention projection found .* fix: the method `full`"):
        attention_targets(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_applying_and_loading_lora_warn_about_nothing_a_user_can_act_on(tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model, _ = apply_method(tiny(), "lora", rank=4, alpha=8)
        save_method(model, tmp_path / "a")
        load_method(tiny(), tmp_path / "a")
    assert [str(w.message) for w in seen] == []


def test_lora_adapts_gpt2s_transposed_conv1d_projections():
    """GPT-2's attention projections are transformers' Conv1D (a linear with its weight transposed): LoRA's default
    targets, adapted as PEFT does (fan_in_fan_out), with gradients reaching every adapter."""
    import warnings

    import transformers

    from harness.finetune.methods import attention_targets

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16,
                                                                 n_layer=2, n_head=2, attn_pdrop=0.0))
    assert attention_targets(model) == [f"transformer.h.{i}.attn.{p}" for i in (0, 1) for p in ("c_attn", "c_proj")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's note that it sets fan_in_fan_out is expected, and silenced
        trained, summary = apply_method(model, "lora", rank=2, alpha=4)
    assert summary.groups["lora"] == summary.trainable_params > 0
    assert (summary.attention_blocks, summary.attention_layers) == (2, 2)  # the train record counts them
    x = torch.randint(0, 64, (1, 16))
    trained(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in trained.named_parameters() if "lora_B" in n}  # A gets none while B is 0
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(model.config)
    _, summary = apply_method(model, "lora", rank=2, alpha=4, target_modules=["c_attn"])  # named: adapted the same way
    assert {n.split(".lora_")[0] for n in summary.group_names["lora"]} == {
        f"base_model.model.transformer.h.{i}.attn.c_attn" for i in (0, 1)}


def test_unused_settings_name_what_each_method_ignores():
    """`full` trains no adapter: neither its LR scale nor LoRA's rank and alpha change it (nor its cache key)."""
    from harness.finetune.methods import unused_settings

    assert unused_settings("full") == ("extra_lr_scale", "rank", "alpha")
    assert unused_settings("lora") == ("extra_lr_scale",)
    assert unused_settings("lora_plus") == unused_settings("hylora") == ()


def test_an_attention_module_called_from_two_layers_is_one_shared_block():
    cfg = HybridConfig(d_model=32, n_layer=3, vocab_size=64, attn_layer_idx=[0, 2],
                       ssm_cfg={"d_state": 8, "headdim": 16, "chunk_size": 8},
                       attn_cfg={"num_heads": 2, "head_dim": 16})
    model = HybridForCausalLM(cfg)
    model.backbone.layers[2].mixer = model.backbone.layers[0].mixer  # one module reached from two layers
    v = apply_method(model, "lora", rank=4, alpha=8)[1].values()
    assert (v["attention_blocks"], v["attention_layers"], v["shared_attention"]) == (1, 2, True)


@pytest.mark.parametrize("method", ["lora", "hylora", "full"])
def test_saved_files_hold_the_adapter_and_only_the_fully_trained_tensors(tmp_path, method):
    """The description names the method and LoRA's shape; trainable_params.safetensors holds the fully trained base
    tensors by base-model name (none for lora), not the frozen weights nor the adapter (which has its own file)."""
    from safetensors.torch import load_file

    from harness.finetune.methods import EXTRA_FILE, META_FILE

    model, s = apply_method(tiny(attn_conv=4), method, rank=4, alpha=8)
    save_method(model, tmp_path)
    fully = sorted(n.removeprefix("base_model.model.") for g in ("embeddings", "norms", "conv1d", "other")
                   for n in s.group_names[g])
    assert bool(fully) == (method != "lora")
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta == {"format": 1, "method": method, "rank": 4, "alpha": 8, "peft": method != "full",
                    "extra_params": fully}
    assert sorted(load_file(tmp_path / EXTRA_FILE)) == fully
    if method != "full":
        adapter = load_file(tmp_path / "adapter_model.safetensors")
        assert len(adapter) == len(s.group_names["lora"]) and all(".lora_" in k for k in adapter)


def test_a_saved_method_that_does_not_fit_its_description_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from harness.finetune.methods import EXTRA_FILE

    model, _ = apply_method(tiny(attn_conv=4), "hylora", rank=4, alpha=8)
    save_method(model, tmp_path)
    file = tmp_path / EXTRA_FILE
    state = load_file(file)
    save_file({**state, "backbone.norm_f.weight": torch.ones(31)}, file)
    with pytest.raises(UserError, match=r"shape mismatches \['backbone.norm_f.weight: saved \(31,\) vs model "
                                        r"\(32,\)'\]"):
        load_method(tiny(attn_conv=4), tmp_path)
    del state["backbone.norm_f.weight"]
    save_file(state, file)
    with pytest.raises(UserError, match=r"missing \['backbone.norm_f.weight'\]"):
        load_method(tiny(attn_conv=4), tmp_path)


def test_lora_adapters_have_the_asked_shape_and_scale_and_no_dropout():
    """LongLoRA's LoraConfig: r and alpha as given (default r=8, alpha=16), so the update is scaled by alpha / r, and
    lora_dropout 0."""
    for kwargs, (r, alpha) in (({"rank": 4, "alpha": 32}, (4, 32)), ({}, (8, 16))):
        model, _ = apply_method(tiny(), "hylora", **kwargs)
        cfg = model.peft_config["default"]
        assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (r, alpha, 0.0)
        layer = model.get_base_model().backbone.layers[1].mixer.out_proj
        assert layer.scaling["default"] == alpha / r and layer.lora_A["default"].weight.shape[0] == r


def test_full_trains_parameters_that_were_frozen_before():
    model = tiny()
    model.backbone.embedding.weight.requires_grad_(False)
    model.backbone.layers[0].mixer.D.requires_grad_(False)
    model, s = apply_method(model, "full")
    assert all(p.requires_grad for p in model.parameters())
    assert s.trainable_params == s.total_params


def test_a_method_whose_fully_trained_group_is_absent_is_refused():
    """HyLoRA on a model with no nn.Conv1d would silently be LoRA+: refused, as is LoRA+ without norms."""
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1,
                                                                n_head=2))
    with pytest.raises(UserError, match="no conv1d layers to train .*hylora would equal lora_plus"):
        apply_method(gpt2, "hylora")
    apply_method(gpt2, "lora_plus")  # embeddings and LayerNorms: fine
