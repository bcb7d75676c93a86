"""Train a small byte-level BPE vocabulary with Llama 4's pre-tokenizer and special-token layout.

The result is a tiktoken rank table: the 256 single bytes get ranks 0..255 (in byte order) and each
learned merge gets the next rank. Wrap it in :class:`~llama4.prompt.tokenizer.Tokenizer` and
``save()`` it to get both ``tokenizer.model`` and the Hugging Face files.

Algorithm: the text is pre-tokenized with the Llama 4 regex and reduced to ``{piece: count}``; BPE then
runs on the distinct pieces only. Pair counts are kept up to date incrementally: merging a pair
touches only the pieces that contain it (an index from pair to pieces), and the most frequent pair
comes from a max-heap with lazy deletion (an entry whose count is stale is re-queued on pop).
"""

from __future__ import annotations

import heapq
import os
from collections import Counter, defaultdict
from collections.abc import Iterable

import regex

from .tokenizer import Tokenizer
from .tokenizer_files import PATTERN


def count_pieces(texts: Iterable[str], pattern: str = PATTERN) -> Counter[bytes]:
    """``{utf-8 piece: occurrences}`` over all texts, split by the pre-tokenizer regex."""
    splitter = regex.compile(pattern)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(splitter.findall(text))
    return Counter({piece.encode("utf-8"): n for piece, n in counts.items()})


def _pairs(word: list[int]) -> Counter[tuple[int, int]]:
    return Counter(zip(word, word[1:]))


def train_bpe(
    texts: Iterable[str],
    num_base_tokens: int = 8000,
    *,
    pattern: str = PATTERN,
    min_frequency: int = 2,
) -> dict[bytes, int]:
    """Learn up to ``num_base_tokens`` tiktoken ranks (256 bytes + merges) from ``texts``.

    Training stops early when no pair occurs ``min_frequency`` times, so the table may be smaller.
    Ties between equally frequent pairs go to the pair of lower token ids (deterministic).
    """
    if num_base_tokens < 256:
        raise ValueError(f"num_base_tokens must be at least 256 (the single bytes), got {num_base_tokens}")
    piece_counts = count_pieces(texts, pattern)
    vocab: list[bytes] = [bytes([b]) for b in range(256)]
    rank_of: dict[bytes, int] = {t: i for i, t in enumerate(vocab)}

    words: list[list[int]] = [list(piece) for piece in piece_counts]
    freq: list[int] = list(piece_counts.values())
    pair_count: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for w, word in enumerate(words):
        for pair, n in _pairs(word).items():
            pair_count[pair] += n * freq[w]
            where[pair].add(w)
    heap = [(-n, pair) for pair, n in pair_count.items()]
    heapq.heapify(heap)

    while len(vocab) < num_base_tokens and heap:
        neg, pair = heapq.heappop(heap)
        current = pair_count.get(pair, 0)
        if current != -neg:
            if current > 0:
                heapq.heappush(heap, (-current, pair))
            continue
        if current < min_frequency:
            break
        merged = vocab[pair[0]] + vocab[pair[1]]
        # A token can be reachable by two different splits; keep one id (and one rank) per byte string.
        new_id = rank_of.get(merged)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(merged)
            rank_of[merged] = new_id
        _apply_merge(pair, new_id, words, freq, pair_count, where, heap)
    return rank_of


def _apply_merge(pair, new_id, words, freq, pair_count, where, heap) -> None:
    """Replace ``pair`` by ``new_id`` in every piece holding it, updating counts incrementally."""
    a, b = pair
    for w in where.pop(pair):
        word = words[w]
        if len(word) < 2:
            continue
        merged: list[int] = []
        i = 0
        while i < len(word):
            if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                merged.append(new_id)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        if len(merged) == len(word):
            continue  # stale index entry: the pair was already merged away in this piece
        before, after = _pairs(word), _pairs(merged)
        n = freq[w]
        for p, c in before.items():
            d = after.get(p, 0) - c
            if d < 0:  # increases are handled below, together with the new pairs
                pair_count[p] += d * n
                if pair_count[p] <= 0:
                    del pair_count[p]
        for p, c in after.items():
            d = c - before.get(p, 0)
            if d > 0:
                pair_count[p] += d * n
                where[p].add(w)
                heapq.heappush(heap, (-pair_count[p], p))
        words[w] = merged
    pair_count.pop(pair, None)


def train_tokenizer(
    texts: Iterable[str],
    num_base_tokens: int = 8000,
    *,
    out_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a vocabulary, wrap it with the Llama 4 special tokens, and optionally save both formats.

    The special tokens follow the learned base tokens: with 8,000 base tokens ``<|begin_of_text|>``
    is id 8000 and ``vocab_size`` is 10,048.
    """
    tok = Tokenizer(train_bpe(texts, num_base_tokens, min_frequency=min_frequency))
    if out_dir is not None:
        tok.save(out_dir)
    return tok
