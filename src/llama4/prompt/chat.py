"""OpenAI-style chat messages to token ids in the Llama 4 instruct layout.

Layout (parity target: the chat template of transformers 5.23, reference sheet section 7)::

    <|begin_of_text|>
    <|header_start|>system<|header_end|>\\n\\n SYSTEM <|eot|>          (only if the caller gave one)
    <|header_start|>user<|header_end|>\\n\\n TEXT <|image|>... <|eot|>
    <|header_start|>assistant<|header_end|>\\n\\n TEXT <|eot|>
    <|header_start|>ipython<|header_end|>\\n\\n TOOL RESULT <|eot|>   (role "tool" or "ipython")
    <|header_start|>assistant<|header_end|>\\n\\n                   (add_generation_prompt)

A message is first turned into *segments*: runs of plain text and special tokens. Adjacent text is
joined and encoded as one span (exactly like tokenizing the rendered string between special
tokens), but never parsed for special-token strings, so ``<|eot|>`` typed by a user stays text.

Deviations from the HF template, where it would silently do something wrong: ``tool_calls`` that is
empty or null counts as absent (HF drops the whole message); ``tools=[]`` counts as no tools;
``tools_in_user_message=False`` without a system message is an error (HF drops the tools);
a non-user message where the tools must go (first after the system message) is an error;
``arguments`` given as a JSON string is decoded (HF would quote it); list contents of the system
message and of the first user message with tools are rendered part by part (HF uses only the first
part of a system list and the Python repr of a user list).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import special_tokens as st
from .tools import (
    ENVIRONMENT_LINE,
    TOOLS_IN_SYSTEM_INSTRUCTIONS,
    TOOLS_IN_USER_INSTRUCTIONS,
    render_tool_call,
    render_tool_definitions,
)

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool", "ipython")
PART_TYPES = ("text", "image", "image_url")
PATCHES_PER_TILE = 144  # (336 / 14)^2 patches per tile, reduced 4x by pixel shuffle


@dataclass(frozen=True)
class Text:
    text: str
    train: bool = False


@dataclass(frozen=True)
class Special:
    token: str  # e.g. "<|eot|>"
    train: bool = False


@dataclass(frozen=True)
class Image:
    grid: tuple[int, int] | None  # (rows, cols) of local tiles; None until a grid is assigned


@dataclass(frozen=True)
class ChatEncoding:
    """Token ids of a chat and, per id, whether it is assistant output (the tokens to train on)."""

    ids: list[int]
    assistant_mask: list[bool]


def image_token_layout(grid: tuple[int, int], patches_per_tile: int = PATCHES_PER_TILE) -> list[str]:
    """Special-token strings standing for one image with a ``(rows, cols)`` tile grid.

    1x1: image_start, image, patches, image_end. Otherwise the local tiles row by row (patches,
    x-separator between columns, y-separator after each row), then image + the global tile's patches.
    """
    rows, cols = _check_grid(grid)
    out = [st.IMAGE_START]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                out += [st.PATCH] * patches_per_tile
                if x < cols - 1:
                    out.append(st.TILE_X_SEPARATOR)
            out.append(st.TILE_Y_SEPARATOR)
    out += [st.IMAGE] + [st.PATCH] * patches_per_tile + [st.IMAGE_END]
    return out


def _check_grid(grid) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in grid)
    except (TypeError, ValueError):
        rows = cols = 0
    if rows < 1 or cols < 1:
        raise ValueError(f"image grid must be (rows, cols) with both >= 1, got {grid!r}")
    return rows, cols


# -- messages -> segments ------------------------------------------------------------------------


def _header(role: str) -> list:
    return [Special(st.HEADER_START), Text(role), Special(st.HEADER_END), Text("\n\n")]


def _content_segments(content, where: str, *, train: bool = False, images: bool = True) -> list:
    """Segments for a message content: a string or a list of text/image parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [Text(content, train)] if content else []
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"{where}: content must be a string, a list of parts or None, got {type(content).__name__}")
    out: list = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_TYPES:
            raise ValueError(
                f"{where}: content part {k} is malformed ({part!r}); each part must be a dict with a "
                f"'type' key; allowed part types: {', '.join(PART_TYPES)}"
            )
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where}: text part {k} needs a string 'text' field, got {part!r}")
            out.append(Text(part["text"], train))
        elif not images:
            raise ValueError(f"{where}: content part {k} is an image; images are not allowed here")
        else:
            grid = part.get("grid")
            out.append(Image(None if grid is None else _check_grid(grid)))
    return out


