"""THE translation of a checkpoint's ``generation_config.json`` (Hugging Face's sampling defaults) into the
settings a request that names none gets: Meta's Llama 4 instruct checkpoints ship temperature 0.6 and top_p
0.9, the embedded model its own recommendation. Only the sampling fields are read; ``do_sample: false``
means greedy (temperature 0), as transformers reads it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

FILE_NAME = "generation_config.json"


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling settings for requests that omit them (None: the caller's own default)."""

    temperature: float | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


def read_generation_defaults(model_dir: str | Path) -> GenerationDefaults:
    """The defaults in ``model_dir/generation_config.json`` (none: no file). A file that is not a JSON object
    with numeric sampling fields is a ValueError naming it."""
    path = Path(model_dir) / FILE_NAME
    if not path.is_file():
        return GenerationDefaults()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must be a JSON object")
    fields = {name: data.get(name) for name in ("temperature", "top_p")}
    for name, value in fields.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{path}: {name} must be a number, got {value!r}")
    if data.get("do_sample") is False:
        fields["temperature"] = 0.0
    try:
        return GenerationDefaults(**{k: None if v is None else float(v) for k, v in fields.items()})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def write_generation_defaults(model_dir: str | Path, defaults: GenerationDefaults, **ids) -> Path:
    """Write ``generation_config.json`` as transformers writes one (``ids``: bos_token_id, eos_token_id, ...)."""
    sampling = {k: v for k, v in asdict(defaults).items() if v is not None}
    data = {**ids, **({"do_sample": True} if sampling.get("temperature") else {}), **sampling}
    path = Path(model_dir) / FILE_NAME
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
