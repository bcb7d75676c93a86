"""Prefix caching: the KV cache rows of finished sequences, kept so a later prompt that extends one
(the next turn of a conversation) prefills only its new tokens.

An entry is keyed by exactly the tokens its cache holds (the prompt and every generated token that
was fed back). Only whole entries are reused: chunked-attention layers keep just the current chunk,
so a cache cannot be cut back to an arbitrary shorter prefix. Entries are evicted least recently used
first once their bytes pass the budget. Sequences with images are never stored: their keys and values
depend on pixels, not only on token ids.
"""

from __future__ import annotations

from collections import OrderedDict

from llama4.model.cache import KVCache


class PrefixCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the prefix cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[int, ...], tuple[KVCache, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: list[int], cache: KVCache) -> None:
        """Keep a one-row ``cache`` holding exactly ``tokens`` (the cache is owned by the store from now)."""
        if cache.batch_size != 1 or cache.lengths[0] != len(tokens):
            raise ValueError(f"a prefix entry needs one row holding its {len(tokens)} tokens, "
                             f"got lengths {cache.lengths}")
        size = cache.nbytes()
        if not tokens or size > self.max_bytes:
            return
        key = tuple(tokens)
        if key in self._entries:
            self.bytes -= self._entries.pop(key)[1]
        self._entries[key] = (cache, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped

    def take(self, prompt: list[int]) -> tuple[int, KVCache | None]:
        """The longest entry that is a strict prefix of ``prompt``: (its length, a copy of its cache).

        Strict, because the prompt's last token must still be run to get the next token's logits.
        The entry stays (a copy is returned): other continuations of the same prefix may follow.
        """
        best = None
        for key in self._entries:
            if len(key) < len(prompt) and (best is None or len(key) > len(best)) and tuple(prompt[:len(key)]) == key:
                best = key
        if best is None:
            return 0, None
        self._entries.move_to_end(best)
        return len(best), KVCache.stack([self._entries[best][0]])
