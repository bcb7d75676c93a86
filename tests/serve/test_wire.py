"""The engine process's frames: requests and events survive the trip unchanged; broken streams are refused."""

from __future__ import annotations

import io

import pytest
import torch

from llama4.inference.constrained import JsonConstraint
from llama4.inference.requests import FinishEvent, GenerationRequest, PromptEvent, TokenEvent
from llama4.inference.sampling import SamplingParams
from llama4.serve.wire import (
    WireError,
    decode_event,
    decode_request,
    encode_event,
    encode_request,
    read_frame,
    write_frame,
)


def round_trip(header: dict, payload: bytes = b"") -> tuple[dict, bytes]:
    buffer = io.BytesIO()
    write_frame(buffer, header, payload)
    buffer.seek(0)
    frame = read_frame(buffer)
    assert read_frame(buffer) is None  # then the end of the stream
    return frame


def test_a_request_with_images_sampling_stops_and_a_schema_arrives_unchanged(tok):
    pixels = torch.randn(2, 3, 8, 8).to(torch.bfloat16)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                            frequency_penalty=0.5, presence_penalty=-0.5, seed=2**40 + 3, logprobs=3,
                            logit_bias=((44, -100.0), (7, 2.5)))
    request = GenerationRequest(prompt=[1, 2, 3, 300], pixel_values=pixels, params=params, max_tokens=17,
                                stop=("\n\n", "END"), stop_tokens=[5, 6], constraint=JsonConstraint(tok, schema),
                                prompt_logprobs=2)
    got = decode_request(*round_trip(*encode_request(request)), tok)
    assert got.prompt == request.prompt and got.params == params and got.max_tokens == 17
    assert got.prompt_logprobs == 2
    assert tuple(got.stop) == ("\n\n", "END") and list(got.stop_tokens) == [5, 6]
    assert got.pixel_values.dtype == torch.bfloat16 and torch.equal(got.pixel_values, pixels)
    assert isinstance(got.constraint, JsonConstraint) and got.constraint.schema == schema
    assert got.constraint is not request.constraint  # a fresh one, compiled on the receiving side


def test_a_plain_request_keeps_its_defaults(tok):
    got = decode_request(*round_trip(*encode_request(GenerationRequest(prompt=[7]))), tok)
    assert got == GenerationRequest(prompt=[7], stop=())
    assert got.stop_tokens is None and got.constraint is None and got.pixel_values is None


def test_any_object_constraint_has_no_schema(tok):
    got = decode_request(*round_trip(*encode_request(GenerationRequest([1], constraint=JsonConstraint(tok)))), tok)
    assert isinstance(got.constraint, JsonConstraint) and got.constraint.schema is None


def test_a_request_can_share_the_tiles_of_an_earlier_one(tok):
    pixels = torch.randn(1, 3, 4, 4).to(torch.bfloat16)
    header, payload = round_trip(*encode_request(GenerationRequest([1, 2], pixel_values=pixels), pixels_from=5))
    assert payload == b"" and header["pixels_from"] == 5
    earlier = torch.ones(1, 3, 4, 4)
    assert decode_request(header, payload, tok, {5: earlier}.get).pixel_values is earlier
    with pytest.raises(WireError, match="image tiles of request 5, which are not at hand"):
        decode_request(header, payload, tok, {4: earlier}.get)


def test_only_json_constraints_and_known_dtypes_can_cross():
    class Custom:
        def restrict(self, logits):
            return logits

        def advance(self, token_id):
            pass

    with pytest.raises(TypeError, match="only JSON constraints"):
        encode_request(GenerationRequest([1], constraint=Custom()))
    with pytest.raises(TypeError, match="image tiles must be one of"):
        encode_request(GenerationRequest([1], pixel_values=torch.zeros(1, 3, 2, 2, dtype=torch.float64)))


@pytest.mark.parametrize("event", [
    TokenEvent("he", 17), TokenEvent("", 3, -0.25, [(3, -0.25), (9, -float("inf"))]),
    FinishEvent("stop", "tail", 12, 4, 8), FinishEvent("error", error="prefill failed: boom"),
    PromptEvent([None, -1.5, -0.25], [None, [(3, -0.5), (9, -1.5)], []])])
def test_events_arrive_unchanged(event):
    header, _ = round_trip({"events": [encode_event(41, event)]})
    assert decode_event(header["events"][0]) == (41, event)


def test_a_truncated_or_garbled_stream_is_an_error():
    buffer = io.BytesIO()
    write_frame(buffer, {"op": "stop"})
    whole = buffer.getvalue()
    for cut in (3, len(whole) - 1):
        with pytest.raises(WireError, match="the stream ended inside"):
            read_frame(io.BytesIO(whole[:cut]))
    bad = io.BytesIO()
    write_frame(bad, {"x": 1})
    garbled = bad.getvalue().replace(b'{"x":1}', b'[1,2,3]')
    with pytest.raises(WireError, match="JSON object"):
        read_frame(io.BytesIO(garbled))
    with pytest.raises(WireError, match="not JSON"):
        read_frame(io.BytesIO(bad.getvalue().replace(b'{"x":1}', b'{"x";1}')))
    assert read_frame(io.BytesIO(b"")) is None
