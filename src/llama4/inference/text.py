"""Text in, text out: chat messages (with images) to prompt tokens, and streamed text back.

``stream_chat`` is the streaming entry point for chat messages: it renders the messages with the
Llama 4 chat template (images preprocessed and laid out as tiles), generates, and yields text pieces
as they become valid UTF-8, holding back any text that could still turn into a stop string.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from llama4.inference.generate import DEFAULT_PREFILL_CHUNK, Request, generate_tokens, new_cache
from llama4.inference.sampling import SamplingParams, TokenChoice
from llama4.model.cache import KVCache
from llama4.model.transformer import Llama4Model
from llama4.prompt import ImageError, Tokenizer
from llama4.prompt.images import DEFAULT_MAX_PIXELS, best_fit_grid, decode_frame, open_image, tile_rgb, to_rgb_tensor
from llama4.quant.kv_cache import check_kv_format

IMAGE_PART_TYPES = ("image", "image_url")


def _image_source(part: dict, allow_paths: bool):
    """The bytes / path / PIL image an image part refers to (data: URLs decoded; remote URLs refused)."""
    if part.get("type") == "image":
        source = part.get("image")
        if source is None:
            raise ImageError("an image part needs an 'image' (PIL image, bytes or path)")
        if isinstance(source, (str, os.PathLike)) and not allow_paths:
            raise ImageError("image paths are not accepted here; send the image as bytes or a data: URL")
        if not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
            raise ImageError(f"an image part's 'image' must be a PIL image, bytes or a path, got "
                             f"{type(source).__name__}")
        return source
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise ImageError("an image_url part needs {'url': 'data:image/...;base64,...'}")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ImageError("image data URLs must be base64-encoded (data:image/png;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the image data URL is not valid base64") from None
    if url.startswith(("http://", "https://")):
        raise ImageError("remote image URLs are not fetched; send the image as a data: URL")
    if allow_paths:
        return url.removeprefix("file://")
    raise ImageError(f"unsupported image URL {url[:40]!r}; send the image as a data: URL")


def prepare_messages(messages: Sequence[dict], allow_paths: bool = False, max_tiles: int = 16, *,
                     max_pixels: int = DEFAULT_MAX_PIXELS,
                     before_decoding: Callable[[list[dict]], None] | None = None,
                     checkpoint: Callable[[], None] | None = None) -> tuple[list[dict], torch.Tensor | None]:
    """Preprocess every image part (in order) and attach its tile grid; returns messages and pixel tiles.

    The work is bounded before it is done (the caller counts the image parts first: the server, before it
    fetches any): every image's header is read (format, declared size <= ``max_pixels``) before any is decoded,
    and ``before_decoding`` gets the messages with the grids those sizes give, so that a caller can refuse a
    prompt that cannot fit before paying for the decode. ``checkpoint()`` is called before each decode (raise
    from it to stop, e.g. for a client that went away).
    """
    sources = [[_image_source(part, allow_paths) if _is_image(part) else None for part in message["content"]]
               if isinstance(message.get("content"), list) else None for message in messages]
    opened = {}
    try:
        for m, parts in enumerate(sources):
            for k, source in enumerate(parts or ()):
                if source is not None:
                    opened[m, k] = open_image(source, max_pixels=max_pixels)
        if before_decoding is not None:
            before_decoding(_with_grids(messages, {at: best_fit_grid(*_upright_size(image), max_tiles)
                                                   for at, image in opened.items()}))
        grids, tiles = {}, []
        for at, image in opened.items():
            if checkpoint is not None:
                checkpoint()
            pixels, grids[at] = tile_rgb(to_rgb_tensor(decode_frame(image)), max_tiles)
            tiles.append(pixels)
    finally:
        for at, image in opened.items():
            if image is not sources[at[0]][at[1]]:
                image.close()
    return _with_grids(messages, grids), (torch.cat(tiles) if tiles else None)


def _is_image(part) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES


def _with_grids(messages: Sequence[dict], grids: dict[tuple[int, int], tuple[int, int]]) -> list[dict]:
    """The messages with image part (message m, part k) replaced by ``{"type": "image", "grid": grids[m, k]}``."""
    out = []
    for m, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list) and any((m, k) in grids for k in range(len(content))):
            message = {**message, "content": [{"type": "image", "grid": grids[m, k]} if (m, k) in grids else part
                                              for k, part in enumerate(content)]}
        out.append(message)
    return out


_ORIENTATION = 0x0112  # EXIF tag; values 5 to 8 turn the image a quarter


def _upright_size(image) -> tuple[int, int]:
    """(height, width) of the image as it will be decoded, its EXIF orientation applied, from the header: the
    raw EXIF block read with it (PIL's getexif() may decode the whole image to find one, as for PNG). An
    orientation stored after the pixel data is missed: the grid is then a forecast (see prepare_messages)."""
    width, height = image.size
    raw = image.info.get("exif")
    turned = False
    if isinstance(raw, bytes):
        try:
            exif = Image.Exif()
            exif.load(raw)
            turned = exif.get(_ORIENTATION, 1) in (5, 6, 7, 8)
        except Exception:  # a broken EXIF block: decode_frame reports it, or ignores it as PIL does
            pass
    return (width, height) if turned else (height, width)


class StopStrings:
    """Finds stop strings in streamed text without ever emitting part of one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached (text after it is dropped)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = 0  # the longest tail of pending that could still grow into a stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Completion:
    """The result of one generation: text, tokens and timings."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str = "length"  # "stop" (stop token or string) or "length"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    logprobs: list = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        return (len(self.tokens) - 1) / self.decode_seconds if self.decode_seconds > 0 and len(self.tokens) > 1 else 0.0


def stream_tokens_as_text(model: Llama4Model, tokenizer: Tokenizer, prompt: list[int], *,
                          pixel_values: torch.Tensor | None = None, params: SamplingParams | None = None,
                          max_new_tokens: int = 256, stop: Sequence[str] = (), stop_tokens: Sequence[int] | None = None,
                          completion: Completion | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                          kv_cache: str = "auto") -> Iterator[str]:
    """Generate from prompt ids and yield text pieces; fills ``completion`` (if given) as it goes. ``kv_cache``:
    the global layers' KV storage (``auto``, ``bf16``, ``int8``, ``fp8``: see llama4.inference.generate.new_cache)."""
    completion = completion if completion is not None else Completion()
    completion.prompt_tokens = len(prompt)
    stop_ids = tokenizer.eos_ids if stop_tokens is None else tuple(stop_tokens)
    request = Request(list(prompt), pixel_values, params or SamplingParams())

    def steps():
        for event in generate_tokens(model, [request], max_new_tokens, stop_ids, prefill_chunk, kv_cache=kv_cache):
            yield None if event.stopped_by is not None else (event.choice.token, event.choice)

    yield from text_pieces(tokenizer, steps(), completion, stop)


def text_pieces(tokenizer: Tokenizer, steps: Iterable[tuple[int, TokenChoice | None] | None], completion: Completion,
                stop: Sequence[str] = ()) -> Iterator[str]:
    """The text of a reply as its tokens come: each step is (token, its choice or None), or None once a stop token
    ends the reply; pieces never split a character and end at the first stop string. Fills ``completion`` (tokens,
    logprobs, text, finish reason, prefill and decode seconds from the first step on)."""
    decoder = tokenizer.stream_decoder(skip_special=True)
    stops = StopStrings(stop)
    start = time.perf_counter()
    first = None
    for step in steps:
        now = time.perf_counter()
        if first is None:
            first = now
            completion.prefill_seconds = now - start
        completion.decode_seconds = now - first
        if step is None:
            completion.finish_reason = "stop"
            break
        token, choice = step
        completion.tokens.append(token)
        if choice is not None and choice.logprob is not None:
            completion.logprobs.append(choice)
        piece, hit = stops.feed(decoder.add(token))
        completion.text += piece
        if piece:
            yield piece
        if hit:
            completion.finish_reason = "stop"
            return
    tail, _ = stops.feed(decoder.flush())
    tail += stops.flush()
    completion.text += tail
    if tail:
        yield tail


def stream_chat(model: Llama4Model, tokenizer: Tokenizer, messages: Sequence[dict], *,
                params: SamplingParams | None = None, max_new_tokens: int = 256, stop: Sequence[str] = (),
                tools: Sequence[dict] | None = None, allow_image_paths: bool = False,
                stop_tokens: Sequence[int] | None = None, completion: Completion | None = None,
                kv_cache: str = "auto") -> Iterator[str]:
    """Stream the assistant's reply to OpenAI-style ``messages`` (text and image parts) as text pieces.

    Image parts: ``{"type": "image", "image": <PIL image | bytes | path>}`` or
    ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``. Paths are accepted
    only with ``allow_image_paths`` (the CLI), never from a network client.
    """
    prepared, pixel_values = prepare_messages(messages, allow_paths=allow_image_paths)
    if pixel_values is not None and model.vision is None:
        raise ValueError("this model has no vision encoder: it cannot take images")
    prompt = tokenizer.apply_chat_template(prepared, add_generation_prompt=True, tools=tools)
    if pixel_values is not None:
        pixel_values = pixel_values.to(model.text.embed.weight.dtype)
    yield from stream_tokens_as_text(model, tokenizer, prompt, pixel_values=pixel_values, params=params,
                                     max_new_tokens=max_new_tokens, stop=stop, stop_tokens=stop_tokens,
                                     completion=completion, kv_cache=kv_cache)


def chat(model: Llama4Model, tokenizer: Tokenizer, messages: Sequence[dict], **kwargs) -> Completion:
    """Non-streaming :func:`stream_chat`: the whole reply with token counts and timings."""
    completion = Completion()
    for _ in stream_chat(model, tokenizer, messages, completion=completion, **kwargs):
        pass
    return completion


class ChatSession:
    """A multi-turn conversation whose earlier turns stay in the KV cache (never re-prefilled).

    Each turn feeds only the new tokens: the end-of-turn token that closed the previous reply and the
    template's rendering of the new message plus the assistant header. The reply tokens are the model's
    own (not a re-encoding of their text). If a reply is interrupted mid-step the cache may be partial,
    so the next turn rebuilds it from the whole conversation.
    """

    def __init__(self, model: Llama4Model, tokenizer: Tokenizer, system: str | None = None,
                 params: SamplingParams | None = None, max_new_tokens: int = 512, kv_cache: str = "auto"):
        self.model, self.tokenizer = model, tokenizer
        self.kv_cache = check_kv_format(kv_cache)  # the global layers' KV storage (generate.new_cache)
        self.params = params or SamplingParams()
        self.max_new_tokens = max_new_tokens
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.pixels: list[torch.Tensor] = []  # tiles of every image so far, in order (messages hold grids)
        self.cache: KVCache | None = None
        self.pending: list[int] = []  # tokens that belong to the conversation but are not yet in the cache
        self.history: list[int] = []  # the whole conversation as the model has seen it (cache + pending)
        self.last: Completion | None = None

    def send(self, content, images: Sequence = ()) -> Iterator[str]:
        """Add a user turn (text, plus images as PIL images / bytes / paths) and stream the reply."""
        parts = [{"type": "image", "image": image} for image in images]
        message = {"role": "user", "content": parts + [{"type": "text", "text": content}] if parts else content}
        new_messages, pixel_values = prepare_messages([message], allow_paths=True)
        if pixel_values is not None and self.model.vision is None:
            raise ValueError("this model has no vision encoder: it cannot take images")
        before = self._render(self.messages, generation_prompt=False) if self.messages else []
        self.messages.append(new_messages[0])
        after = self._render(self.messages, generation_prompt=True)
        if pixel_values is not None:
            self.pixels.append(pixel_values)
        if after[:len(before)] != before or self.cache is None:
            self.cache, self.pending = new_cache(self.model, self.kv_cache), []
            new_tokens = after  # first turn, or the cache was dropped: (re)build from the whole conversation
            self.history = []
            pixel_values = torch.cat(self.pixels) if self.pixels else None
        else:
            new_tokens = self.pending + after[len(before):]
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.model.text.embed.weight.dtype)
        self.history = self.history[:len(self.history) - len(self.pending)] + new_tokens
        completion = Completion()
        request = Request(new_tokens, pixel_values, self.params)
        decoder = self.tokenizer.stream_decoder(skip_special=True)
        complete = False
        try:
            start = time.perf_counter()
            first = None
            for event in generate_tokens(self.model, [request], self.max_new_tokens, self.tokenizer.eos_ids,
                                         cache=self.cache):
                now = time.perf_counter()
                if first is None:
                    first, completion.prefill_seconds = now, now - start
                completion.decode_seconds = now - first
                completion.tokens.append(event.choice.token)
                if event.stopped_by is not None:
                    completion.finish_reason = "stop"
                    break
                piece = decoder.add(event.choice.token)
                completion.text += piece
                if piece:
                    yield piece
            tail = decoder.flush()
            completion.text += tail
            if tail:
                yield tail
            complete = True
        finally:
            self._finish(completion, len(new_tokens), complete)

    def _finish(self, completion: Completion, prompt_tokens: int, complete: bool) -> None:
        completion.prompt_tokens = prompt_tokens
        reply = completion.tokens
        if reply and reply[-1] in self.tokenizer.eos_ids:
            reply = reply[:-1]
        completion.tokens = reply
        self.messages.append({"role": "assistant", "content": completion.text})
        self.last = completion
        if complete:  # the cache holds the prompt and every reply token but the last one generated
            self.pending = completion.tokens[-1:] if completion.finish_reason == "length" else []
            self.pending += [self.tokenizer.eot_id]
            self.history += reply + [self.tokenizer.eot_id]
        else:
            self.cache = None  # interrupted (e.g. Ctrl-C) possibly mid-step: rebuild next turn

    def _render(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
