"""Checkpoint formats: HF config translation, the tensor-name table, safetensors load/save."""
