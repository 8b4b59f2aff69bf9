"""Load a mamba_ssm checkpoint directory (e.g. state-spaces/mamba2attn-2.7b) into `HybridForCausalLM`.

Such a directory holds mamba_ssm's `config.json` (MambaConfig's fields: d_model, n_layer, vocab_size,
ssm_cfg, attn_layer_idx, attn_cfg, d_intermediate, rms_norm, residual_in_fp32, fused_add_norm,
pad_vocab_size_multiple, tie_embeddings; no model_type) and the weights of MambaLMHeadModel in
`model.safetensors` or `pytorch_model.bin` (or shards listed by an index), whose parameter names are ours.
Loading is strict: every missing, unexpected or misshapen tensor is reported. A tied lm_head may be absent from the file
(safetensors drops shared tensors); if present it must equal the embedding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.errors import UserError

from .config import HybridConfig
from .modeling import HybridForCausalLM

CONFIG = "config.json"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # first found wins
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # sharded: these list the shards
# Fields every mamba_ssm config.json states: MambaConfig (and HybridConfig) default them to the 2.7B model's, so a
# config without one would load as a model of another size and fail only on the weights' shapes, if at all.
REQUIRED = ("d_model", "n_layer", "vocab_size")


def load_mamba_ssm_config(path: str | Path) -> HybridConfig:
    """The HybridConfig of a mamba_ssm checkpoint directory's config.json."""
    file = Path(path) / CONFIG
    if not file.is_file():
        raise UserError(f"{Path(path)}: no {CONFIG} (expected a mamba_ssm checkpoint directory)")
    try:
        fields = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(fields, dict):
        raise UserError(f"{file}: expected a JSON object")
    model_type = fields.pop("model_type", None)  # a config re-saved by transformers may carry one
    if missing := [k for k in REQUIRED if k not in fields]:
        fix = (f"it is a transformers config (model_type {model_type!r}): `format: hf` (or auto)" if model_type
               else "the checkpoint's own config.json")
        raise UserError(f"{file}: no {', '.join(missing)} (a mamba_ssm config states {', '.join(REQUIRED)}); "
                        f"fix: {fix}")
    try:
        return HybridConfig(**fields)
    except (ValueError, TypeError) as e:
        raise UserError(f"{file}: {e}") from None


def _read_weights(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the file named in errors, every tensor): one weights file, or every shard an index lists."""
    for name in INDEXES:
        index = path / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{index}: not a shard index with a weight_map ({type(e).__name__}: {e})") from None
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (path / shard).is_file():
                    raise UserError(f"{index} lists {shard}, which is missing; fix: download every shard")
                state.update(_read_file(path / shard))
            return index, state
    for name in WEIGHTS:
        if (path / name).is_file():
            return path / name, _read_file(path / name)
    found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
    raise UserError(f"{path}: no weights ({' or '.join(WEIGHTS)}, or a shard index; found {found})")


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # corrupt or truncated file, pickle with disallowed objects, ...
        raise UserError(f"{file}: cannot read weights ({type(e).__name__}: {e})") from None


def load_mamba_ssm_checkpoint(path: str | Path, dtype: torch.dtype | None = None,
                              keep_fp32: tuple[str, ...] = ()) -> HybridForCausalLM:
    """HybridForCausalLM with the weights of a mamba_ssm checkpoint directory, in eval mode.

    dtype: the model's dtype (default: the checkpoint's first floating dtype, e.g. bf16 stays bf16); parameters
    whose name ends in one of `keep_fp32` stay float32 (mamba_ssm keeps A_log, D and dt_bias so).
    """
    path = Path(path)
    config = load_mamba_ssm_config(path)
    file, state = _read_weights(path)
    if isinstance(state, dict) and list(state) == ["state_dict"]:  # before the check below, which it would fail
        raise UserError(f"{file}: a training checkpoint wrapping a 'state_dict', not a model's weights")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{file}: not a state dict of tensors")
    state = dict(state)
    if dtype is None:
        floats = [v.dtype for v in state.values() if v.is_floating_point()]
        dtype = floats[0] if floats else torch.float32

    with torch.device("meta"):  # no random init of billions of parameters that are overwritten anyway
        model = HybridForCausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = config.tie_embeddings
    emb, head = "backbone.embedding.weight", "lm_head.weight"
    if tied and head not in state and emb in state:
        state[head] = state[emb]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(s)}"
              for k, s in expected.items() if k in state and tuple(state[k].shape) != tuple(s)]
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
                 if items]
        raise UserError(f"{file} does not match the model of {path / CONFIG}: " + "; ".join(parts))
    if tied and state[head] is not state[emb] and not torch.equal(state[head], state[emb]):
        raise UserError(f"{file}: {head} differs from {emb} but {CONFIG} has tie_embeddings=true")

    state = {k: v.to(torch.float32 if k.rsplit(".", 1)[-1] in keep_fp32 and v.is_floating_point() else dtype)
             for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.backbone.embedding.weight
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # cannot happen with strict loading unless the model grows non-persistent buffers
        raise RuntimeError(f"tensors left uninitialised after loading {file}: {leftover[:5]}")
    return model.eval()
