"""OpenAI-compatible HTTP serving: a continuous-batching engine behind FastAPI routes."""

from llama4.inference.engine import Engine, EngineConfig
from llama4.inference.requests import GenerationRequest
from llama4.serve.engine_process import EngineProcess

__all__ = ["Engine", "EngineConfig", "EngineProcess", "GenerationRequest", "create_app", "create_engine_app"]


def __getattr__(name):
    if name in ("create_app", "create_engine_app"):  # FastAPI is an optional dependency: import it only when wanted
        from llama4.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'llama4.serve' has no attribute {name!r}")
