"""The engine tests' model and tokenizer (tests/inference/tiny_multimodal.py; a test module's own
``model`` or ``tok`` fixture takes precedence)."""

from tests.inference.tiny_multimodal import checkpoint, model, tok  # noqa: F401
