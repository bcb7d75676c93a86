"""What one request may ask of the server: the limits checked before work that grows with the request starts.

A request is cheap to write and may be dear to serve: a JSON schema of a few thousand properties takes
llguidance seconds and gigabytes to compile (the time grows with the square of the property count), a
7000 x 7000 PNG of zeros is 48 KB to send and two seconds of CPU to decode. Each such cost is bounded here
by a limit (a ``llama4 serve`` flag), checked from what the request says before the work is done, and a
request over it is a 400 that names the limit and its flag. (No web framework here: ``llama4 serve``'s
flags take their defaults from this module.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from llama4.prompt.images import DEFAULT_MAX_PIXELS

DEFAULT_STALL_TIMEOUT = 120.0  # seconds with work waiting and no engine iteration: stuck (monitoring.py)


class LimitExceeded(ValueError):
    """A request over one of the limits (the routes answer 400, code ``limit_exceeded``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 32 * 2**20  # room for a few base64 images
    max_images: int = 8  # image parts per request (Llama 4 was trained with up to 5 per prompt)
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # declared width x height of one image
    max_schema_bytes: int = 64 * 2**10  # a constraint's JSON schema as JSON text (about 2,000 properties)
    max_schema_depth: int = 64  # nesting of the schema document (objects and arrays)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_pixels", "max_schema_bytes", "max_schema_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {self.max_images}")

    def check_schema(self, schema, param: str) -> None:
        """A 400 for a schema over the size or depth limit (before anything compiles it)."""
        depth = _depth(schema, self.max_schema_depth)
        if depth > self.max_schema_depth:
            raise _over(f"the JSON schema in '{param}' is nested more than {self.max_schema_depth} levels deep",
                        "--max-schema-depth", param)
        size = len(json.dumps(schema, separators=(",", ":")))
        if size > self.max_schema_bytes:
            raise _over(f"the JSON schema in '{param}' is {size:,} bytes as compact JSON, over the limit of "
                        f"{self.max_schema_bytes:,}", "--max-schema-kb", param)


def _over(message: str, flag: str, param: str) -> LimitExceeded:
    return LimitExceeded(f"{message} (the server's {flag})", param)


def _depth(value, limit: int) -> int:
    """How deep ``value`` nests (a scalar: 0), counting no further than ``limit + 1``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if not isinstance(value, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            return depth
        stack += [(item, depth + 1) for item in (value.values() if isinstance(value, dict) else value)]
    return deepest
