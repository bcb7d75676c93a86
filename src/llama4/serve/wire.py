"""The messages between the HTTP process and the engine process (engine_process.py), as bytes.

A frame is a JSON header and an optional binary payload (a request's image tiles), each preceded by
its length: ``>II`` (header bytes, payload bytes), then the header, then the payload. Only plain data
crosses: prompts, sampling parameters, a JSON schema instead of a constraint object (the engine side
compiles its own), raw tensor bytes with their dtype and shape. Nothing is pickled, so neither side
ever runs code the other sent.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import asdict
from typing import BinaryIO

import torch

from llama4.dtypes import DTYPES, dtype_name, torch_dtype
from llama4.inference.constrained import JsonConstraint
from llama4.inference.requests import Event, FinishEvent, GenerationRequest, PromptEvent, TokenEvent
from llama4.inference.sampling import SamplingParams

_LENGTHS = struct.Struct(">II")
_TILE_DTYPES = sorted(set(DTYPES.values()))  # image tiles cross under torch's own names


class WireError(Exception):
    """A frame that cannot be read (a truncated stream, a header that is not the expected JSON)."""


def write_frame(out: BinaryIO, header: dict, payload: bytes = b"") -> None:
    data = json.dumps(header, separators=(",", ":")).encode()
    out.write(_LENGTHS.pack(len(data), len(payload)) + data + payload)
    out.flush()


def read_frame(source: BinaryIO) -> tuple[dict, bytes] | None:
    """The next frame, or None at the end of the stream (the other side has gone)."""
    lengths = source.read(_LENGTHS.size)
    if not lengths:
        return None
    if len(lengths) < _LENGTHS.size:
        raise WireError("the stream ended inside a frame's lengths")
    size, payload_size = _LENGTHS.unpack(lengths)
    data, payload = source.read(size), source.read(payload_size) if payload_size else b""
    if len(data) < size or len(payload) < payload_size:
        raise WireError(f"the stream ended inside a frame ({size} + {payload_size} bytes announced)")
    try:
        header = json.loads(data)
    except ValueError as e:
        raise WireError(f"a frame header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise WireError("a frame header must be a JSON object")
    return header, payload


def encode_request(request: GenerationRequest, pixels_from: int | None = None) -> tuple[dict, bytes]:
    """A request as (header fields, payload); its constraint must be a :class:`JsonConstraint`.

    ``pixels_from``: the key of an earlier request with the very same image tiles (e.g. another choice
    of ``n``); they are then not sent again, and the receiver gives both requests one tensor (which
    lets the engine prefill the prompt once for all of them)."""
    header = {"prompt": list(request.prompt), "params": asdict(request.params), "max_tokens": request.max_tokens,
              "stop": list(request.stop),
              "stop_tokens": None if request.stop_tokens is None else list(request.stop_tokens),
              "prompt_logprobs": request.prompt_logprobs, "adapter": request.adapter}
    constraint = request.constraint
    if constraint is not None:
        if not isinstance(constraint, JsonConstraint):
            raise TypeError(f"only JSON constraints can be sent to the engine process, got {type(constraint).__name__}")
        header["json_schema"] = {"schema": constraint.schema}
    payload = b""
    pixels = request.pixel_values
    if pixels is not None and pixels_from is not None:
        header["pixels_from"] = pixels_from
    elif pixels is not None:
        name = dtype_name(pixels.dtype)
        if name not in _TILE_DTYPES:
            raise TypeError(f"image tiles must be one of {_TILE_DTYPES}, got {name}")
        pixels = pixels.detach().cpu().contiguous()
        header["pixels"] = {"dtype": name, "shape": list(pixels.shape)}
        payload = pixels.view(torch.uint8).numpy().tobytes() if pixels.numel() else b""
    return header, payload


def decode_request(header: dict, payload: bytes, tokenizer,
                   earlier_pixels: Callable[[int], torch.Tensor | None] = lambda key: None) -> GenerationRequest:
    """The request :func:`encode_request` wrote; its JSON constraint is compiled against ``tokenizer``;
    ``earlier_pixels(key)``: the tiles of an earlier request, for a header that refers to them."""
    pixels = None
    if "pixels_from" in header:
        pixels = earlier_pixels(header["pixels_from"])
        if pixels is None:
            raise WireError(f"the request refers to the image tiles of request {header['pixels_from']}, "
                            "which are not at hand")
    elif "pixels" in header:
        spec = header["pixels"]
        dtype = torch_dtype(spec["dtype"])
        pixels = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(spec["shape"])
    constraint = None
    if "json_schema" in header:
        constraint = JsonConstraint(tokenizer, header["json_schema"]["schema"])
    return GenerationRequest(prompt=header["prompt"], pixel_values=pixels, params=SamplingParams(**header["params"]),
                             max_tokens=header["max_tokens"], stop=tuple(header["stop"]),
                             stop_tokens=header["stop_tokens"], constraint=constraint,
                             prompt_logprobs=header.get("prompt_logprobs"), adapter=header.get("adapter"))


def encode_event(key: int, event: Event) -> list:
    if isinstance(event, TokenEvent):
        top = None if event.top is None else [list(pair) for pair in event.top]
        return ["t", key, event.text, event.token, event.logprob, top]
    if isinstance(event, PromptEvent):
        return ["p", key, event.logprobs, [None if t is None else [list(pair) for pair in t] for t in event.top]]
    return ["f", key, event.reason, event.text, event.prompt_tokens, event.completion_tokens, event.cached_tokens,
            event.error, event.bad_request]


def decode_event(item: list) -> tuple[int, Event]:
    if item[0] == "t":
        _, key, text, token, logprob, top = item
        return key, TokenEvent(text, token, logprob, None if top is None else [tuple(pair) for pair in top])
    if item[0] == "p":
        _, key, logprobs, top = item
        return key, PromptEvent(logprobs, [None if t is None else [tuple(pair) for pair in t] for t in top])
    _, key, reason, text, prompt, completion, cached, error, bad_request = item
    return key, FinishEvent(reason, text, prompt, completion, cached, error, bad_request)
