"""Fixtures for the tokenizer / chat / tool-calling tests.

The real Llama 4 ``tokenizer.model`` and the text samples live outside the repository, in
``<repo>/../shared/data``; tests that need them skip with a message when that folder is absent.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from llama4.prompt import Tokenizer, load_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_TOKENIZER = SHARED_DATA / "llama4-tokenizer" / "tokenizer.model"
UDHR = SHARED_DATA / "multilingual" / "udhr" / "udhr_41.jsonl.gz"
TINYSTORIES = SHARED_DATA / "tinystories" / "tinystories_train_head.jsonl.gz"

# Used when ../shared is absent so the trainer-based tests still run (on a much smaller corpus).
FALLBACK_CORPUS = [
    "Once upon a time, there was a little dog named Max. Max liked to run in the park.\n\n",
    "One day, Lily found a shiny red ball. She said, \"Can I play with it?\" Her mom smiled.\n",
    "Les droits de l'homme sont universels. Die Würde des Menschen ist unantastbar.\n",
    "Все люди рождаются свободными. 人人生而自由，在尊严和权利上一律平等。\n",
    "The year 2024 had 366 days; 3.14159 is pi. E-mail: test@example.com!\n",
]


def _read_jsonl_texts(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def real_tokenizer_path() -> Path:
    if not REAL_TOKENIZER.is_file():
        pytest.skip(f"Meta's Llama 4 tokenizer.model not found at {REAL_TOKENIZER} (needs ../shared/data)")
    return REAL_TOKENIZER


@pytest.fixture(scope="session")
def real_tok(real_tokenizer_path) -> Tokenizer:
    return load_tokenizer(real_tokenizer_path)


@pytest.fixture(scope="session")
def udhr() -> list[dict]:
    if not UDHR.is_file():
        pytest.skip(f"multilingual sample not found at {UDHR} (needs ../shared/data)")
    return _read_jsonl_texts(UDHR)


@pytest.fixture(scope="session")
def training_texts() -> list[str]:
    if TINYSTORIES.is_file():
        return [r["text"] for r in _read_jsonl_texts(TINYSTORIES)[:2500]]
    return FALLBACK_CORPUS * 50


@pytest.fixture(scope="session")
def small_tok_dir(tmp_path_factory, training_texts) -> Path:
    """A 4,000-token vocabulary trained by our trainer, saved in both formats."""
    out = tmp_path_factory.mktemp("small_tokenizer")
    train_tokenizer(training_texts, 4000, out_dir=out)
    return out


@pytest.fixture(scope="session")
def small_tok(small_tok_dir) -> Tokenizer:
    return load_tokenizer(small_tok_dir)


@pytest.fixture(scope="session")
def hf_small_tok(small_tok_dir):
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(small_tok_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def hf_chat_template() -> str:
    """The chat template string embedded in transformers 5.23's processing_llama4.py.

    Read from the source with ``ast`` rather than imported: importing the module pulls in the image
    stack (torchvision), which is not needed to render a chat.
    """
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        pytest.skip("transformers is not installed")
    source = Path(spec.origin).parent / "models" / "llama4" / "processing_llama4.py"
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "chat_template":
            return node.value.value
    pytest.skip(f"no chat_template string found in {source}")