def _trim(segments: list) -> list:
    """Strip leading whitespace of the first text segment and trailing of the last (Jinja ``trim``)."""
    segments = list(segments)
    if segments and isinstance(segments[0], Text):
        segments[0] = Text(segments[0].text.lstrip(), segments[0].train)
    if segments and isinstance(segments[-1], Text):
        segments[-1] = Text(segments[-1].text.rstrip(), segments[-1].train)
    return segments


def _tool_result_text(content) -> str:
    # The template JSON-dumps mappings and iterables - strings included - so "sunny" becomes "\"sunny\"".
    if isinstance(content, (str, list, tuple, dict)):
        return json.dumps(content, ensure_ascii=False)
    return str(content)


def _message_segments(msg: dict, where: str) -> list:
    role = msg["role"]
    if role in ("tool", "ipython"):
        content = msg.get("content")
        if isinstance(content, (list, tuple)) and any(isinstance(p, dict) and p.get("type") in ("image", "image_url")
                                                      for p in content):
            raise ValueError(f"{where}: a {role} message (a tool result, written as text) cannot hold images; "
                             "send them in a user message")
        return _header("ipython") + [Text(_tool_result_text(msg.get("content")))] + [Special(st.EOT)]
    calls = msg.get("tool_calls")
    if calls:
        if role != "assistant":
            raise ValueError(f"{where}: only assistant messages may carry tool_calls, not role {role!r}")
        if not isinstance(calls, (list, tuple)):
            raise ValueError(f"{where}: tool_calls must be a list, got {type(calls).__name__}")
        body = [Special(st.PYTHON_START, True)]
        body += _content_segments(msg.get("content"), where, train=True)
        body.append(Special(st.PYTHON_END, True))
        body += [Text(render_tool_call(c, k), True) for k, c in enumerate(calls)]
        return _header("assistant") + body + [Special(st.EOT, True)]
    train = role == "assistant"
    return _header(role) + _content_segments(msg.get("content"), where, train=train) + [Special(st.EOT, train)]


