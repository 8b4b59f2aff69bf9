"""Turn a backend + options into a transformers attention implementation name.

    name = register("se_attn", chunk_size=[2048, 4096])
    model = HybridForCausalLM.from_config(cfg, attn_implementation=name)   # or
    model.set_attn_implementation(name)                                     # any AttentionInterface model

The name is deterministic ("harness_<backend>_<8 hex of the options>") and registering twice is a no-op.
The same name is also registered in transformers' AttentionMaskInterface (with the SDPA mask builder), so
models that build masks through masking_utils (Llama, ...) hand us None for unpadded batches and a boolean
mask when there is padding; a padding mask at prefill is an error for every backend but `full`.
"""

import hashlib
import json

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..errors import UserError
from .backend import Backend
from .options import resolve

_registered: dict[str, Backend] = {}


def implementation_name(backend: str, **options) -> str:
    name, opts = resolve(backend, options)
    canonical = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in sorted(opts.items())})
    return f"harness_{name}_{hashlib.sha1(canonical.encode()).hexdigest()[:8]}"


def uses_attention_interface(model) -> bool:
    """Whether the model's attention modules look their kernel up in transformers' AttentionInterface (so that
    `set_attn_implementation(register(...))` reaches them): a module whose class name holds "Attention" is
    defined next to ALL_ATTENTION_FUNCTIONS."""
    import sys

    return any("Attention" in type(m).__name__ and hasattr(sys.modules[type(m).__module__], "ALL_ATTENTION_FUNCTIONS")
               for m in model.modules())


def registered_backend(impl_name: str) -> Backend | None:
    """The Backend behind an implementation name returned by `register`, or None."""
    return _registered.get(impl_name)


# What a model may ask of its attention function that the backends do not implement: each would be dropped
# silently (a soft-capped model scored as if uncapped), so it is an error.
UNSUPPORTED = {"softcap": "logit soft-capping", "s_aux": "attention sinks", "position_bias": "a position bias"}


def _interface_function(backend: Backend):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        training = bool(getattr(module, "training", False))
        if dropout and training:
            config = getattr(module, "config", None)
            fields = [k for k, v in (config.to_dict() if config is not None else {}).items()
                      if "att" in k and "drop" in k and v == dropout]  # attention_dropout, GPT-2's attn_pdrop
            raise UserError(f"attention backend {backend.name!r} does not implement attention dropout "
                            f"(got dropout={dropout}); set the model's attention dropout to 0"
                            + (f" ({', '.join(fields)} in its config.json)" if fields else ""))
        asked = [f"{what} ({key}=)" for key, what in UNSUPPORTED.items() if kwargs.get(key) is not None]
        asked += ["non-causal attention (is_causal=False)"] if kwargs.get("is_causal") is False else []
        if asked:
            raise UserError(f"attention backend {backend.name!r}: {type(module).__name__} asks for "
                            f"{', '.join(asked)}, which the harness's attention kernels do not implement; "
                            "this model can run with its own attention only (attn_implementation eager or sdpa)")
        out, _ = backend(query, key, value, scale=scaling, mask=attention_mask, training=training, module=module)
        return out.transpose(1, 2).contiguous(), None

    attention.__name__ = f"harness_{backend.name}_attention"
    return attention


def register(backend: str, **options) -> str:
    """Register `backend` with `options` in transformers' AttentionInterface; return the implementation name."""
    name = implementation_name(backend, **options)
    if name not in _registered:
        _registered[name] = Backend(backend, **options)
        AttentionInterface.register(name, _interface_function(_registered[name]))
        AttentionMaskInterface.register(name, sdpa_mask)
    return name
