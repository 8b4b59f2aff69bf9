"""Fine-tuning methods as model transforms: which parameters train, and how.

- `lora`: LoRA adapters (PEFT) on the attention blocks' linear projections, nothing else.
- `lora_plus`: LongLoRA's LoRA+ (not Hayou et al.'s): `lora` + every embedding and every
  normalization layer trained fully.
- `hylora`: the paper's HyLoRA: `lora_plus` + every depthwise 1D convolution trained fully.
- `full`: every parameter (a reference point, not in the paper).

What is discovered, and how (structurally, so any HF hybrid works, not only name lists):
- attention projections: the direct `nn.Linear` children of every module whose class name
  contains "Attention" (our hybrid's `Attention`: in_proj or q/k/v_proj, out_proj; Llama, Bamba,
  Zamba2, NemotronH, Falcon-H1: q/k/v/o_proj). Zamba2's own shared-block adapters live in
  ModuleLists, not direct children, and are left alone.
- embeddings: the parameters of every `nn.Embedding`. A tied lm_head is the same tensor and so
  trains with it; an untied lm_head stays frozen (LongLoRA trains "embed,norm" only).
- norms: the parameters of every module whose class name contains "Norm" (RMSNorm, LayerNorm,
  the gated RMSNorm inside Mamba mixers). On every model here this is exactly LongLoRA's rule
  (`"norm" in parameter name`), which also catches `mixer.norm`: the gated norm is a
  normalization layer, so LoRA+ trains it.
- conv1d: the parameters of every `nn.Conv1d`. In the HF hybrids these are the SSM mixers' convs
  only. Our hybrid (and mamba2attn-2.7b) also has a depthwise conv over q/k/v in its attention
  blocks; HyLoRA trains it too. Why: the paper puts the convs at "~0.7%" of Mamba-2-Hybrid 2.7B;
  the SSM convs alone are 0.058% of its parameters and all convs 0.0706%, i.e. the paper's figure
  (off by 10x) counts the attention conv as well, as a LongLoRA-style `"conv1d" in name` rule
  would. It is the same kind of layer (sequence mixing right after the input projection).

The fully trained sets are trained in place (`requires_grad` on the base weights, LongLoRA's
own mechanism) rather than through PEFT's `modules_to_save`, which trains a copy: in place, the
weights the forward reads (Mamba kernels read `conv1d.weight` directly) are by construction the
trained ones, a tied lm_head follows its embedding, and no vocab-sized copy is made.
`save_method` therefore writes the PEFT adapter plus the fully trained tensors, by name.

Whatever trains is float32 (master weights), whatever the loaded model's dtype: a checkpoint loaded in bf16
keeps its frozen weights so, and the loop's autocast computes in bf16. A bf16 norm weight near 1 cannot take an
AdamW step of 2e-4 (it rounds away), and FSDP2 refuses a unit that mixes fp32 LoRA with bf16 trained weights.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from harness.attention.options import spec
from harness.errors import UserError

METHODS = ("lora", "lora_plus", "hylora", "full")
GROUPS = ("lora", "embeddings", "norms", "conv1d", "other")
# Fully trained parameter groups (besides LoRA adapters) per method.
FULLY_TRAINED = {"lora": (), "lora_plus": ("embeddings", "norms"), "hylora": ("embeddings", "norms", "conv1d")}


def unused_settings(method: str) -> tuple[str, ...]:
    """The `finetune` fields that do not change `method`'s training: the LR scale of fully trained parameters
    where nothing trains beside LoRA adapters or nothing is an adapter (see loop.param_groups), LoRA's shape for
    `full`."""
    if method == "full":
        return "extra_lr_scale", "rank", "alpha"
    return () if FULLY_TRAINED.get(method) else ("extra_lr_scale",)

# The paper's settings (its Appendix G, following LongLoRA), for reference; nothing enforces them.
# lr: 2e-4 for SE/SW/full attention, 2e-5 for S2-Attn (see `default_lr`); 1000 steps of 64 sequences (8 GPUs x
# batch 1 x 8 accumulation steps); from LongLoRA's recipe: a constant schedule after 20 warm-up steps, weight
# decay 0.
PAPER_DEFAULTS: dict[str, dict] = {
    # Mamba-2-Hybrid 2.7B (state-spaces/mamba2attn-2.7b): HyLoRA r=32, alpha=64 (rank sweep keeps alpha/r=2).
    "mamba2attn-2.7b": {"method": "hylora", "rank": 32, "alpha": 64, "pretrain_context": 2048,
                        "finetune_context": 8192, "batch_size": 1, "grad_accum": 8, "nproc": 8},
    # Llama-1 7B: LongLoRA's r=8, alpha=16, linear RoPE scaling to 16384.
    "llama-7b": {"method": "lora_plus", "rank": 8, "alpha": 16, "pretrain_context": 2048,
                 "finetune_context": 16384, "batch_size": 1, "grad_accum": 4, "nproc": 8},
    # Zamba2 1.2B: the paper gives no rank for it; these mirror Mamba-2-Hybrid's.
    "zamba2-1.2b": {"method": "hylora", "rank": 32, "alpha": 64, "pretrain_context": 4096,
                    "finetune_context": 12288, "batch_size": 1, "grad_accum": 8},
}
META_FILE = "harness_method.json"
EXTRA_FILE = "trainable_params.safetensors"


def default_lr(backend: str) -> float:
    """The paper's fine-tuning LR with `backend` (appendix G; each backend's Spec holds it)."""
    return spec(backend).lr


@dataclass
class MethodSummary:
    method: str
    trainable_params: int
    total_params: int
    trainable_names: list[str]
    groups: dict[str, int] = field(default_factory=dict)  # trainable parameter count per group (GROUPS)
    group_names: dict[str, list[str]] = field(default_factory=dict)
    # Attention blocks, and the layers that call them: more calls than blocks means blocks are shared across
    # layers (Zamba2): each layer has an adapter of its own over the one shared base weight.
    attention_blocks: int = 0
    attention_layers: int = 0

    def values(self) -> dict:
        return {"trainable_params": self.trainable_params, "total_params": self.total_params,
                "trainable_by_group": dict(self.groups), "attention_blocks": self.attention_blocks,
                "attention_layers": self.attention_layers,
                "shared_attention": self.attention_layers > self.attention_blocks}


# --- discovery -------------------------------------------------------------------------------------------

def _projection(mod: nn.Module) -> bool:
    """A linear layer LoRA can adapt: nn.Linear, or transformers' Conv1D (GPT-2's, a linear with its weight
    transposed, which PEFT adapts too)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(mod, (nn.Linear, Conv1D))


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose class name contains "Attention" and that own linear projections directly."""
    return {name: mod for name, mod in model.named_modules()
            if "attention" in type(mod).__name__.lower() and any(_projection(c) for c in mod.children())}


def attention_targets(model: nn.Module) -> list[str]:
    """Full names of the linear projections of the attention modules (LoRA's default targets)."""
    names = [f"{att}.{child}" for att, mod in attention_modules(model).items()
             for child, c in mod.named_children() if _projection(c)]
    if not names:
        raise UserError(f"{type(model).__name__}: no attention projection found (no module named *Attention* "
                        "with linear children), so LoRA would train nothing; fix: the method `full` for a model "
                        "without attention, or (from Python) apply_method(model, method, target_modules=[...names "
                        "of its linear layers])")
    return names


def _is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "norm" in type(mod).__name__.lower()


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The base model's parameters that a method may train fully: embeddings, norms, conv1d (each once)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"embeddings": [], "norms": [], "conv1d": []}
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        group = ("embeddings" if isinstance(mod, nn.Embedding) else "conv1d" if isinstance(mod, nn.Conv1d)
                 else "norms" if _is_norm(mod) else None)
        if group is None:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                groups[group].append((f"{mod_name}.{pname}" if mod_name else pname, p))
    return groups


def _resolve_targets(model: nn.Module, target_modules) -> list[str]:
    """Explicit LoRA targets -> full module names; a list entry is a full name or a name suffix (PEFT's
    rule), a string is a regex that must match a whole module name. Each entry must match a linear layer
    (`_projection`: nn.Linear, or transformers' Conv1D as GPT-2's default targets)."""
    modules = dict(model.named_modules())
    if isinstance(target_modules, str):
        try:
            rx = re.compile(target_modules)
        except re.error as e:
            raise UserError(f"target_modules: invalid regex {target_modules!r}: {e}") from None
        names = [n for n in modules if n and rx.fullmatch(n)]
        if not names:
            raise UserError(f"target_modules regex {target_modules!r} matches no module name "
                            f"(e.g. {', '.join(list(modules)[1:4])})")
    else:
        names = []
        for entry in target_modules:
            hits = [n for n in modules if n == entry or n.endswith("." + entry)]
            if not hits:
                close = difflib.get_close_matches(entry, modules, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(f"target_modules: no module named {entry!r} in {type(model).__name__}{hint}")
            names += [n for n in hits if n not in names]
    bad = [n for n in names if not _projection(modules[n])]
    if bad:
        raise UserError(f"target_modules: LoRA here supports linear layers only (nn.Linear, transformers' Conv1D); "
                        f"{bad[0]!r} is {type(modules[bad[0]]).__name__}. (A LoRA on a depthwise conv1d is bypassed "
                        "by Mamba kernels that read conv1d.weight directly: train it fully with hylora or "
                        "extra_trainable.)")
    return names


def _resolve_extra(model: nn.Module, patterns) -> list[tuple[str, nn.Parameter]]:
    if isinstance(patterns, str):
        patterns = [patterns]
    params = list(model.named_parameters())
    chosen: dict[int, tuple[str, nn.Parameter]] = {}
    for pat in patterns:
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise UserError(f"extra_trainable: invalid regex {pat!r}: {e}") from None
        hits = [(n, p) for n, p in params if rx.search(n)]
        if not hits:
            raise UserError(f"extra_trainable pattern {pat!r} matches no parameter name "
                            f"(e.g. {', '.join(n for n, _ in params[:3])})")
        chosen.update((id(p), (n, p)) for n, p in hits)
    return list(chosen.values())


# --- applying --------------------------------------------------------------------------------------------

def apply_method(model: nn.Module, method: str, rank: int = 8, alpha: float = 16,
                 target_modules: list[str] | str | None = None, extra_trainable: list[str] | str | None = None):
    """Return (model prepared for `method`, summary of what trains).

    lora/lora_plus/hylora return a `peft.PeftModel` wrapping `model` (modified in place); `full` returns
    `model` itself. `target_modules` overrides the LoRA targets (full names or suffixes, or one regex over
    module names); `extra_trainable` are regexes (searched in parameter names) of base parameters to
    train fully in addition. Anything that would match nothing is a UserError.
    """
    if method not in METHODS:
        hint = difflib.get_close_matches(str(method), METHODS, n=1)
        raise UserError(f"unknown fine-tuning method {method!r}"
                        f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; available: {', '.join(METHODS)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or isinstance(alpha, bool) \
            or not isinstance(alpha, int | float) or not alpha > 0:
        raise UserError(f"{method}: LoRA rank must be an integer >= 1 and alpha > 0 (got rank={rank!r}, "
                        f"alpha={alpha!r})")
    groups = parameter_groups(model)
    if method == "full":
        if target_modules is not None or extra_trainable is not None:
            raise UserError("full: every parameter trains; target_modules/extra_trainable would have no effect")
        for p in model.parameters():
            p.requires_grad_(True)
        out = model
    else:
        targets = attention_targets(model) if target_modules is None else _resolve_targets(model, target_modules)
        empty = [g for g in FULLY_TRAINED[method] if not groups[g]]
        if empty:
            why = "no nn.Conv1d: hylora would equal lora_plus" if empty[0] == "conv1d" else "none found"
            raise UserError(f"{method}: {type(model).__name__} has no {empty[0]} layers to train ({why})")
        extra = [p for g in FULLY_TRAINED[method] for _, p in groups[g]]
        if extra_trainable is not None:
            extra += [p for _, p in _resolve_extra(model, extra_trainable)]
        cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=targets)
        try:
            with _peft_quietly():
                out = get_peft_model(model, cfg)
        except ValueError as e:  # e.g. PEFT refuses out_proj/conv1d targets on falcon_h1, nemotron_h, mamba
            raise UserError(f"{method}: PEFT rejected the LoRA targets: {e}") from None
        for p in extra:  # after get_peft_model, which freezes every base parameter
            p.requires_grad_(True)
    for p in out.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # in place on the Parameter: a tied lm_head stays tied
    out.harness_method = {"method": method, "rank": rank, "alpha": alpha}
    return out, summarize(out, method, groups)


def summarize(model: nn.Module, method: str, groups: dict | None = None) -> MethodSummary:
    """What trains in `model`, by name and by group (lora / embeddings / norms / conv1d / other)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    groups = groups if groups is not None else parameter_groups(base)
    group_of = {id(p): g for g, items in groups.items() for _, p in items}
    names: dict[str, list[str]] = {g: [] for g in GROUPS}
    counts = dict.fromkeys(GROUPS, 0)
    trainable = []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = "lora" if ".lora_" in n else group_of.get(id(p), "other")
        names[g].append(n)
        counts[g] += p.numel()
        trainable.append(n)
    # Blocks by their weights: a block shared across layers is one module reached from several (named_modules
    # drops repeats by default) or, as in Zamba2, one module per layer with the weights tied.
    calls = [next(lin.weight for c in m.children() if _projection(lin := getattr(c, "base_layer", c)))
             for _, m in base.named_modules(remove_duplicate=False) if "attention" in type(m).__name__.lower()
             and any(_projection(getattr(c, "base_layer", c)) for c in m.children())]  # LoRA-wrapped too
    calls = [id(w) for w in calls]
    return MethodSummary(method=method, trainable_params=sum(counts.values()),
                         total_params=sum(p.numel() for p in model.parameters()), trainable_names=trainable,
                         groups=counts, group_names=names, attention_blocks=len(set(calls)),
                         attention_layers=len(calls))


# --- saving for evaluation -------------------------------------------------------------------------------

def save_method(model: nn.Module, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Save what fine-tuning changed: the PEFT adapter (if any) and every fully trained base parameter
    (those with requires_grad, outside the adapter) by base-model name, plus a small JSON description.
    `state`: the trainable parameters by their names in `model` (distributed.full_state, for a sharded model);
    default: read from `model`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    is_peft = isinstance(model, PeftModel)
    if state is None:
        state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if is_peft:
        model.save_pretrained(path, state_dict=state)
    prefix = "base_model.model." if is_peft else ""
    extra = {n.removeprefix(prefix): p.to("cpu").contiguous() for n, p in state.items() if ".lora_" not in n}
    save_file(extra, str(path / EXTRA_FILE))
    meta = {"format": 1, **getattr(model, "harness_method", {}), "peft": is_peft, "extra_params": sorted(extra)}
    (path / META_FILE).write_text(json.dumps(meta, indent=2))
    return path


def load_method(base_model: nn.Module, path: str | Path) -> nn.Module:
    """Apply a `save_method` directory to a fresh copy of the model it was trained from (eval mode); a PEFT
    model where the method has an adapter (`harness.export.merged` folds it in)."""
    meta = _meta(path)
    with _peft_quietly():
        model = PeftModel.from_pretrained(base_model, str(path)) if meta["peft"] else base_model
    load_fully_trained(model.get_base_model() if meta["peft"] else model, path)
    return model.eval()


def _meta(path: str | Path) -> dict:
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise UserError(f"{path}: not a saved fine-tuning method ({META_FILE} missing)")
    return json.loads((path / META_FILE).read_text())


def load_fully_trained(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy the fully trained parameters of a `save_method` directory (embeddings, norms, conv1d: not the LoRA
    adapter) into `model`, a plain base model (or a PEFT model's base)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path, meta = Path(path), _meta(path)
    try:
        state = load_file(str(path / EXTRA_FILE)) if (path / EXTRA_FILE).is_file() else {}
    except SafetensorError as e:
        raise UserError(f"{path / EXTRA_FILE}: unreadable ({e})") from None
    params = dict(model.named_parameters())
    missing = sorted(set(meta["extra_params"]) - set(state))
    unknown = sorted(set(state) - set(params))
    shapes = [f"{n}: saved {tuple(v.shape)} vs model {tuple(params[n].shape)}"
              for n, v in state.items() if n in params and v.shape != params[n].shape]
    if missing or unknown or shapes:
        raise UserError(f"{path / EXTRA_FILE} does not fit this model: missing {missing[:5]}, unknown {unknown[:5]}, "
                        f"shape mismatches {shapes[:5]}")
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)
    return model


@contextlib.contextmanager
def _peft_quietly():
    """PEFT reads a property transformers deprecated (a FutureWarning per model wrapped), and says it sets
    fan_in_fan_out for GPT-2's transposed Conv1D targets, as it should: nothing a user can act on, so silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        warnings.filterwarnings("ignore", "fan_in_fan_out is set to False but the target module is `Conv1D`")
        yield
