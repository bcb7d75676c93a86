"""Training data: corpora -> token streams -> packed fixed-length rows -> a resumable batch iterator.

A *row* holds ``seq_len + 1`` tokens: the model reads ``row[:-1]`` and is trained to predict
``row[1:]``. Consecutive rows overlap by one token, so every token of the stream except the first is a
target exactly once (only the incomplete tail is dropped). Records are joined with an EOS between them
and may span row boundaries. Positions where nothing should be learned (chat prompts) carry the target
``IGNORE`` (-100, as in ``F.cross_entropy``'s ``ignore_index``).

All randomness comes from explicit ``torch.Generator``s seeded from the run seed: no global RNG.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100

# Files of the shared data folder (see shared/data/README.md), relative to it.
CORPUS_FILES = {
    "tinystories": "tinystories/tinystories_train_head.jsonl.gz",
    "tales": "pd_tales/pd_tales.jsonl.gz",
    "tinystories_valid": "tinystories/tinystories_valid_head.txt.gz",
    "smalltalk": "chat/smalltalk/personality_chat_smalltalk.jsonl",
    "sgd": "chat/sgd/sgd_dialogues.jsonl.gz",
}


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_records(path: str | os.PathLike, field: str = "text", limit: int | None = None) -> Iterator:
    """Records of a (gzipped) file: ``.jsonl``: each line's ``field`` (None: the whole dict);
    ``.txt``: the whole file as one record (a text with no record boundaries)."""
    path = Path(path)
    name = path.name.removesuffix(".gz")
    with _open_text(path) as f:
        if name.endswith(".jsonl"):
            for i, line in enumerate(f):
                if limit is not None and i >= limit:
                    return
                if line.strip():
                    record = json.loads(line)
                    yield record if field is None else record[field]
        elif name.endswith(".txt"):
            yield f.read()
        else:
            raise ValueError(f"unsupported data file {path} (expected .jsonl[.gz] or .txt[.gz])")


def shuffled(items: Sequence, seed: int) -> list:
    """A deterministic permutation of ``items`` from ``seed``."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order]


def text_stream(tok, texts: Iterable[str], eos_id: int) -> list[int]:
    """Token ids of the texts, each followed by ``eos_id`` (the end-of-text separator)."""
    ids: list[int] = []
    for text in texts:
        ids += tok.encode(text)
        ids.append(eos_id)
    return ids


@dataclass(frozen=True)
class ChatExample:
    ids: list[int]
    mask: list[bool]  # True where ids[i] is assistant output: a position to learn


def chat_example(tok, messages: Sequence[dict]) -> ChatExample:
    """A chat -> tokens + loss mask (assistant content and its ``<|eot|>``), via the tokenizer's template."""
    enc = tok.encode_chat(messages, add_generation_prompt=False)
    return ChatExample(list(enc.ids), list(enc.assistant_mask))


