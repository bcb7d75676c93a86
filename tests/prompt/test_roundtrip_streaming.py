"""decode(encode(s)) == s, streaming decode == full decode, invalid UTF-8 handling, multilingual text."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from llama4.prompt import StreamingDecoder, stream_decode


@settings(max_examples=300, deadline=None)
@given(hst.text(max_size=300))
def test_round_trip_small_vocabulary(small_tok, text):
    assert small_tok.decode(small_tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(hst.text(max_size=300))
def test_round_trip_real_vocabulary(real_tok, text):
    assert real_tok.decode(real_tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(hst.text(max_size=200), hst.data())
def test_streaming_equals_full_decode(small_tok, text, data):
    ids = small_tok.encode(text)
    dec = small_tok.stream_decoder()
    pieces = []
    pos = 0
    while pos < len(ids):  # feed in random-sized batches, including single ids
        step = data.draw(hst.integers(1, 4))
        pieces.append(dec.add(ids[pos : pos + step]))
        pos += step
    pieces.append(dec.flush())
    assert "".join(pieces) == small_tok.decode(ids) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in p for p in pieces)  # never half a character


@settings(max_examples=300, deadline=None)
@given(hst.lists(hst.integers(0, 255), max_size=60))
def test_streaming_equals_full_decode_on_invalid_bytes(small_tok, byte_ids):
    """Byte tokens in any order (as a model may emit): both sides use errors="replace" semantics."""
    ids = [small_tok.encode(chr(b))[0] if b < 128 else _byte_token(small_tok, b) for b in byte_ids]
    assert "".join(stream_decode(small_tok, ids)) == small_tok.decode(ids) == bytes(byte_ids).decode("utf-8", "replace")


def _byte_token(tok, b):
    return tok._ranks[bytes([b])]


def test_multibyte_character_split_across_tokens(real_tok):
    text = "😀🇫🇷 ✓"
    ids = real_tok.encode(text)
    assert len(ids) > 3  # the emoji are split into byte tokens
    dec = StreamingDecoder(real_tok)
    emitted = [dec.add(i) for i in ids] + [dec.flush()]
    assert "".join(emitted) == text
    assert all("\ufffd" not in e for e in emitted)


def test_invalid_utf8_decodes_with_replacement(real_tok):
    lone = [real_tok._ranks[b"\xe4"], real_tok._ranks[b"\xbd"]]  # first two bytes of a 3-byte character
    assert real_tok.decode(lone) == "\ufffd"
    assert real_tok.decode([real_tok._ranks[b"\xff"]] + real_tok.encode("ok")) == "\ufffdok"
    with pytest.raises(UnicodeDecodeError):
        real_tok.decode(lone, errors="strict")
    dec = real_tok.stream_decoder()
    assert dec.add(lone) == ""  # still waiting for the third byte
    assert dec.flush() == "\ufffd"


def test_streaming_can_skip_special_tokens(real_tok):
    ids = real_tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    text = "".join(stream_decode(real_tok, ids, skip_special=True))
    assert text == real_tok.decode(ids, skip_special=True) == "user\n\nHiassistant\n\n"


def test_udhr_round_trip_in_many_scripts(real_tok, small_tok, udhr):
    scripts = set()
    for record in udhr:
        text = record["text"]
        for tok in (real_tok, small_tok):
            ids = tok.encode(text)
            assert tok.decode(ids) == text, (record["code"], tok)
            assert "".join(stream_decode(tok, ids)) == text
        scripts.add(_script_of(text))
    assert len(udhr) >= 40 and len(scripts) >= 10, scripts


def _script_of(text: str) -> str:
    """The Unicode script block of the most common letter: enough to count distinct scripts."""
    import collections
    import unicodedata

    letters = collections.Counter(
        unicodedata.name(c, "?").split(" ")[0] for c in text if c.isalpha()
    )
    return letters.most_common(1)[0][0]


def test_real_tokenizer_compresses_non_latin_scripts(real_tok, udhr):
    """Meta's vocabulary is multilingual: well under one token per UTF-8 byte in every language."""
    for record in udhr:
        raw = record["text"].encode("utf-8")
        assert len(real_tok.encode(record["text"])) < 0.5 * len(raw), record["code"]
