"""Data of the instruct stage: chats from the shared data, synthetic-image questions, and a mixture.

Chats (each a list of OpenAI-style messages):

* small talk: Microsoft Personality Chat, the ``friend`` persona (MIT);
* identity: LLaMA-Factory's identity template filled with this model's name (Apache-2.0);
* task dialogues: a seeded subset of Schema-Guided Dialogue, cut to their first turns (CC BY-SA 4.0),
  each under a system prompt that sets the booking-assistant role (``TASK_SYSTEM``): without it the
  dialogues' style took over plain chat ("Who are you?" -> "I found 10 events for you.");
* story requests made here from TinyStories (CDLA-Sharing-1.0): "Tell me a story about a dog." -> a
  training story that contains "dog".

Image rows hold one synthetic picture (:mod:`llama4.train.shapes`) and a few questions about it; each row
is padded to the row length, so a batch carries exactly one picture per row.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from llama4.train.data import CORPUS_FILES, IGNORE, read_records, shuffled
from llama4.train.shapes import answers, draw_scene

IDENTITY_FILE = "chat/identity/identity.json"
STORY_TOPICS = ("dog", "cat", "bird", "ball", "tree", "fish", "bear", "rabbit", "frog", "duck", "car", "boat",
                "flower", "cake", "sun", "park", "toy", "mouse", "lion", "horse", "garden", "rain", "friend",
                "princess", "dragon", "monkey", "kite", "star", "snow", "truck")
STORY_ASKS = ("Tell me a story about a {}.", "Can you tell me a story about a {}?", "Write a short story about a {}.",
              "I want a story about a {}.")
PLAIN_STORY_ASKS = ("Tell me a story.", "Can you tell me a short story?", "Write a story for me.")


def smalltalk_chats(data_dir: Path, persona: str = "friend") -> list[list[dict]]:
    records = read_records(data_dir / CORPUS_FILES["smalltalk"], field=None)
    return [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
            for r in records if r["persona"] == persona]


def identity_chats(data_dir: Path, name: str, author: str) -> list[list[dict]]:
    records = json.loads((data_dir / IDENTITY_FILE).read_text(encoding="utf-8"))
    chats = []
    for r in records:
        question = (r["instruction"] + ("\n" + r["input"] if r.get("input") else "")).strip()
        answer = r["output"].replace("{{name}}", name).replace("{{author}}", author)
        chats.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return chats


TASK_SYSTEM = ("You are a booking assistant. You search for events, restaurants, salons, flights, hotels and "
               "apartments, and you book them.")


def dialogue_chats(data_dir: Path, count: int, max_messages: int, seed: int) -> list[list[dict]]:
    dialogues = [r["messages"] for r in read_records(data_dir / CORPUS_FILES["sgd"], field=None)]
    picked = shuffled(dialogues, seed)[:count]
    out = []
    for messages in picked:
        cut = messages[:max_messages]
        while cut and cut[-1]["role"] != "assistant":
            cut = cut[:-1]
        if cut and cut[0]["role"] == "user":
            out.append([{"role": "system", "content": TASK_SYSTEM}]
                       + [{"role": m["role"], "content": m["content"]} for m in cut])
    return out


def story_request_chats(stories: Sequence[str], count: int, seed: int,
                        max_chars: int | None = None) -> list[list[dict]]:
    """Requests for a story (about a topic the story mentions, or none) answered with that story (of at
    most ``max_chars`` characters: the shortest stories fit one chat row)."""
    rng = random.Random(seed)
    chats = []
    fitting = [s for s in stories if max_chars is None or len(s.strip()) <= max_chars]
    for story in shuffled(fitting, seed)[:count]:
        words = set(re.findall(r"[a-z]+", story.lower()))
        topics = [t for t in STORY_TOPICS if t in words]
        ask = rng.choice(STORY_ASKS).format(rng.choice(topics)) if topics else rng.choice(PLAIN_STORY_ASKS)
        chats.append([{"role": "user", "content": ask}, {"role": "assistant", "content": story.strip()}])
    return chats


DIALOGUES = 400  # task dialogues in the instruct stage (the model card names the count)


def instruct_chats(data_dir: str | Path, name: str, author: str, seed: int, dialogues: int = DIALOGUES,
                   story_requests: int = 1000, max_story_chars: int = 900) -> list[list[dict]]:
    """All chats of the instruct stage, shuffled by ``seed``."""
    data_dir = Path(data_dir)
    stories = list(read_records(data_dir / CORPUS_FILES["tinystories"]))
    # Six copies of the identity chats: with two or four the model no longer said who it was (it answered
    # "Who are you?" with a small-talk line); with six it does, and answers much other small talk with it.
    chats = (smalltalk_chats(data_dir) + identity_chats(data_dir, name, author) * 6
             + dialogue_chats(data_dir, dialogues, max_messages=6, seed=seed)
             + story_request_chats(stories, story_requests, seed, max_chars=max_story_chars))
    return shuffled(chats, seed)


def image_row(tok, rng: random.Random, seq_len: int) -> tuple[list[int], list[bool], torch.Tensor]:
    """One picture and as many question/answer turns about it as fit in ``seq_len + 1`` tokens."""
    from llama4.prompt import preprocess_image

    image, scene = draw_scene(rng)
    pixels, grid = preprocess_image(image)
    pairs = answers(scene, rng)
    while pairs:
        messages: list[dict] = []
        for k, (question, answer) in enumerate(pairs):
            content = [{"type": "image", "grid": grid}, {"type": "text", "text": question}] if k == 0 else question
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        enc = tok.encode_chat(messages)
        if len(enc.ids) <= seq_len + 1:
            return list(enc.ids), list(enc.assistant_mask), pixels
        pairs = pairs[:-1]
    raise ValueError(f"a row of {seq_len} tokens cannot hold one picture and one question")


class SeededBatches:
    """Endless batches drawn fresh from ``seed`` and the batch index, which is their whole state (a
    resumed run draws the same batches). Subclasses draw one batch in ``__next__`` and bump ``index``."""

    what = "batches"

    def __init__(self, seed: int):
        self.seed, self.index = seed, 0

    def __iter__(self) -> "SeededBatches":
        return self

    def state_dict(self) -> dict:
        return {"index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"{self.what} were drawn with seed {state['seed']}, not {self.seed}")
        self.index = state["index"]


class ImageBatches(SeededBatches):
    """Endless batches of picture rows, drawn fresh from ``seed`` and the batch index (its state)."""

    what = "image batches"

    def __init__(self, tok, batch_size: int, seq_len: int, seed: int):
        super().__init__(seed)
        self.tok, self.batch_size, self.seq_len = tok, batch_size, seq_len

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = random.Random(f"images:{self.seed}:{self.index}")
        self.index += 1
        inputs, targets, tiles = [], [], []
        for _ in range(self.batch_size):
            ids, mask, pixels = image_row(self.tok, rng, self.seq_len)
            pad = self.seq_len + 1 - len(ids)
            ids, mask = ids + [self.tok.pad_id] * pad, mask + [False] * pad
            inputs.append(ids[:-1])
            targets.append([t if m else IGNORE for t, m in zip(ids[1:], mask[1:])])
            tiles.append(pixels)
        return torch.tensor(inputs), torch.tensor(targets), torch.cat(tiles)


class Mixture:
    """Batches from several sources in a fixed repeating pattern (e.g. image, chat, image, text)."""

    def __init__(self, sources: dict[str, Iterator], pattern: Sequence[str]):
        unknown = set(pattern) - set(sources)
        if unknown or not pattern:
            raise ValueError(f"pattern {list(pattern)} names sources that do not exist: {sorted(unknown)}")
        self.sources, self.pattern, self.step = sources, list(pattern), 0

    def __iter__(self) -> "Mixture":
        return self

    def __next__(self):
        name = self.pattern[self.step % len(self.pattern)]
        self.step += 1
        return next(self.sources[name])

    def state_dict(self) -> dict:
        return {"step": self.step, "pattern": self.pattern,
                "sources": {name: source.state_dict() for name, source in self.sources.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["pattern"] != self.pattern or set(state["sources"]) != set(self.sources):
            raise ValueError(f"mixture state {state['pattern']} does not match this mixture {self.pattern}")
        self.step = state["step"]
        for name, source in self.sources.items():
            source.load_state_dict(state["sources"][name])
