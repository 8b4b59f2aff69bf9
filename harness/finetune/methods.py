"""Fine-tuning methods as model transforms: which parameters train, and how.

Only `lora` exists so far (issue 4 adds lora_plus, hylora, full): low-rank adapters
(PEFT) on the attention blocks' projections and nothing else.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model

from harness.errors import UserError

METHODS = ("lora",)
ATTENTION_PROJECTIONS = ("in_proj", "q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class MethodSummary:
    method: str
    trainable_params: int
    total_params: int
    trainable_names: list[str]

    def values(self) -> dict:
        return {"trainable_params": self.trainable_params, "total_params": self.total_params}


def attention_targets(model: torch.nn.Module) -> list[str]:
    """Full names of the linear projections inside attention blocks (hybrid: config.attn_layer_idx)."""
    layers = getattr(model.config, "attn_layer_idx", None)
    if layers is None:
        raise UserError(f"{type(model).__name__}: no attention layers known for LoRA targeting")
    names = [
        name for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
        and name.split(".")[-1] in ATTENTION_PROJECTIONS
        and any(name.startswith(f"backbone.layers.{i}.mixer.") for i in layers)
    ]
    if not names:
        raise UserError("lora: no attention projection matched in this model; nothing would train")
    return names


def apply_method(model: torch.nn.Module, method: str, rank: int = 8, alpha: int = 16):
    """Return (model wrapped for `method`, summary of what trains)."""
    if method not in METHODS:
        hint = difflib.get_close_matches(method, METHODS, n=1)
        raise UserError(f"unknown fine-tuning method {method!r}"
                        f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; available: {', '.join(METHODS)}")
    if rank < 1 or alpha <= 0:
        raise UserError(f"lora: rank must be >= 1 and alpha > 0 (got rank={rank}, alpha={alpha})")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=attention_targets(model))
    peft_model = get_peft_model(model, cfg)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    summary = MethodSummary(
        method=method,
        trainable_params=sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in peft_model.parameters()),
        trainable_names=trainable,
    )
    return peft_model, summary
