import random

import pytest
import torch

from llama4.train.data import IGNORE
from llama4.train.instruct_data import (
    TASK_SYSTEM,
    ImageBatches,
    Mixture,
    dialogue_chats,
    identity_chats,
    image_row,
    smalltalk_chats,
    story_request_chats,
)

DATA = __import__("pathlib").Path(__file__).resolve().parents[3] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")


@pytest.fixture(scope="module")
def tok():
    from llama4.prompt import train_tokenizer

    text = ["What colour is the shape? It is red. They are circles. The background is white. "
            "I see two blue stars."] * 20
    return train_tokenizer(text, 300)


def test_image_row_layout_and_mask(tok):
    ids, mask, pixels = image_row(tok, random.Random(0), 256)
    assert len(ids) == len(mask) <= 257
    assert pixels.shape == (1, 3, 336, 336)
    assert ids.count(tok.patch_id) == 144 and ids.count(tok.image_start_id) == 1
    learned = tok.decode([t for t, m in zip(ids, mask) if m])
    assert "It is" in learned or "They are" in learned
    assert not any(m for t, m in zip(ids, mask) if t == tok.patch_id)  # never learn the picture slots


def test_image_row_drops_questions_to_fit(tok):
    ids, _, _ = image_row(tok, random.Random(0), 200)
    assert len(ids) <= 201
    with pytest.raises(ValueError, match="cannot hold one picture"):
        image_row(tok, random.Random(0), 100)


def test_image_batches_are_deterministic_and_resumable(tok):
    a = ImageBatches(tok, 2, 256, seed=5)
    first = next(a)
    x, y, p = first
    assert x.shape == y.shape == (2, 256) and p.shape == (2, 3, 336, 336)
    assert (x == tok.pad_id).any() and (y == IGNORE).any()
    state = a.state_dict()
    second = next(a)
    b = ImageBatches(tok, 2, 256, seed=5)
    b.load_state_dict(state)
    assert all(torch.equal(u, v) for u, v in zip(next(b), second))
    assert all(torch.equal(u, v) for u, v in zip(next(ImageBatches(tok, 2, 256, seed=5)), first))
    with pytest.raises(ValueError, match="seed"):
        ImageBatches(tok, 2, 256, seed=6).load_state_dict(state)


class Counter:
    def __init__(self, name):
        self.name, self.i = name, 0

    def __next__(self):
        self.i += 1
        return (self.name, self.i)

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def test_mixture_follows_its_pattern_and_resumes():
    mix = Mixture({"a": Counter("a"), "b": Counter("b")}, ["a", "b", "a"])
    assert [next(mix) for _ in range(5)] == [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2)]
    state = mix.state_dict()
    again = Mixture({"a": Counter("a"), "b": Counter("b")}, ["a", "b", "a"])
    again.load_state_dict(state)
    assert next(again) == next(mix) == ("a", 4)
    with pytest.raises(ValueError, match="do not exist"):
        Mixture({"a": Counter("a")}, ["a", "c"])
    with pytest.raises(ValueError, match="does not match"):
        Mixture({"a": Counter("a"), "b": Counter("b")}, ["b"]).load_state_dict(state)


@needs_data
def test_chat_sources():
    small = smalltalk_chats(DATA)
    assert len(small) > 300 and all(len(c) == 2 and c[0]["role"] == "user" for c in small)
    ident = identity_chats(DATA, "llama4-tiny", "the llama4 project")
    assert len(ident) == 91 and not any("{{" in c[1]["content"] for c in ident)
    assert any("llama4-tiny" in c[1]["content"] for c in ident)
    dialogues = dialogue_chats(DATA, 50, max_messages=6, seed=0)
    assert 40 <= len(dialogues) <= 50
    assert all(c[-1]["role"] == "assistant" and len(c) <= 7 and c[1]["role"] == "user" for c in dialogues)
    assert all(c[0] == {"role": "system", "content": TASK_SYSTEM} for c in dialogues)  # the role is set
    stories = ["Tom had a red ball. The ball was big.", "The sun was hot.", "Nothing here."]
    requests = story_request_chats(stories, 3, seed=0)
    assert sorted(c[1]["content"] for c in story_request_chats(stories, 3, seed=0, max_chars=16)) == [
        "Nothing here.", "The sun was hot."]
    for chat in requests:
        ask, story = chat[0]["content"], chat[1]["content"]
        assert story in stories
        if "about a" in ask:
            assert ask.split("about a ")[1].rstrip(".?") in story.lower()
