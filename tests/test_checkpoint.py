import json

import pytest
import torch

from harness.errors import UserError
from harness.models import HybridConfig, HybridForCausalLM
from harness.models.checkpoint import load_mamba_ssm_checkpoint

# config.json as mamba_ssm's MambaLMHeadModel.save_pretrained writes it: json.dump(MambaConfig.__dict__), i.e.
# exactly these fields, the sub-configs as the user gave them (no defaults filled in), no model_type.
MAMBA_SSM_CONFIG = {
    "d_model": 32, "d_intermediate": 48, "n_layer": 3, "vocab_size": 100,
    "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8},
    "attn_layer_idx": [1],
    "attn_cfg": {"causal": True, "d_conv": 4, "head_dim": 16, "num_heads": 2, "out_proj_bias": False,
                 "qkv_proj_bias": False, "rotary_emb_dim": 8},
    "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
    "tie_embeddings": True,
}
IDS = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))


def write_checkpoint(path, fmt="bin", config=MAMBA_SSM_CONFIG, edit=None):
    """A random model saved like mamba_ssm (torch.save of state_dict, tied lm_head included) or as a
    safetensors conversion (shared tensors dropped, so no lm_head.weight when tied). Returns the model."""
    torch.manual_seed(1)
    model = HybridForCausalLM(HybridConfig(**config)).eval()
    with torch.no_grad():  # make every tensor distinctive (norm weights start at one, D at one, ...)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=4))
    state = model.state_dict()
    assert "lm_head.weight" in state
    if edit:
        edit(state)
    if fmt == "bin":
        torch.save(state, path / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file
        if config["tie_embeddings"]:
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return model


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_gives_identical_logits(tmp_path, fmt, tied):
    config = {**MAMBA_SSM_CONFIG, "tie_embeddings": tied}
    ref = write_checkpoint(tmp_path, fmt, config)
    model = load_mamba_ssm_checkpoint(tmp_path)
    assert not model.training
    assert (model.lm_head.weight is model.backbone.embedding.weight) == tied
    assert model.config.padded_vocab_size == 112 and model.config.d_intermediate == 48
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    assert all(not p.is_meta for p in model.parameters())


def test_dtype_follows_checkpoint(tmp_path):
    write_checkpoint(tmp_path, "bin", edit=lambda s: s.update({k: v.bfloat16() for k, v in s.items()}))
    assert load_mamba_ssm_checkpoint(tmp_path).lm_head.weight.dtype == torch.bfloat16
    assert load_mamba_ssm_checkpoint(tmp_path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("backbone.layers.0.mixer.conv1d.weight"), r"missing \(1\): backbone.layers.0.mixer.conv1d.weight"),
    (lambda s: s.update({"backbone.layers.0.mixer.extra": torch.zeros(2)}), r"unexpected \(1\): .*mixer.extra"),
    (lambda s: s.update({"backbone.layers.1.mixer.out_proj.weight": torch.zeros(32, 16)}),
     r"wrong shape \(1\): backbone.layers.1.mixer.out_proj.weight: file \(32, 16\) vs model \(32, 32\)"),
    (lambda s: s.update({"lm_head.weight": torch.zeros_like(s["lm_head.weight"])}), "differs from"),
])
def test_mismatched_weights_are_user_errors(tmp_path, edit, message):
    write_checkpoint(tmp_path, "bin", edit=edit)
    with pytest.raises(UserError, match=message) as e:
        load_mamba_ssm_checkpoint(tmp_path)
    assert "pytorch_model.bin" in str(e.value)


def test_missing_files_and_bad_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_mamba_ssm_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(MAMBA_SSM_CONFIG))
    with pytest.raises(UserError, match="no weights"):
        load_mamba_ssm_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**MAMBA_SSM_CONFIG, "d_modle": 3}))
    with pytest.raises(UserError, match="config.json.*d_modle"):
        load_mamba_ssm_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in MAMBA_SSM_CONFIG.items() if k != "n_layer"}))
    with pytest.raises(UserError, match="config.json: no n_layer"):
        load_mamba_ssm_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="invalid JSON"):
        load_mamba_ssm_checkpoint(tmp_path)


def test_a_sharded_checkpoint_loads_every_shard_its_index_lists(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = write_checkpoint(tmp_path, "safetensors")
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with torch.no_grad():
        assert torch.equal(load_mamba_ssm_checkpoint(tmp_path)(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match=r"model.safetensors.index.json lists model-00002-of-00002.safetensors, which "
                                        "is missing; fix: download every shard"):
        load_mamba_ssm_checkpoint(tmp_path)


def test_ssm_parameters_stay_float32_in_a_half_precision_model(tmp_path):
    """As mamba_ssm keeps them: A_log, D and dt_bias are read into float32 from the file (not through bf16)."""
    from harness.models.sources import KEEP_FP32

    ref = write_checkpoint(tmp_path, "bin")
    model = load_mamba_ssm_checkpoint(tmp_path, dtype=torch.bfloat16, keep_fp32=KEEP_FP32)
    want = dict(ref.named_parameters())
    kept = [n for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in KEEP_FP32]
    assert len(kept) == 3 * 2  # two Mamba layers
    for n, p in model.named_parameters():
        if n in kept:
            assert p.dtype == torch.float32 and torch.equal(p, want[n]), n
        else:
            assert p.dtype == torch.bfloat16, n


def test_a_training_checkpoint_wrapping_a_state_dict_is_named_as_such(tmp_path):
    def wrap(state):
        weights = dict(state)
        state.clear()
        state["state_dict"] = weights

    write_checkpoint(tmp_path, "bin", edit=wrap)
    with pytest.raises(UserError, match="pytorch_model.bin: a training checkpoint wrapping a 'state_dict', not a "
                                        "model's weights"):
        load_mamba_ssm_checkpoint(tmp_path)