def _validate(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise ValueError(f"messages[{k}] must be a dict with a 'role', got {msg!r}")
        if msg["role"] not in ROLES:
            raise ValueError(f"messages[{k}] has unknown role {msg['role']!r}; allowed roles: {', '.join(ROLES)}")
    return list(messages)


def chat_segments(
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[dict] | None = None,
    tools_in_user_message: bool = True,
    continue_final_message: bool = False,
) -> list:
    """The whole chat as segments (Text / Special / Image), in the HF 5.23 template's order.

    ``continue_final_message``: leave the last message open (no ``<|eot|>`` after its text, no generation
    prompt), so that the model continues it - a prefilled start of the assistant's reply, say - as
    transformers' ``continue_final_message`` renders it.
    """
    messages = _validate(messages)
    if continue_final_message:
        _check_continuable(messages, add_generation_prompt)
    tools = list(tools) if tools else None
    out: list = [Special(st.BEGIN_OF_TEXT)]
    if messages and messages[0]["role"] == "system":
        system = _trim(_content_segments(messages[0].get("content"), "messages[0]", images=False))
        out += _header("system")
        if tools is not None:
            out.append(Text(ENVIRONMENT_LINE))
            if not tools_in_user_message:
                out.append(Text(TOOLS_IN_SYSTEM_INSTRUCTIONS + render_tool_definitions(tools)))
        out += system + [Special(st.EOT)]
        rest = list(enumerate(messages))[1:]
    else:
        if tools is not None and not tools_in_user_message:
            # The HF template silently drops the tools here; an error is kinder.
            raise ValueError(
                "tools_in_user_message=False puts the tools in the system message, but the chat has "
                "none; add a system message first or leave tools_in_user_message=True"
            )
        rest = list(enumerate(messages))
    if tools is not None and tools_in_user_message:
        if not rest or rest[0][1]["role"] != "user":
            raise ValueError(
                "tools are placed in the first user message, but the first non-system message is "
                + (f"a {rest[0][1]['role']!r} message" if rest else "missing")
                + "; start the chat with a user message or pass tools_in_user_message=False"
            )
        k, first = rest.pop(0)
        out += _header("user") + [Text(TOOLS_IN_USER_INSTRUCTIONS + render_tool_definitions(tools))]
        out += _trim(_content_segments(first.get("content"), f"messages[{k}]")) + [Special(st.EOT)]
    for k, msg in rest:
        out += _message_segments(msg, f"messages[{k}]")
    if continue_final_message:
        out.pop()  # the final message's <|eot|>
    if add_generation_prompt:
        out += _header("assistant")
    return out


def _check_continuable(messages: list[dict], add_generation_prompt: bool) -> None:
    if add_generation_prompt:
        raise ValueError("continue_final_message continues the last message; it cannot go with "
                         "add_generation_prompt, which opens a new one")
    if not messages:
        raise ValueError("continue_final_message needs a message to continue; the chat is empty")
    last, where = messages[-1], f"messages[{len(messages) - 1}]"
    if last["role"] in ("tool", "ipython") or last.get("tool_calls"):
        raise ValueError(f"{where}: continue_final_message continues text; a {last['role']} message with tool "
                         "calls or results cannot be continued")
    content = last.get("content")
    if isinstance(content, (list, tuple)):
        if not content or not (isinstance(content[-1], dict) and content[-1].get("type") == "text"):
            raise ValueError(f"{where}: continue_final_message needs the last message to end with text")
    elif not isinstance(content, str):
        raise ValueError(f"{where}: continue_final_message needs the last message to have text content")


# -- segments -> string / ids ----------------------------------------------------------------------


def _assign_grids(segments: list, image_grids) -> list:
    images = [s for s in segments if isinstance(s, Image)]
    if image_grids is not None and len(image_grids) != len(images):
        raise ValueError(f"image_grids has {len(image_grids)} entries but the messages hold {len(images)} images")
    grids = iter(image_grids or ())
    out = []
    for seg in segments:
        if isinstance(seg, Image):
            grid = next(grids) if image_grids is not None else seg.grid
            if grid is None:
                raise ValueError(
                    "an image part needs its tile grid: give the part a 'grid': (rows, cols) or pass "
                    "image_grids=[(rows, cols), ...] (one per image, in order; image preprocessing supplies it)"
                )
            seg = Image(_check_grid(grid))
        out.append(seg)
    return out


def render_chat(
    messages: Sequence[dict],
    *,
    image_grids=None,
    expand_images: bool = False,
    patches_per_tile: int = PATCHES_PER_TILE,
    **kwargs,
) -> str:
    """The chat as a string. Images render as ``<|image|>`` (as the HF template does) unless
    ``expand_images``, which writes the full image token layout. For display and parity tests:
    encode with :func:`encode_chat`, not by tokenizing this string (it would parse user specials)."""
    segments = chat_segments(messages, **kwargs)
    if expand_images:
        segments = _assign_grids(segments, image_grids)
    parts = []
    for seg in segments:
        if isinstance(seg, Text):
            parts.append(seg.text)
        elif isinstance(seg, Special):
            parts.append(seg.token)
        else:
            parts.append("".join(image_token_layout(seg.grid, patches_per_tile)) if expand_images else st.IMAGE)
    return "".join(parts)


def encode_chat(
    tok: "Tokenizer",
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[dict] | None = None,
    tools_in_user_message: bool = True,
    image_grids: Sequence[tuple[int, int]] | None = None,
    patches_per_tile: int = PATCHES_PER_TILE,
    continue_final_message: bool = False,
) -> ChatEncoding:
    """Encode a chat. ``assistant_mask`` marks assistant content, tool calls and their ``<|eot|>``."""
    segments = chat_segments(
        messages, add_generation_prompt=add_generation_prompt, tools=tools, tools_in_user_message=tools_in_user_message,
        continue_final_message=continue_final_message,
    )
    segments = _assign_grids(segments, image_grids)
    ids: list[int] = []
    mask: list[bool] = []
    pending: list[Text] = []
    for seg in segments + [None]:
        if isinstance(seg, Text):
            pending.append(seg)
            continue
        if pending:
            span_ids, span_mask = _encode_span(tok, pending)
            ids += span_ids
            mask += span_mask
            pending = []
        if isinstance(seg, Special):
            ids.append(tok.special_id(seg.token))
            mask.append(seg.train)
        elif isinstance(seg, Image):
            layout = image_token_layout(seg.grid, patches_per_tile)
            ids += [tok.special_id(s) for s in layout]
            mask += [False] * len(layout)
    return ChatEncoding(ids, mask)


def _encode_span(tok: "Tokenizer", texts: list[Text]) -> tuple[list[int], list[bool]]:
    """Encode adjacent text segments as one string; a token is trainable if any of its bytes is."""
    ids = tok.encode("".join(t.text for t in texts))
    flags = {t.train for t in texts}
    if len(flags) == 1:
        return ids, [flags.pop()] * len(ids)
    trainable: list[tuple[int, int]] = []  # byte ranges of trainable text
    pos = 0
    for t in texts:
        n = len(t.text.encode("utf-8"))
        if t.train:
            trainable.append((pos, pos + n))
        pos += n
    mask = []
    pos = 0
    for i in ids:
        end = pos + len(tok.token_bytes(i))
        mask.append(any(a < end and pos < b for a, b in trainable))
        pos = end
    return ids, mask
