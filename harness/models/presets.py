"""Named model configurations."""

import difflib

from harness.errors import UserError

from .config import HybridConfig

PRESETS: dict[str, dict] = {
    # The embedded default: pretrains on CPU in minutes at context 512 with a 4096-token BPE vocabulary.
    "tiny-hybrid": {
        "d_model": 128, "n_layer": 4, "d_intermediate": 0, "vocab_size": 4096, "attn_layer_idx": [1, 3],
        "ssm_cfg": {"layer": "Mamba2", "d_state": 32, "d_conv": 4, "expand": 2, "headdim": 32, "ngroups": 1,
                    "chunk_size": 64},
        "attn_cfg": {"num_heads": 4, "num_heads_kv": 4, "head_dim": 32, "rotary_emb_dim": 16, "d_conv": 4,
                     "causal": True},
        "tie_embeddings": True,
    },
    # The paper's Mamba-2-Hybrid 2.7B layout (state-spaces/mamba2attn-2.7b).
    "mamba2attn-2.7b": {
        "d_model": 2560, "n_layer": 64, "d_intermediate": 0, "vocab_size": 50277, "pad_vocab_size_multiple": 16,
        "attn_layer_idx": [9, 18, 27, 36, 45, 56],
        "ssm_cfg": {"layer": "Mamba2", "d_state": 128, "headdim": 64, "ngroups": 1, "expand": 2},
        "attn_cfg": {"num_heads": 30, "head_dim": 128, "rotary_emb_dim": 64, "d_conv": 4, "causal": True,
                     "qkv_proj_bias": False, "out_proj_bias": False},
        "tie_embeddings": True,
    },
}


# The presets a suite may name to have the harness pretrain them (on a CPU, in minutes); the others are layouts
# (tests, parameter counts). A suite's `mamba2attn-2.7b` is the paper's checkpoint (harness.models.sources.NAMED).
PRETRAINABLE = ("tiny-hybrid",)


def preset_config(name: str) -> HybridConfig:
    """The HybridConfig of a named preset; UserError with a suggestion for an unknown name."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown model preset {name!r}.{hint} Available: {', '.join(sorted(PRESETS))}")
    return HybridConfig(**PRESETS[name])
