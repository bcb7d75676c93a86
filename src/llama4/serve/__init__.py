"""OpenAI-compatible HTTP serving: a continuous-batching engine behind FastAPI routes."""

from llama4.serve.engine import Engine, EngineConfig
from llama4.serve.protocol import GenerationRequest

__all__ = ["Engine", "EngineConfig", "GenerationRequest", "create_app"]


def __getattr__(name):
    if name == "create_app":  # FastAPI is an optional dependency: import it only when the app is wanted
        from llama4.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'llama4.serve' has no attribute {name!r}")
