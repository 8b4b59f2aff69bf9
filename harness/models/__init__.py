"""The hybrid Mamba-2/attention LM; importing this registers it with transformers' Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import HybridConfig
from .modeling import HybridForCausalLM, HybridModel
from .presets import PRESETS, preset_config

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModel.register(HybridConfig, HybridModel, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)

__all__ = ["PRESETS", "HybridConfig", "HybridForCausalLM", "HybridModel", "preset_config"]
