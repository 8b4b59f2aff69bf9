"""The hybrid LM as a transformers model, with mamba_ssm MambaLMHeadModel's module tree and parameter names."""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .attention import Attention
from .cache_args import CACHE_NAMES, OUTPUT_FIELD, take_cache
from .config import HybridConfig
from .mamba2 import Mamba2, RMSNorm


def _norm(config: HybridConfig) -> nn.Module:
    if config.rms_norm:
        return RMSNorm(config.d_model, eps=config.norm_epsilon)
    return nn.LayerNorm(config.d_model, eps=config.norm_epsilon)


class GatedMLP(nn.Module):
    """mamba_ssm's GatedMLP: fc1 -> (y, gate), y * silu(gate) -> fc2; hidden rounded up to a multiple of 128."""

    def __init__(self, d_model: int, d_intermediate: int):
        super().__init__()
        hidden = (d_intermediate + 127) // 128 * 128
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


class Block(GradientCheckpointingLayer):
    """Pre-norm residual block as mamba_ssm's Block: returns (mixer output, residual stream)."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = _norm(config)
        is_attn = layer_idx in config.attn_layer_idx
        self.mixer = Attention(config, layer_idx) if is_attn else Mamba2(config, layer_idx)
        if config.d_intermediate > 0:
            self.norm2 = _norm(config)
            self.mlp = GatedMLP(config.d_model, config.d_intermediate)

    def _add_norm(self, hidden, residual, norm):
        residual = hidden if residual is None else hidden + residual
        hidden = norm(residual.to(norm.weight.dtype))
        return hidden, residual.float() if self.residual_in_fp32 else residual

    def forward(self, hidden_states, residual=None, cache=None, position_ids=None):
        hidden_states, residual = self._add_norm(hidden_states, residual, self.norm)
        if isinstance(self.mixer, Attention):
            hidden_states = self.mixer(hidden_states, cache, position_ids)
        else:
            hidden_states = self.mixer(hidden_states, cache)
        if hasattr(self, "mlp"):
            hidden_states, residual = self._add_norm(hidden_states, residual, self.norm2)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    config: HybridConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = list(CACHE_NAMES)
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _is_stateful = True

    @classmethod
    def from_config(cls, config: HybridConfig, **kwargs):
        """A randomly initialised model; kwargs as transformers' `_from_config` (attn_implementation, dtype)."""
        return cls._from_config(config, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """mamba_ssm's init: torch defaults for Linear/Conv1d with zero Linear bias, N(0, 0.02) embeddings,
        out_proj/fc2 scaled by 1/sqrt(residuals per layer * n_layer), Mamba-2's dt/A init."""
        cfg = self.config
        if isinstance(module, nn.Linear):
            bound = 1 / math.sqrt(module.in_features)
            if cfg.rescale_prenorm_residual and getattr(module, "_residual_out", False):
                bound /= math.sqrt((1 if cfg.d_intermediate == 0 else 2) * cfg.n_layer)
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            bound = 1 / math.sqrt(module.weight.shape[1] * module.weight.shape[2])
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=cfg.initializer_range)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, Mamba2):
            dt_bias, a_log = module.initial_ssm_parameters()
            init.copy_(module.dt_bias, dt_bias)
            init.copy_(module.A_log, a_log)
            init.ones_(module.D)


class HybridModel(HybridPreTrainedModel):
    """Backbone: embedding, blocks (Mamba-2 or attention mixers), final norm."""

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        for block in self.layers:
            block.mixer.out_proj._residual_out = True
            if hasattr(block, "mlp"):
                block.mlp.fc2._residual_out = True
        self.norm_f = _norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding = value

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, output_hidden_states=None,
                position_ids=None, inputs_embeds=None, return_dict=True, **kwargs):
        """The cache comes as `cache` or `past_key_values` (see cache_args); other kwargs are ignored."""
        _check_padding(attention_mask)
        cache = take_cache(kwargs)
        hidden = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        all_hidden = [hidden] if output_hidden_states else None
        residual = None
        for i, block in enumerate(self.layers):
            hidden, residual = block(hidden, residual, cache=cache, position_ids=position_ids)
            if all_hidden is not None and i < len(self.layers) - 1:
                all_hidden.append(hidden + residual)
        residual = hidden + residual
        hidden = self.norm_f(residual.to(self.norm_f.weight.dtype))
        if all_hidden is not None:
            all_hidden.append(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden, hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{OUTPUT_FIELD: cache if use_cache else None},
        )


def _check_padding(attention_mask: torch.Tensor | None) -> None:
    """Right padding is harmless in a causal model (pads come after the tokens they would disturb); the rest
    (left padding, holes) would need masking that the SSM layers do not implement."""
    if attention_mask is None or attention_mask.dim() != 2:
        return
    if not bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        raise ValueError("HybridModel supports only right-padded batches (attention_mask of ones then zeros)")


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    """Backbone + lm_head (tied to the embedding when `tie_embeddings`); logits over the padded vocabulary."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embedding.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.backbone = HybridModel(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backbone.embedding = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, labels=None, use_cache=None, output_hidden_states=None,
                logits_to_keep=0, return_dict=True, position_ids=None, inputs_embeds=None, **kwargs):
        """Logits for the last `logits_to_keep` positions (0: all); `labels` give the mean shifted CE loss;
        `hidden_states[-1]` is the final hidden state after norm_f. The cache comes as `cache` or
        `past_key_values` and goes out under the installed transformers' field name (see cache_args)."""
        out = self.backbone(
            input_ids, attention_mask=attention_mask, cache=take_cache(kwargs), use_cache=use_cache,
            output_hidden_states=output_hidden_states, position_ids=position_ids, inputs_embeds=inputs_embeds,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need the logits of every position: pass logits_to_keep=0")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{OUTPUT_FIELD: getattr(out, OUTPUT_FIELD)},
        )
        return result if return_dict else result.to_tuple()
