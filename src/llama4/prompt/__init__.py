"""Text and images in, tokens out (Llama 4 layout); model output back into text and tool calls."""

from .bpe_trainer import train_bpe, train_tokenizer
from .chat import ChatEncoding, encode_chat, image_token_layout, render_chat
from .images import (
                     ALLOWED_FORMATS,
                     DEFAULT_MAX_PIXELS,
                     ImageError,
                     best_fit_grid,
                     image_token_count,
                     load_image,
                     preprocess_image,
                     preprocess_images,
)
from .special_tokens import NUM_SPECIAL_SLOTS, special_token_ids, special_token_names
from .streaming import StreamingDecoder, stream_decode
from .tokenizer import Tokenizer, load_tokenizer
from .tools import AssistantOutput, new_call_id, parse_assistant_output, parse_tool_calls
from .video import preprocess_video, sample_frame_indices

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "best_fit_grid",
    "image_token_count",
    "load_image",
    "preprocess_image",
    "preprocess_images",
    "preprocess_video",
    "sample_frame_indices",
    "AssistantOutput",
    "ChatEncoding",
    "NUM_SPECIAL_SLOTS",
    "StreamingDecoder",
    "Tokenizer",
    "encode_chat",
    "image_token_layout",
    "load_tokenizer",
    "new_call_id",
    "parse_assistant_output",
    "parse_tool_calls",
    "render_chat",
    "special_token_ids",
    "special_token_names",
    "stream_decode",
    "train_bpe",
    "train_tokenizer",
]
