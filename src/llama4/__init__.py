"""llama4: a complete, fast, hackable implementation of Meta's Llama 4 family in PyTorch.

Public API::

    model = llama4.load_model(path, dtype=torch.float32, device="cpu")
    logits = model(input_ids)                      # [B, T] -> [B, T, vocab] float32
    llama4.save_model(model, path)                 # Hugging Face layout
    info = llama4.model_info("scout")              # preset name or checkpoint path
"""

from llama4.build import load_model, random_model, save_model
from llama4.checkpoint.io import CheckpointError
from llama4.config import ConfigError, ModelConfig, TextConfig, VisionConfig
from llama4.inference.generate import generate, generate_tokens
from llama4.inference.sampling import SamplingParams
from llama4.info import model_info
from llama4.model.cache import KVCache
from llama4.model.transformer import Llama4Model
from llama4.presets import preset

__all__ = [
    "CheckpointError", "ConfigError", "KVCache", "Llama4Model", "ModelConfig", "TextConfig", "VisionConfig",
    "SamplingParams", "generate", "generate_tokens", "load_model", "model_info", "preset", "random_model", "save_model",
]
__version__ = "0.1.0"
