"""Prefix caching: the KV cache rows of finished sequences, kept so a later prompt that extends one
(the next turn of a conversation) prefills only its new tokens.

An entry is keyed by exactly the tokens its cache holds (the prompt and every generated token that
was fed back). A new prompt reuses the entry it shares the longest prefix with, cut back to that
prefix (``copy_prefix``; with the engine's paged cache the copy shares the entry's full blocks and
copies one partial block per layer kind): the next turn of a chat re-renders the previous reply,
which need not tokenize as it was generated, so an exact-extension match would rarely hit. A cut can
only go back to the start of the chunk the chunked-attention layers hold; a shorter common prefix is
not reused. Entries live in namespaces (``namespace``: the engine's LoRA adapter of the sequence, 0 for
the base model): a prompt only ever reuses an entry of its own namespace, since the same tokens have
other keys and values under another adapter. Entries are evicted least recently used first once their
bytes pass the budget (an evicted entry's blocks go back to the pool). Sequences with images are never
stored: their keys and values depend on pixels, not only on token ids.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class CachedSequence(Protocol):
    """What the store needs of an entry: a one-row :class:`~llama4.model.cache.KVCache` or a
    :class:`~llama4.model.paged_cache.PagedSequence`."""

    @property
    def batch_size(self) -> int: ...

    @property
    def lengths(self) -> list[int]: ...

    def nbytes(self) -> int: ...

    def earliest_cut(self) -> int: ...

    def copy_prefix(self, length: int) -> CachedSequence: ...

    def release(self) -> None: ...


class PrefixCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the prefix cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        # (namespace, tokens) -> (cache, bytes)
        self._entries: OrderedDict[tuple[int, tuple[int, ...]], tuple[CachedSequence, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: list[int], cache: CachedSequence, namespace: int = 0) -> None:
        """Keep a one-row ``cache`` holding exactly ``tokens`` (owned by the store from now: released when
        evicted or not kept), reusable by prompts of the same ``namespace`` only."""
        if cache.batch_size != 1 or cache.lengths[0] != len(tokens):
            raise ValueError(f"a prefix entry needs one row holding its {len(tokens)} tokens, "
                             f"got lengths {cache.lengths}")
        size = cache.nbytes()
        if not tokens or size > self.max_bytes:
            cache.release()
            return
        key = (namespace, tuple(tokens))
        if key in self._entries:
            old, old_size = self._entries.pop(key)
            self.bytes -= old_size
            old.release()
        self._entries[key] = (cache, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (dropped, dropped_size) = self._entries.popitem(last=False)
            self.bytes -= dropped_size
            dropped.release()

    def clear(self) -> None:
        for cache, _ in self._entries.values():
            cache.release()
        self._entries.clear()
        self.bytes = 0

    def drop(self, namespace: int) -> None:
        """Release every entry of ``namespace`` (e.g. an adapter unloaded: nothing can reuse them any more)."""
        for key in [k for k in self._entries if k[0] == namespace]:
            cache, size = self._entries.pop(key)
            self.bytes -= size
            cache.release()

    def take(self, prompt: list[int], namespace: int = 0) -> tuple[int, CachedSequence | None]:
        """The longest usable shared prefix of ``prompt`` and a cached entry: (its length, a copy of the
        entry's cache cut back to it); (0, None) when nothing is usable.

        At most ``len(prompt) - 1`` tokens are reused: the prompt's last token must still be run to get
        the next token's logits. The entry stays (a copy is returned): other continuations may follow.
        """
        best, best_len = None, 0
        limit = len(prompt) - 1
        for key, (cache, _) in self._entries.items():
            if key[0] != namespace:
                continue
            shared = _shared_prefix(key[1], prompt, limit)
            if shared > best_len and shared >= cache.earliest_cut():
                best, best_len = key, shared
        if best is None:
            return 0, None
        self._entries.move_to_end(best)
        return best_len, self._entries[best][0].copy_prefix(best_len)


def _shared_prefix(key: tuple[int, ...], prompt: list[int], limit: int) -> int:
    n = min(len(key), limit)
    for i in range(n):
        if key[i] != prompt[i]:
            return i
    return n
