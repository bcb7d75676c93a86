"""KV cache shaped by iRoPE: chunk-local layers keep one chunk, global layers keep everything.

The model talks to a cache through two calls: ``update(layer, k, v)`` during a forward pass and
``advance(num_tokens)`` once the pass is complete. All rows of a batch share one sequence index.
"""

from __future__ import annotations

import torch

from llama4.config import TextConfig


class KVCache:
    """Contiguous per-layer cache. Keys are stored post-RoPE/QK-norm, values raw, [B, Hkv, S, d].

    Chunked layers hold only keys of the current chunk (at most ``chunk`` entries); global layers, and
    chunked layers within their chunk, grow in blocks of ``block_size`` tokens, so memory follows the
    actual length. Reads are views of the buffers: a decode step copies only the new token's k/v.
    """

    def __init__(self, config: TextConfig, block_size: int = 256):
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.chunk = config.attention_chunk_size
        self.chunked = tuple(spec.chunked for spec in config.layers)
        self.block_size = block_size
        self.seq_len = 0  # sequence index of the next token
        self._k: list[torch.Tensor | None] = [None] * config.num_layers
        self._v: list[torch.Tensor | None] = [None] * config.num_layers
        self._len = [0] * config.num_layers  # valid entries in each layer's buffer
        self._start = [0] * config.num_layers  # sequence index of each layer's first entry

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Add k/v [B, Hkv, T, d] for tokens seq_len..seq_len+T-1; return the keys/values this
        layer's queries may need and the sequence index of their first entry."""
        if self.chunked[layer]:
            return self._update_local(layer, k, v)
        return self._update_global(layer, k, v)

    def advance(self, num_tokens: int) -> None:
        self.seq_len += num_tokens

    def _update_local(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        start = (self.seq_len // self.chunk) * self.chunk  # the first query's chunk starts here
        end = self.seq_len + k.shape[2]
        kept = self._len[layer] if self._start[layer] == start else 0  # 0: the stored chunk just ended
        if end <= start + self.chunk:  # all new tokens fall in the current chunk: append in place
            self._write(layer, k, v, at=kept, limit=self.chunk)
            self._len[layer], self._start[layer] = kept + k.shape[2], start
            return self._k[layer][:, :, :kept + k.shape[2]], self._v[layer][:, :, :kept + k.shape[2]], start
        if kept:
            k_all = torch.cat((self._k[layer][:, :, :kept], k), dim=2)
            v_all = torch.cat((self._v[layer][:, :, :kept], v), dim=2)
        else:
            k_all, v_all = k, v
        new_start = (end // self.chunk) * self.chunk  # keep only the chunk the next token belongs to
        keep = end - new_start
        self._write(layer, k_all[:, :, k_all.shape[2] - keep:], v_all[:, :, v_all.shape[2] - keep:], at=0,
                    limit=self.chunk)
        self._len[layer], self._start[layer] = keep, new_start
        return k_all, v_all, start

    def _update_global(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        n = self._len[layer]
        self._write(layer, k, v, at=n, limit=None)
        self._len[layer] = n + k.shape[2]
        return self._k[layer][:, :, :n + k.shape[2]], self._v[layer][:, :, :n + k.shape[2]], 0

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: int, limit: int | None) -> None:
        """Write k/v at buffer offset ``at``, growing the buffer in blocks (to at most ``limit``)."""
        need = at + k.shape[2]
        buf_k, buf_v = self._k[layer], self._v[layer]
        if buf_k is None or buf_k.shape[2] < need or buf_k.shape[:2] != k.shape[:2]:
            capacity = -(-need // self.block_size) * self.block_size
            if limit is not None:
                capacity = min(capacity, max(limit, need))
            grown_k = k.new_empty(*k.shape[:2], capacity, k.shape[3])
            grown_v = v.new_empty(*v.shape[:2], capacity, v.shape[3])
            if at and buf_k is not None:
                grown_k[:, :, :at] = buf_k[:, :, :at]
                grown_v[:, :, :at] = buf_v[:, :, :at]
            self._k[layer], self._v[layer] = buf_k, buf_v = grown_k, grown_v
        buf_k[:, :, at:need] = k
        buf_v[:, :, at:need] = v

    def nbytes(self) -> int:
        """Bytes of key/value storage currently allocated."""
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v) if t is not None)
