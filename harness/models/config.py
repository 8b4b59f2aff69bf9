"""`HybridConfig`: the fields of a mamba_ssm `config.json` (MambaConfig), as a transformers config."""

from dataclasses import field

from transformers import PretrainedConfig
from transformers.generation import GenerationConfig

# mamba_ssm's Mamba2 constructor defaults (the keys an `ssm_cfg` may hold).
SSM_DEFAULTS = {
    "layer": "Mamba2", "d_state": 128, "d_conv": 4, "conv_init": None, "expand": 2, "headdim": 64,
    "d_ssm": None, "ngroups": 1, "A_init_range": [1, 16], "D_has_hdim": False, "rmsnorm": True,
    "norm_before_gate": False, "dt_min": 0.001, "dt_max": 0.1, "dt_init_floor": 1e-4,
    "dt_limit": [0.0, float("inf")], "bias": False, "conv_bias": True, "chunk_size": 256,
    "use_mem_eff_path": True,
}
# mamba_ssm's MHA constructor defaults, except `causal` (an LM must be causal) and our `fused_qkv`.
ATTN_DEFAULTS = {
    "num_heads": None, "num_heads_kv": None, "head_dim": None, "mlp_dim": 0, "qkv_proj_bias": True,
    "out_proj_bias": True, "softmax_scale": None, "causal": True, "d_conv": 0, "rotary_emb_dim": 0,
    "rotary_emb_base": 10000.0, "rotary_emb_interleaved": False, "fused_qkv": True,
}
# Keys transformers itself passes through a config's constructor (saved metadata, loading options).
_TRANSFORMERS_KEYS = {
    "torch_dtype", "name_or_path", "_commit_hash", "attn_implementation", "experts_implementation",
    "output_attentions", "per_layer_config", "num_labels", "_attn_implementation_internal",
    "_experts_implementation_internal", "model_type",
} | set(GenerationConfig._get_default_generation_params())


class HybridConfig(PretrainedConfig):
    """Mamba-2 / attention hybrid LM, laid out like mamba_ssm's MambaLMHeadModel (same defaults)."""

    model_type = "harness_hybrid"
    attribute_map = {"num_hidden_layers": "n_layer", "hidden_size": "d_model"}

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        unknown = sorted(set(kwargs) - _TRANSFORMERS_KEYS)
        if unknown:
            raise ValueError(f"HybridConfig: unknown field {unknown[0]!r}")
        kwargs.pop("model_type", None)
        self.ssm_cfg = _merge("ssm_cfg", SSM_DEFAULTS, self.ssm_cfg)
        self.attn_cfg = _merge("attn_cfg", ATTN_DEFAULTS, self.attn_cfg)
        self.attn_layer_idx = [int(i) for i in self.attn_layer_idx]
        self._validate()
        super().__post_init__(**kwargs)

    def _validate(self) -> None:
        s, a = self.ssm_cfg, self.attn_cfg
        d_inner = s["expand"] * self.d_model
        checks = [
            ("n_layer", self.n_layer > 0), ("d_model", self.d_model > 0), ("vocab_size", self.vocab_size > 0),
            ("d_intermediate", self.d_intermediate >= 0),
            ("pad_vocab_size_multiple", self.pad_vocab_size_multiple > 0),
            ("attn_layer_idx", len(set(self.attn_layer_idx)) == len(self.attn_layer_idx)
             and all(0 <= i < self.n_layer for i in self.attn_layer_idx)),
            ("ssm_cfg.layer", s["layer"] == "Mamba2"),
            ("ssm_cfg.d_ssm", s["d_ssm"] in (None, d_inner)),
            ("ssm_cfg.headdim", s["headdim"] > 0 and d_inner % s["headdim"] == 0),
            ("ssm_cfg.ngroups", s["ngroups"] > 0 and (d_inner // s["headdim"]) % s["ngroups"] == 0),
            ("ssm_cfg.conv_init", s["conv_init"] is None),
            ("ssm_cfg.chunk_size", s["chunk_size"] > 0), ("ssm_cfg.d_conv", s["d_conv"] > 0),
            ("attn_cfg.mlp_dim", a["mlp_dim"] == 0), ("attn_cfg.causal", a["causal"] is True),
            ("attn_cfg.d_conv", a["d_conv"] >= 0),
        ]
        if self.attn_layer_idx:
            nh = a["num_heads"]
            nkv = a["num_heads_kv"] or nh
            hd = a["head_dim"] or (self.d_model // nh if nh else 0)
            checks += [
                ("attn_cfg.num_heads", bool(nh) and nh > 0),
                ("attn_cfg.num_heads_kv", bool(nh) and nh % nkv == 0),
                ("attn_cfg.head_dim", hd > 0),
                ("attn_cfg.rotary_emb_dim", 0 <= a["rotary_emb_dim"] <= hd and a["rotary_emb_dim"] % 2 == 0),
            ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"HybridConfig: invalid field {name!r}")

    @property
    def tie_word_embeddings(self) -> bool:
        return self.tie_embeddings

    @tie_word_embeddings.setter
    def tie_word_embeddings(self, value: bool) -> None:
        self.tie_embeddings = value

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def layer_types(self) -> list[str]:
        """Cache layout for transformers' DynamicCache: Mamba layers hold conv+SSM state, attention KV (+conv)."""
        attn = "hybrid" if self.attn_cfg["d_conv"] > 0 else "full_attention"
        return [attn if i in self.attn_layer_idx else "linear_attention" for i in range(self.n_layer)]


def _merge(name: str, defaults: dict, given: dict | None) -> dict:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"HybridConfig: unknown field '{name}.{unknown[0]}'")
    return {**defaults, **given}
