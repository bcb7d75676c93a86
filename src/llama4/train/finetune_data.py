"""Data of ``llama4 finetune``: OpenAI-style chat JSONL -> examples with loss masks -> rows -> batches.

One example a line: ``{"messages": [...], "tools": [...]}`` (``tools`` optional). Messages have the roles
system / user / assistant / tool; content is a string or a list of parts (``text``; ``image_url`` with a
``data:`` URL or a path relative to the JSONL file; ``image`` with such a path); assistant messages may carry
``tool_calls``. Each example is rendered with the project's chat template (:func:`llama4.train.data.chat_example`'s
rendering, with the line's tools), so the loss mask covers exactly the assistant turns: their content, tool
calls and end-of-turn token.

Rows: by default one example per row, starting at position 0 as at inference, as the instruct stage puts its
chats (``train.data.chat_rows``): the model has no document mask, so examples packed into one row attend to
the examples before them, and the instruct stage found that such stray context is learned (a chat answered in
the style of the one before it). ``pack=True`` packs whole examples, in order, into rows of up to ``seq_len +
1`` tokens for throughput when that is acceptable; an example is never split, so a picture's tokens and its
tiles stay in one row. A batch is cut to its longest row (causal attention: trailing padding changes nothing
before it), so a generous ``seq_len`` costs nothing in the default layout.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llama4.prompt.images import ImageError, preprocess_image
from llama4.train.data import IGNORE, BatchIterator, ChatExample, chat_rows

LINE_KEYS = ("messages", "tools", "parallel_tool_calls")  # parallel_tool_calls: OpenAI's, no effect here
ROLES = ("system", "user", "assistant", "tool")
IMAGE_PARTS = ("image_url", "image")


@dataclass(frozen=True)
class Example:
    """One rendered chat: tokens, loss mask (True: an assistant token to learn), its pictures' tiles
    (bf16, in the order their tokens appear) and where it came from (``file:line``)."""

    ids: list[int]
    mask: list[bool]
    pixels: torch.Tensor | None
    source: str


def _image_source(part: dict, base: Path, where: str) -> bytes | Path:
    """The bytes of a ``data:`` URL, or the image file a path names (relative to the JSONL file)."""
    if part["type"] == "image":
        url = part.get("image")
    else:
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url:
        raise ValueError(f"{where}: an image part needs {{'type': 'image_url', 'image_url': {{'url': ...}}}} with a "
                         f"data: URL or a file path, got {part!r}")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ValueError(f"{where}: image data URLs must be base64-encoded (data:image/png;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}: the image data URL is not valid base64") from None
    if url.startswith(("http://", "https://")):
        raise ValueError(f"{where}: remote image URLs are not fetched; use a data: URL or a file path "
                         f"relative to the JSONL file")
    path = base / url.removeprefix("file://")
    if not path.is_file():
        raise ValueError(f"{where}: image file {path} not found (paths are relative to the JSONL file)")
    return path


def _with_pictures(messages: list, base: Path, where: str, max_tiles: int) -> tuple[list, list[torch.Tensor]]:
    """The messages with every image part replaced by ``{"type": "image", "grid": ...}``, and their tiles."""
    out, tiles = [], []
    for m, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: messages[{m}] must be an object with 'role' and 'content', got {message!r}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: messages[{m}] has unknown role {role!r}; allowed roles: {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for k, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") in IMAGE_PARTS:
                    at = f"{where}: messages[{m}].content[{k}]"
                    try:
                        pixels, grid = preprocess_image(_image_source(part, base, at), max_tiles)
                    except ImageError as e:
                        raise ValueError(f"{at}: {e}") from None
                    tiles.append(pixels)
                    part = {"type": "image", "grid": grid}
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out, tiles


def parse_line(tok, line: str, base: Path, where: str, max_tiles: int = 16) -> Example:
    """One JSONL line -> an :class:`Example` (``where``: ``file:line`` for error messages)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ValueError(f'{where}: each line must be an object {{"messages": [...]}} (optionally with "tools"), '
                         f"got {type(record).__name__}" + ("" if not isinstance(record, dict) else
                                                           f" with keys {sorted(record)}"))
    unknown = sorted(set(record) - set(LINE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; a line may hold {', '.join(LINE_KEYS)}")
    messages, tiles = _with_pictures(record["messages"], base, where, max_tiles)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the chat has no assistant message: nothing to learn (the loss is on the "
                         "assistant turns only)")
    tools = record.get("tools") or None
    try:
        enc = tok.encode_chat(messages, add_generation_prompt=False, tools=tools)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    example = ChatExample(list(enc.ids), list(enc.assistant_mask))
    return Example(example.ids, example.mask, torch.cat(tiles) if tiles else None, where)


def read_chat_jsonl(tok, path: str | os.PathLike, max_tiles: int = 16) -> list[Example]:
    """Every example of a chat JSONL file (blank lines skipped); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                examples.append(parse_line(tok, line, path.parent, f"{path}:{number}", max_tiles))
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return examples


def image_files(path: str | os.PathLike) -> list[Path]:
    """The image files a chat JSONL file refers to by path (for the run's record of its data)."""
    path = Path(path)
    found: dict[Path, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        for message in json.loads(line).get("messages", []):
            content = message.get("content") if isinstance(message, dict) else None
            for part in content if isinstance(content, list) else []:
                if isinstance(part, dict) and part.get("type") in IMAGE_PARTS:
                    url = part.get("image") if part["type"] == "image" else part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if isinstance(url, str) and not url.startswith(("data:", "http://", "https://")):
                        found[path.parent / url.removeprefix("file://")] = None
    return list(found)


def split_eval(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded choice of ``round(fraction * n)`` examples (at least 1) held out, the rest kept
    in file order. Deterministic: the same file, fraction and seed give the same split."""
    if not 0 < fraction < 1:
        raise ValueError(f"eval fraction must be between 0 and 1 (exclusive), got {fraction}")
    n = len(examples)
    count = max(1, round(fraction * n))
    if count >= n:
        raise ValueError(f"an eval fraction of {fraction} of {n} examples leaves none to train on")
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


@dataclass
class Rows:
    """Examples laid out in rows: inputs / targets [N, seq_len] (padding: ``pad_id`` in, IGNORE out), each
    row's real input length, its pictures' tiles (None: none) and how many examples it holds."""

    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: list[int]
    pixels: list[torch.Tensor | None]
    examples: list[int]

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: Sequence[int]) -> tuple:
        """(inputs, targets[, pixel tiles]) of these rows, cut to the longest of them."""
        width = max(self.lengths[r] for r in rows)
        index = torch.as_tensor(list(rows), dtype=torch.int64)
        batch = (self.inputs[index, :width], self.targets[index, :width])
        tiles = [self.pixels[r] for r in rows if self.pixels[r] is not None]
        return batch + (torch.cat(tiles),) if tiles else batch


def layout_rows(examples: Sequence[Example], seq_len: int, pad_id: int, pack: bool = False) -> Rows:
    """One example per row (default), or whole examples packed in order into rows of up to ``seq_len + 1``
    tokens (``pack``). An example longer than a row is refused, naming it."""
    if not examples:
        raise ValueError("no examples to lay out in rows")
    too_long = [e for e in examples if len(e.ids) > seq_len + 1]
    if too_long:
        longest = max(too_long, key=lambda e: len(e.ids))
        raise ValueError(f"{len(too_long)} example(s) do not fit a row of --seq-len {seq_len} + 1 tokens (e.g. "
                         f"{longest.source}: {len(longest.ids)} tokens); raise --seq-len to at least "
                         f"{len(longest.ids) - 1} or shorten them")
    groups: list[list[Example]] = []
    for e in examples:
        if pack and groups and sum(len(g.ids) for g in groups[-1]) + len(e.ids) <= seq_len + 1:
            groups[-1].append(e)
        else:
            groups.append([e])
    joined = [ChatExample([i for e in g for i in e.ids], [m for e in g for m in e.mask]) for g in groups]
    inputs, targets = chat_rows(joined, seq_len, pad_id)
    pixels = [torch.cat([e.pixels for e in g if e.pixels is not None]) if any(e.pixels is not None for e in g)
              else None for g in groups]
    return Rows(inputs, targets, [len(j.ids) - 1 for j in joined], pixels, [len(g) for g in groups])


def target_tokens(rows: Rows) -> int:
    return int((rows.targets != IGNORE).sum())


class RowBatches:
    """Endless shuffled batches of rows, resumable: the shuffling and position are a
    :class:`llama4.train.data.BatchIterator`'s over the row indices (epoch e in the order of its seed, no
    batch mixing epochs). The state also carries the process's torch RNG, which LoRA dropout draws from,
    so that a resumed run drops out what the uninterrupted one did."""

    def __init__(self, rows: Rows, batch_size: int, seed: int):
        if len(rows) < batch_size:
            raise ValueError(f"{len(rows)} training rows cannot fill one batch of {batch_size}: lower --batch-size "
                             "or add examples")
        index = torch.arange(len(rows))[:, None]
        self.rows, self.order = rows, BatchIterator(index, index, batch_size, seed=seed)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.rows) // self.order.batch_size

    def __iter__(self) -> "RowBatches":
        return self

    def __next__(self) -> tuple:
        picked, _ = next(self.order)
        return self.rows.batch(picked[:, 0].tolist())

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "torch_rng": torch.get_rng_state().numpy().tobytes().hex()}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict({k: v for k, v in state.items() if k != "torch_rng"})
        torch.set_rng_state(torch.frombuffer(bytearray(bytes.fromhex(state["torch_rng"])), dtype=torch.uint8))


def eval_row_batches(rows: Rows, batch_size: int) -> list[tuple]:
    """Held-out rows in order, in batches (the last may be smaller), each cut to its longest row."""
    return [rows.batch(range(at, min(at + batch_size, len(rows)))) for at in range(0, len(rows), batch_size)]


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    return max(1, math.ceil(epochs * steps_per_epoch))
