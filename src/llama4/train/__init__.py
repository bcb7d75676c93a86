"""Training: packed data, the training loop (pretraining and fine-tuning), pickle-free checkpoints."""

from llama4.train.data import (
                               IGNORE,
                               BatchIterator,
                               ChatExample,
                               chat_example,
                               chat_rows,
                               eval_batches,
                               pack,
                               pack_chats,
                               pretraining_texts,
                               read_records,
                               text_stream,
                               validation_text,
)
from llama4.train.objectives import RouterCapture, lr_at, next_token_loss, param_groups, router_aux_loss
from llama4.train.trainer import TrainConfig, TrainResult, evaluate, train

__all__ = [
    "IGNORE", "BatchIterator", "ChatExample", "RouterCapture", "TrainConfig", "TrainResult", "chat_example",
    "chat_rows", "eval_batches", "evaluate", "lr_at", "next_token_loss", "pack", "pack_chats", "param_groups",
    "pretraining_texts", "read_records", "router_aux_loss", "text_stream", "train", "validation_text",
]