def pack(ids: Sequence[int], seq_len: int, mask: Sequence[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A token stream -> (inputs [N, seq_len], targets [N, seq_len]) int64, with stride ``seq_len``.

    ``targets[n, t]`` is the token after ``inputs[n, t]``, or ``IGNORE`` where ``mask`` (per stream
    token) says that token is not to be learned. The tail shorter than ``seq_len + 1`` is dropped.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    stream = torch.tensor(list(ids), dtype=torch.int64)
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"a stream of {len(stream)} tokens cannot fill one row of {seq_len} + 1 tokens")
    rows = stream[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)  # [N, seq_len + 1], overlap 1
    targets = rows[:, 1:].clone()
    if mask is not None:
        learn = torch.tensor(list(mask), dtype=torch.bool)[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)
        targets[~learn[:, 1:]] = IGNORE
    return rows[:, :-1].contiguous(), targets


def pack_chats(examples: Sequence[ChatExample], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat examples packed end to end; only assistant tokens are targets."""
    ids = [i for ex in examples for i in ex.ids]
    mask = [m for ex in examples for m in ex.mask]
    return pack(ids, seq_len, mask)


def chat_rows(examples: Sequence[ChatExample], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One chat per row, padded with ``pad_id`` to ``seq_len + 1`` tokens: (inputs, targets) [N, seq_len].

    Unlike :func:`pack_chats`, every chat starts at position 0 with nothing before it, as a chat does at
    inference: packed end to end, a chat attends to the chats before it in its row (their system prompts
    included), and the model learns answers that depend on that stray context.
    """
    too_long = [len(ex.ids) for ex in examples if len(ex.ids) > seq_len + 1]
    if too_long:
        raise ValueError(f"{len(too_long)} chats are longer than a row of {seq_len} + 1 tokens "
                         f"(longest {max(too_long)}); drop or cut them first")
    if not examples:
        raise ValueError("no chats to put in rows")
    rows = torch.full((len(examples), seq_len + 1), pad_id, dtype=torch.int64)
    learn = torch.zeros((len(examples), seq_len + 1), dtype=torch.bool)
    for n, ex in enumerate(examples):
        rows[n, :len(ex.ids)] = torch.tensor(ex.ids, dtype=torch.int64)
        learn[n, :len(ex.mask)] = torch.tensor(ex.mask, dtype=torch.bool)
    targets = rows[:, 1:].clone()
    targets[~learn[:, 1:]] = IGNORE
    return rows[:, :-1].contiguous(), targets


def eval_batches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int,
                 max_batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out rows in their fixed order, cut into batches (the last may be smaller)."""
    out = [(inputs[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return out if max_batches is None else out[:max_batches]


class BatchIterator:
    """Endless shuffled batches over packed rows; its position (epoch, index) is checkpoint state.

    Epoch e visits the rows in the order ``randperm(N, seed + e)``; a batch never mixes epochs (the
    incomplete last batch of an epoch is skipped), so every batch has exactly ``batch_size`` rows.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, seed: int = 0):
        if len(inputs) < batch_size:
            raise ValueError(f"{len(inputs)} rows cannot fill one batch of {batch_size}")
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.index = 0, 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(len(self.inputs), generator=gen)
        return self._order

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index + self.batch_size > len(self.inputs):
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        rows = self._epoch_order()[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return self.inputs[rows], self.targets[rows]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "rows": len(self.inputs),
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["rows"], state["batch_size"], state["seed"]) != (len(self.inputs), self.batch_size, self.seed):
            raise ValueError(f"data position {state} does not match this data "
                             f"(rows={len(self.inputs)}, batch_size={self.batch_size}, seed={self.seed})")
        self.epoch, self.index, self._order = state["epoch"], state["index"], None


def pretraining_texts(data_dir: str | os.PathLike, data: str, seed: int = 0, tales_share: float = 0.3,
                      limit: int | None = None) -> list[str]:
    """Training texts for ``data`` in (tinystories, tales, mix), shuffled by ``seed``.

    ``mix`` adds tale paragraphs (books split at blank lines) until they make up about ``tales_share``
    of the characters, as the data README suggests (25-35 %).
    """
    data_dir = Path(data_dir)
    stories = list(read_records(data_dir / CORPUS_FILES["tinystories"], limit=limit))
    if data == "tinystories":
        return shuffled(stories, seed)
    books = list(read_records(data_dir / CORPUS_FILES["tales"]))
    paragraphs = [p.strip() for book in books for p in book.split("\n\n") if p.strip()]
    if data == "tales":
        return paragraphs if limit is None else paragraphs[:limit]
    if data != "mix":
        raise ValueError(f"unknown data {data!r}; choose tinystories, tales or mix")
    budget = tales_share / (1 - tales_share) * sum(map(len, stories))
    picked, size = [], 0
    for p in shuffled(paragraphs, seed + 1):
        if size >= budget:
            break
        picked.append(p)
        size += len(p)
    # Consecutive tale paragraphs stay in book order only within one record; records are shuffled.
    return shuffled(stories + picked, seed)


def validation_text(data_dir: str | os.PathLike) -> str:
    """The TinyStories validation head (no story boundaries: split it into chunks of tokens)."""
    return next(read_records(Path(data_dir) / CORPUS_FILES["tinystories_valid"]))
