"""The Llama 4 tokenizer: tiktoken byte-level BPE plus the 2,048 Llama 4 special-token slots.

Special-token strings in text are plain text unless the caller asks otherwise
(``encode(text, allow_special=True)``): a user message containing ``<|eot|>`` must not be able to
end its own turn and forge an assistant reply. Chat prompts are built from ids, never by parsing
rendered strings (see chat.py).

Decoding uses ``errors="replace"``: bytes that are not valid UTF-8 (a token sequence cut in the middle
of a character, or a model emitting nonsense) become U+FFFD instead of raising.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tiktoken

from . import special_tokens as st
from .tokenizer_files import (
    PATTERN,
    read_hf_tokenizer_json,
    read_tiktoken_model,
    write_hf_tokenizer,
    write_tiktoken_model,
)

if TYPE_CHECKING:
    from .chat import ChatEncoding
    from .streaming import StreamingDecoder

# tiktoken's regex engine overflows its stack on huge runs of whitespace and its BPE slows down on
# huge pieces, so (like Meta's reference tokenizer) text is encoded in slices of at most 400,000
# characters, and within a slice no run of whitespace / non-whitespace characters exceeds 25,000.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

_LONG_RUN = re.compile(rf"(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}|(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}")


def _slice_end(text: str, start: int) -> int:
    """End of the slice starting at ``start``: at most MAX_ENCODE_CHARS long, on a pre-token boundary.

    Meta cuts blindly every 400,000 characters, which splits a word and changes its tokens. A cut
    right after a newline that is followed by a character other than whitespace or "/" is a
    boundary of the pre-tokenizer regex (no alternative matches across it and nothing looks behind),
    so cutting there leaves the ids identical to encoding the text in one go. Without such a newline
    in the second half of the window, fall back to Meta's blind cut.
    """
    end = start + MAX_ENCODE_CHARS
    if end >= len(text):
        return len(text)
    i = text.rfind("\n", start + MAX_ENCODE_CHARS // 2, end - 1)
    while i != -1:
        nxt = text[i + 1]
        if not nxt.isspace() and nxt != "/":
            return i + 1
        i = text.rfind("\n", start + MAX_ENCODE_CHARS // 2, i)
    return end


def split_long_runs(text: str) -> list[str]:
    """Slice ``text`` before BPE as Meta's tokenizer does (see MAX_ENCODE_CHARS / MAX_RUN_CHARS).

    A run longer than MAX_RUN_CHARS is cut every MAX_RUN_CHARS characters from its start, counting
    afresh in every slice; slices end on a pre-token boundary where possible (:func:`_slice_end`).
    The lookbehinds make each run start the only place a match is attempted: linear time.
    """
    pieces: list[str] = []
    start = 0
    while True:
        end = _slice_end(text, start)
        chunk = text[start:end]
        if len(chunk) <= MAX_RUN_CHARS:
            pieces.append(chunk)
        else:
            cut = 0
            for m in _LONG_RUN.finditer(chunk):
                for pos in range(m.start() + MAX_RUN_CHARS, m.end(), MAX_RUN_CHARS):
                    pieces.append(chunk[cut:pos])
                    cut = pos
            pieces.append(chunk[cut:])
        if end >= len(text):
            return pieces
        start = end


class Tokenizer:
    """Byte-level BPE over tiktoken ranks with Llama 4 special tokens.

    Args:
        mergeable_ranks: ``{token bytes: rank}``; ranks must be the dense range ``0..n-1`` and every
            single byte must be present. The rank is the token id.
        special_tokens: ``{string: id}``; defaults to the Llama 4 layout right after the base tokens.
        pattern: pre-tokenizer regex (tiktoken / fancy-regex syntax).
    """

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int] | None = None,
        *,
        pattern: str = PATTERN,
        name: str = "llama4",
    ) -> None:
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise ValueError(f"token ranks must be the dense range 0..{n - 1}")
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise ValueError(f"a byte-level BPE needs all 256 single bytes; missing e.g. byte {missing[0]:#04x}")
        specials = dict(special_tokens) if special_tokens is not None else st.special_token_ids(n)
        clash = [s for s, i in specials.items() if i < n]
        if clash:
            raise ValueError(f"special token {clash[0]!r} has id {specials[clash[0]]} inside the base vocabulary")
        self._ranks = mergeable_ranks
        self._specials = specials
        self._special_ids = frozenset(specials.values())
        self._pattern = pattern
        self._enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=specials)
        self._special_split = _special_splitter(specials)

    # -- construction / saving ----------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load ``tokenizer.model`` (tiktoken ranks) or ``tokenizer.json`` (Hugging Face)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if path.suffix == ".json":
            ranks, specials, pattern = read_hf_tokenizer_json(path)
            return cls(ranks, specials, pattern=pattern)
        return cls(read_tiktoken_model(path))

    def save(self, directory: str | os.PathLike, *, hf: bool = True) -> None:
        """Write ``tokenizer.model`` and (with ``hf``) ``tokenizer.json`` + ``tokenizer_config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_tiktoken_model(directory / "tokenizer.model", self._ranks)
        if hf:
            write_hf_tokenizer(directory, self._ranks, self._specials, self._pattern)

    # -- vocabulary -----------------------------------------------------------------------------

    @property
    def num_base_tokens(self) -> int:
        """Number of BPE tokens (ids ``0..num_base_tokens-1``)."""
        return len(self._ranks)

    @property
    def vocab_size(self) -> int:
        """Number of ids: base tokens plus the special slots (202,048 for Meta's vocabulary)."""
        return max(self.num_base_tokens + st.NUM_SPECIAL_SLOTS, max(self._special_ids, default=0) + 1)

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        """A copy of the BPE ranks ``{token bytes: rank}`` (the rank is the id), e.g. to build another
        library's view of this vocabulary."""
        return dict(self._ranks)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    @property
    def pattern(self) -> str:
        return self._pattern

    def special_id(self, token: str) -> int:
        """Id of a special-token string such as ``"<|eot|>"``."""
        try:
            return self._specials[token]
        except KeyError:
            raise ValueError(f"{token!r} is not a special token of this tokenizer") from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token decodes to (a special token decodes to its own string)."""
        self._check_ids([token_id])
        return self._enc.decode_single_token_bytes(token_id)

    bos_id = property(lambda self: self._specials[st.BEGIN_OF_TEXT], doc="<|begin_of_text|>")
    end_of_text_id = property(lambda self: self._specials[st.END_OF_TEXT], doc="<|end_of_text|>")
    eom_id = property(lambda self: self._specials[st.EOM], doc="<|eom|>: end of message (tool call)")
    eot_id = property(lambda self: self._specials[st.EOT], doc="<|eot|>: end of turn")
    pad_id = property(lambda self: self._specials[st.PAD], doc="<|finetune_right_pad|>")
    header_start_id = property(lambda self: self._specials[st.HEADER_START])
    header_end_id = property(lambda self: self._specials[st.HEADER_END])
    python_start_id = property(lambda self: self._specials[st.PYTHON_START])
    python_end_id = property(lambda self: self._specials[st.PYTHON_END])
    image_start_id = property(lambda self: self._specials[st.IMAGE_START])
    image_end_id = property(lambda self: self._specials[st.IMAGE_END])
    image_id = property(lambda self: self._specials[st.IMAGE], doc="<|image|>: precedes the global tile")
    patch_id = property(lambda self: self._specials[st.PATCH], doc="<|patch|>: one image feature slot")
    tile_x_separator_id = property(lambda self: self._specials[st.TILE_X_SEPARATOR])
    tile_y_separator_id = property(lambda self: self._specials[st.TILE_Y_SEPARATOR])

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end generation: end_of_text, eom, eot (as in Meta's and HF's generation config)."""
        return (self.end_of_text_id, self.eom_id, self.eot_id)

    # -- encode / decode ------------------------------------------------------------------------

    def encode(
        self,
        text: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allow_special: bool | Iterable[str] = False,
    ) -> list[int]:
        """Encode ``text``; special-token strings are plain text unless listed in ``allow_special``.

        ``allow_special=True`` allows every special token. ``eos`` appends ``<|end_of_text|>``.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        if allow_special:
            allowed = None if allow_special is True else set(allow_special)
            plain: list[str] = []  # text between allowed specials is encoded as one span
            for part, is_special in self._special_split(text):
                if is_special and (allowed is None or part in allowed):
                    ids.extend(self._encode_plain("".join(plain)))
                    plain.clear()
                    ids.append(self._specials[part])
                else:
                    plain.append(part)
            ids.extend(self._encode_plain("".join(plain)))
        else:
            ids.extend(self._encode_plain(text))
        if eos:
            ids.append(self.end_of_text_id)
        return ids

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 4, **kwargs: Any) -> list[list[int]]:
        """``encode`` over many texts on a thread pool (tiktoken releases the GIL while encoding)."""
        if num_threads <= 1 or len(texts) <= 1:
            return [self.encode(t, **kwargs) for t in texts]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(lambda t: self.encode(t, **kwargs), texts))

    def _encode_plain(self, text: str) -> list[int]:
        if len(text) <= MAX_RUN_CHARS:
            return self._enc.encode_ordinary(text)
        ids: list[int] = []
        for piece in split_long_runs(text):
            ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Concatenated token bytes (special tokens as their strings)."""
        ids = list(ids)
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):
            self._check_ids(ids)
            raise

    def decode(self, ids: Sequence[int], *, skip_special: bool = False, errors: str = "replace") -> str:
        """Decode ids to text. Invalid UTF-8 becomes U+FFFD (``errors="replace"``) by default."""
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def _check_ids(self, ids: Iterable[int]) -> None:
        for i in ids:
            if not isinstance(i, int) or not (0 <= i < self.num_base_tokens or i in self._special_ids):
                raise ValueError(
                    f"token id {i!r} is not in the vocabulary (base ids 0..{self.num_base_tokens - 1}, "
                    f"special ids {min(self._special_ids)}..{max(self._special_ids)})"
                )

    def stream_decoder(self, *, skip_special: bool = False) -> "StreamingDecoder":
        """An incremental decoder: feed ids as they are generated, get text that is safe to show."""
        from .streaming import StreamingDecoder

        return StreamingDecoder(self, skip_special=skip_special)

    # -- chat ----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict], **kwargs: Any) -> list[int] | str:
        """Token ids of a chat in the Llama 4 instruct layout; see :func:`llama4.prompt.chat.encode_chat`.

        Accepts ``add_generation_prompt`` (default True), ``tools``, ``image_grids``,
        ``tools_in_user_message``, ``continue_final_message`` (leave the last message open for the model to
        continue; needs ``add_generation_prompt=False``) and ``tokenize`` (False returns the rendered string).
        """
        from .chat import encode_chat, render_chat

        if not kwargs.pop("tokenize", True):
            return render_chat(messages, **kwargs)
        return encode_chat(self, messages, **kwargs).ids

    def encode_chat(self, messages: Sequence[dict], **kwargs: Any) -> "ChatEncoding":
        """Like :meth:`apply_chat_template` but also returns the assistant-output mask (training)."""
        from .chat import encode_chat

        kwargs.setdefault("add_generation_prompt", False)
        return encode_chat(self, messages, **kwargs)

    def __repr__(self) -> str:
        return f"Tokenizer(base={self.num_base_tokens}, vocab_size={self.vocab_size})"


