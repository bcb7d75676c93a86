"""The engine's model runner: builds the batch tensors and calls the model, for one sequence's prefill
piece or one ragged decode step over the running rows, every row's keys and values in one
:class:`~llama4.model.paged_cache.PagedKVCache`.

With ``batch_invariant`` a row computes what its solo run computes, bit for bit on CPU: products in
fixed 16-row tiles, attention over its own keys in a fixed key bucket (or, for packed bf16 models on
AMX, the fused C layers, which compute every token as a row of its own); and prefill is
split-invariant too, each prompt token computed as a decode step would compute it (see
``llama4.model.invariance``).

With LoRA adapters (``rows``: the AdapterRows of the engine's llama4.lora.multi.MultiLora) the runner sets
each token's adapter slot before every forward: a prefill piece's tokens all on their sequence's, a decode
step's rows each on its own.
"""

from __future__ import annotations

import contextlib

import torch

from llama4.inference.sequence import SequenceState
from llama4.lora.multi import AdapterRows
from llama4.model.paged_cache import PagedKVCache, PagedSequence
from llama4.model.transformer import Llama4Model


class ModelRunner:
    #: The engine may run a prompt in pieces (one per iteration) and copy a sequence's cache (the prefix cache, a
    #: prompt shared by the choices of n); a runner that keeps caches of its own may not (context_runner.py).
    prefill_in_pieces = True
    copies_caches = True

    def __init__(self, model: Llama4Model, pool: PagedKVCache, batch_invariant: bool, rows: AdapterRows | None = None):
        self.model, self.pool, self.rows = model, pool, rows
        model.set_batch_invariant(batch_invariant)  # the model the engine runs computes as its config says
        self.device = model.text.embed.weight.device

    def check(self, request) -> None:
        """Raises ValueError for a request this runner cannot run, before it is queued (none here)."""

    @property
    def has_vision(self) -> bool:
        return self.model.vision is not None

    def embed_images(self, ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
        """The embeddings [1, T, D] of prompt tokens ``ids`` with their images (the image features are
        computed once, for every piece)."""
        dtype = self.model.text.embed.weight.dtype
        return self.model.embed(torch.tensor([ids], device=self.device),
                                pixel_values.to(device=self.device, dtype=dtype))

    def prefill(self, seq: SequenceState, start: int, size: int) -> torch.Tensor:
        """Run prompt tokens ``start`` .. ``start + size`` of ``seq`` into its cache; their logits [size, V]
        when the prompt's own logprobs are asked, else the last one's [1, V] (the model's dtype)."""
        if seq.embeds is not None:
            embeds, ids = seq.embeds[:, start - seq.reused:start - seq.reused + size], None
        else:  # text: embedded piece by piece, never the whole prompt at once
            embeds, ids = None, seq.request.prompt[start:start + size]
        return self.prefill_piece(seq.cache, start, ids, embeds, seq.request.prompt_logprobs is not None,
                                  seq.adapter_slot)

    def prefill_piece(self, cache: PagedSequence, start: int, ids: list[int] | None, embeds: torch.Tensor | None,
                      every_logit: bool, slot: int = 0) -> torch.Tensor:
        """The model call of a prefill piece: token ``ids`` (or their embeddings [1, T, D], for a prompt with
        images) at sequence index ``start`` of ``cache``; the logits of every token [T, V] or of the last [1, V].
        (The seam a sharded run repeats on every rank: llama4.inference.sharded.)"""
        piece = embeds if embeds is not None else self.model.embed(torch.tensor([ids], device=self.device))
        positions = torch.arange(start, start + piece.shape[1], device=self.device)[None]
        with self._adapters([slot] * piece.shape[1]):
            logits = self.model.text(piece, positions, self.pool.batch([cache]),
                                     num_logits=piece.shape[1] if every_logit else 1)
        return logits[0]

    def decode(self, tokens: list[int], caches: list[PagedSequence], slots: list[int] | None = None) -> torch.Tensor:
        """One ragged step: row i feeds ``tokens[i]`` to ``caches[i]``, each at its own length (and on LoRA slot
        ``slots[i]``); logits [B, V] float32 on the CPU."""
        ids = torch.tensor([[t] for t in tokens], device=self.device)
        with self._adapters(slots or [0] * len(tokens)):
            return self.model(ids, cache=self.pool.batch(caches))[:, -1].float().cpu()

    @property
    def down(self) -> str | None:
        """Why this runner can make no more model calls (None: it can); see the sharded runner."""
        return None

    def _adapters(self, slots: list[int]):
        return self.rows.using(slots) if self.rows is not None else contextlib.nullcontext()
