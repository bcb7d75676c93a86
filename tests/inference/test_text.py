"""Text generation on top of the tokenizer: stop strings, streaming chat, cached multi-turn sessions."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

import llama4
from llama4.inference.text import ChatSession, StopStrings, chat, prepare_messages, stream_chat
from llama4.presets import text_config
from llama4.prompt import ImageError

CORPUS = ["Once upon a time there was a little dog named Max. He liked to run and play in the park."] * 20


@pytest.fixture(scope="module")
def tok():
    return llama4.train_tokenizer(CORPUS, num_base_tokens=300)


@pytest.fixture(scope="module")
def model(tok):
    cfg = text_config(num_layers=4, vocab_size=tok.vocab_size, hidden_size=32, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=32, num_experts=4, attention_chunk_size=16, floor_scale=8,
                      bos_token_id=tok.bos_id, eos_token_ids=tok.eos_ids, pad_token_id=tok.pad_id)
    model = llama4.random_model(llama4.ModelConfig(text=cfg), std=0.3, seed=1)
    with torch.no_grad():  # make ordinary text likely (a random head mostly picks one of the 2048 specials)
        model.text.output.weight[tok.num_base_tokens:] = 0
        model.text.output.weight[:tok.num_base_tokens] *= 10
    return model


def test_stop_strings_never_leak_a_partial_stop():
    s = StopStrings(["STOP", "\n\n"])
    out = []
    for piece in ["hello ST", "O", "P there"]:
        text, hit = s.feed(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "hello " and hit


def test_stop_strings_release_held_text_when_it_cannot_be_a_stop():
    s = StopStrings(["STOP"])
    assert s.feed("ab S") == ("ab ", False)
    assert s.feed("x") == ("Sx", False)
    assert s.feed("ST") == ("", False)
    assert s.flush() == "ST"


def test_stream_chat_pieces_equal_the_decoded_tokens(model, tok):
    messages = [{"role": "user", "content": "Tell me about Max."}]
    completion = llama4.inference.text.Completion()
    pieces = list(stream_chat(model, tok, messages, max_new_tokens=30, completion=completion))
    assert "".join(pieces) == completion.text == tok.decode(completion.tokens, skip_special=True)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    expected = llama4.generate(model, [prompt], max_new_tokens=30, stop_tokens=tok.eos_ids)[0][len(prompt):]
    assert completion.tokens == [t for t in expected if t not in tok.eos_ids]


def test_stop_string_ends_the_reply(model, tok):
    messages = [{"role": "user", "content": "Tell me about Max."}]
    full = chat(model, tok, messages, max_new_tokens=40, stop_tokens=[])
    assert len(full.text) >= 6
    stop = full.text[3:6]
    cut = chat(model, tok, messages, max_new_tokens=40, stop=[stop], stop_tokens=[])
    assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"


def test_chat_session_reuses_the_cache_and_matches_a_fresh_run(model, tok):
    session = ChatSession(model, tok, max_new_tokens=12)
    first = "".join(session.send("Hello there."))
    cached_before = session.cache.seq_len
    second = "".join(session.send("And then?"))
    assert session.last.prompt_tokens < len(session.history) - cached_before + 20  # only the new turn was fed
    # Greedy reply of turn 2 equals a fresh generation over the whole conversation history.
    prompt = session.history[:len(session.history) - len(session.last.tokens) - 1]
    fresh = llama4.generate(model, [prompt], max_new_tokens=12, stop_tokens=tok.eos_ids)[0][len(prompt):]
    assert [t for t in fresh if t not in tok.eos_ids] == session.last.tokens
    assert tok.decode(session.last.tokens, skip_special=True) == second
    assert first  # the first turn produced text


def test_interrupted_reply_rebuilds_the_cache(model, tok):
    session = ChatSession(model, tok, max_new_tokens=12)
    stream = session.send("Hello there.")
    next(stream)
    stream.close()  # like Ctrl-C between tokens
    assert session.cache is None
    reply = "".join(session.send("Again?"))
    assert session.cache is not None and isinstance(reply, str)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_parts_are_preprocessed_and_get_their_grid():
    import base64

    url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What colour?"}]}]
    prepared, pixels = prepare_messages(messages)
    assert prepared[0]["content"][0] == {"type": "image", "grid": (1, 1)}
    assert pixels.shape == (1, 3, 336, 336)


@pytest.mark.parametrize("part, message", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "remote image URLs"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "not valid base64"),
    ({"type": "image", "image": "/etc/passwd"}, "paths are not accepted"),
])
def test_bad_image_parts_are_refused(part, message):
    with pytest.raises(ImageError, match=message):
        prepare_messages([{"role": "user", "content": [part]}])


def test_text_only_model_refuses_images(model, tok):
    messages = [{"role": "user", "content": [{"type": "image", "image": _png()}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(ValueError, match="no vision encoder"):
        chat(model, tok, messages)


def test_the_grids_forecast_from_image_headers_are_the_decoded_ones():
    """prepare_messages measures a prompt from the headers before decoding: EXIF-rotated images included."""
    import io

    from PIL import Image

    def image(fmt: str, orientation: int | None) -> bytes:
        exif = Image.Exif()
        if orientation is not None:
            exif[0x0112] = orientation
        buf = io.BytesIO()
        Image.new("RGB", (900, 300), "red").save(buf, format=fmt, exif=exif.tobytes())
        return buf.getvalue()

    parts = [{"type": "image", "image": image(fmt, o)} for fmt in ("JPEG", "PNG") for o in (None, 6, 8, 3)]
    forecasts = []
    prepared, _ = prepare_messages([{"role": "user", "content": parts}], before_decoding=forecasts.append)
    assert forecasts == [prepared]
    assert [p["grid"] for p in prepared[0]["content"]] == [(1, 3), (3, 1), (3, 1), (1, 3)] * 2
