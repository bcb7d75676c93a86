"""Incremental detokenization for streaming generation.

A token can end in the middle of a multi-byte UTF-8 character (byte-level BPE splits characters
freely), so decoding token by token would print U+FFFD for half a character. The decoder below
buffers the incomplete tail and emits text only once it is complete.

It uses Python's incremental UTF-8 decoder with ``errors="replace"``, which makes the same decisions
as ``bytes.decode("utf-8", "replace")`` on the whole sequence: the concatenated output of
:meth:`StreamingDecoder.add` calls plus :meth:`StreamingDecoder.flush` equals ``tok.decode(ids)``.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


class StreamingDecoder:
    """Feed token ids as they arrive; get back only complete characters.

    >>> dec = tok.stream_decoder()           # doctest: +SKIP
    >>> pieces = [dec.add(i) for i in ids] + [dec.flush()]
    >>> "".join(pieces) == tok.decode(ids)   # doctest: +SKIP
    True
    """

    def __init__(self, tok: "Tokenizer", *, skip_special: bool = False) -> None:
        self._tok = tok
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, ids: int | Iterable[int]) -> str:
        """Decode one id or several; returns the text completed by them (possibly empty)."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        if self._skip_special:
            ids = [i for i in ids if not self._tok.is_special(i)]
        return self._utf8.decode(self._tok.decode_bytes(ids), final=False)

    def flush(self) -> str:
        """End of stream: a dangling partial character becomes U+FFFD. The decoder is then reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def stream_decode(tok: "Tokenizer", ids: Iterable[int], *, skip_special: bool = False) -> Iterator[str]:
    """Yield non-empty text pieces for a stream of ids (a generator wrapper around StreamingDecoder)."""
    dec = StreamingDecoder(tok, skip_special=skip_special)
    for i in ids:
        piece = dec.add(i)
        if piece:
            yield piece
    tail = dec.flush()
    if tail:
        yield tail
