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
from llama4.prompt import (
                           ImageError,
                           StreamingDecoder,
                           Tokenizer,
                           load_tokenizer,
                           parse_assistant_output,
                           parse_tool_calls,
                           preprocess_image,
                           preprocess_images,
                           preprocess_video,
                           train_tokenizer,
)

__all__ = [
    "CheckpointError", "ConfigError", "ImageError", "KVCache", "Llama4Model", "ModelConfig", "TextConfig",
    "VisionConfig",
    "SamplingParams", "StreamingDecoder", "Tokenizer", "generate", "generate_tokens", "load_model", "load_tokenizer",
    "model_info", "parse_assistant_output", "parse_tool_calls", "preprocess_image", "preprocess_images",
    "preprocess_video", "preset",
    "random_model", "save_model", "train_tokenizer",
]
__version__ = "0.1.0"