def _special_splitter(specials: dict[str, int]):
    """A function splitting text into ``(part, is_special_string)`` around special-token strings."""
    if not specials:
        return lambda text: [(text, False)]
    alternation = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))

    def split(text: str) -> list[tuple[str, bool]]:
        parts: list[tuple[str, bool]] = []
        pos = 0
        for m in alternation.finditer(text):
            if m.start() > pos:
                parts.append((text[pos : m.start()], False))
            parts.append((m.group(), True))
            pos = m.end()
        if pos < len(text) or not parts:
            parts.append((text[pos:], False))
        return parts

    return split


_EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load a tokenizer from a checkpoint directory or a tokenizer file.

    A directory is searched for ``tokenizer.model`` (preferred) then ``tokenizer.json``. With no
    path, the tokenizer shipped in ``llama4/embedded/`` is loaded, if the package has one.
    """
    if path is None:
        embedded = _EMBEDDED_DIR / "tokenizer.model"
        if not embedded.is_file():
            raise FileNotFoundError(
                f"no embedded tokenizer is shipped with this package yet ({embedded} is missing); "
                "pass the path of a checkpoint directory, tokenizer.model or tokenizer.json"
            )
        return Tokenizer.from_file(embedded)
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return Tokenizer.from_file(path / name)
        raise FileNotFoundError(f"{path} contains neither tokenizer.model nor tokenizer.json")
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer path not found: {path} (expected a directory with tokenizer.model or "
            "tokenizer.json, or one of those files)"
        )
    return Tokenizer.from_file(path)
