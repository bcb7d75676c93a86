"""The reference generation loop: prefill (in pieces), then one token per step from the KV cache.

Prompts of different lengths are prefilled one by one, each exactly as its solo run, and then decoded
together: every row keeps its own sequence index, so batching never changes a row's result (no left
padding, whose pad slots would shift Llama 4's chunk boundaries and attention temperature).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from llama4.inference.sampling import Sampler, SamplingParams, TokenChoice, greedy_shortcut
from llama4.model.cache import KVCache
from llama4.model.transformer import Llama4Model, check_token_ids
from llama4.quant.kv_cache import check_kv_format, kv_storage

DEFAULT_PREFILL_CHUNK = 2048


@dataclass
class StepEvent:
    """One generated token of one prompt (``row`` indexes the prompts given to :func:`generate_tokens`)."""

    row: int
    choice: TokenChoice
    finished: bool  # a stop token was produced (the token itself is not part of the output) or the budget ran out
    stopped_by: int | None = None  # the stop token, if any


@dataclass
class Request:
    prompt: list[int]
    pixel_values: torch.Tensor | None = None
    params: SamplingParams = field(default_factory=SamplingParams)


def prefill(model: Llama4Model, ids: torch.Tensor, cache: KVCache, pixel_values: torch.Tensor | None = None,
            chunk: int = DEFAULT_PREFILL_CHUNK) -> torch.Tensor:
    """Run a prompt [B, T] through the model in pieces of ``chunk`` tokens; last-position logits [B, vocab].

    A text prompt is embedded piece by piece, so activation memory is bounded by the piece size, not the
    prompt length (at 1M tokens a whole-prompt embedding would be 10 GB for Scout's 5120-wide bf16
    rows). A prompt with images is embedded whole once, so that its image features are computed once.
    """
    if chunk <= 0:
        raise ValueError(f"prefill chunk must be > 0, got {chunk}")
    embeds = model.embed(ids, pixel_values) if pixel_values is not None else None
    logits = None
    for at in range(0, ids.shape[1], chunk):
        piece = embeds[:, at:at + chunk] if embeds is not None else model.embed(ids[:, at:at + chunk])
        starts = cache.starts(piece.shape[0])
        positions = torch.tensor(starts, device=ids.device)[:, None] + torch.arange(piece.shape[1], device=ids.device)
        logits = model.text(piece, positions, cache, num_logits=1)
    return logits[:, -1]


def new_cache(model: Llama4Model, kv_cache: str = "auto") -> KVCache:
    """An empty cache for ``model`` whose global (NoPE) layers store keys/values as ``kv_cache`` says: ``auto`` (the
    model's dtype), ``bf16``, ``int8`` or ``fp8`` (llama4.quant.kv_cache); chunk-local layers keep the model's dtype."""
    text = model.config.text
    return KVCache(text, storage=kv_storage(text, kv_cache, model.text.embed.weight.dtype))


def _as_prompts(input_ids) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        return input_ids.tolist()
    prompts = [list(map(int, p)) for p in input_ids]
    if not prompts:
        raise ValueError("no prompts given")
    return prompts


def generate_tokens(model: Llama4Model, requests: Sequence[Request], max_new_tokens: int,
                    stop_tokens: Sequence[int] | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                    cache: KVCache | None = None, kv_cache: str = "auto") -> Iterator[StepEvent]:
    """Yield tokens as they are produced, one event per live row per step.

    With ``cache`` (one request only) the prompt continues what the cache already holds (a chat
    session's earlier turns); each yielded token is fed to the cache on the next step, so after the
    generator is closed the cache holds everything but the last token. ``kv_cache``: how a new cache stores
    the global layers' keys and values (:func:`new_cache`; a given ``cache`` keeps its own).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_kv_format(kv_cache)
    vocab = model.config.text.vocab_size
    for r in requests:
        if not r.prompt:
            raise ValueError("every prompt needs at least one token")
        check_token_ids(r.prompt, vocab)
    stops = set(model.config.text.eos_token_ids if stop_tokens is None else stop_tokens)
    if max_new_tokens == 0:
        return
    device = model.text.embed.weight.device
    samplers = [Sampler(r.params, vocab, r.prompt) for r in requests]
    if cache is not None and len(requests) != 1:
        raise ValueError("an existing cache continues exactly one request")
    same_length = len({len(r.prompt) for r in requests}) == 1 and all(r.pixel_values is None for r in requests)
    with torch.inference_mode():
        if cache is not None:
            ids = torch.tensor([requests[0].prompt], device=device)
            logits = prefill(model, ids, cache, requests[0].pixel_values, chunk=prefill_chunk)
        elif same_length:
            cache = new_cache(model, kv_cache)
            ids = torch.tensor([r.prompt for r in requests], device=device)
            logits = prefill(model, ids, cache, chunk=prefill_chunk)
        else:
            caches, rows = [], []
            for r in requests:
                caches.append(new_cache(model, kv_cache))
                ids = torch.tensor([r.prompt], device=device)
                rows.append(prefill(model, ids, caches[-1], r.pixel_values, chunk=prefill_chunk))
            cache, logits = KVCache.stack(caches), torch.cat(rows)
        live = list(range(len(requests)))  # prompt index of each cache row
        for step in range(max_new_tokens):
            logits = logits.float().cpu()
            next_tokens, keep = [], []
            greedy = greedy_shortcut(logits, [samplers[row].plain_greedy for row in live])
            for i, row in enumerate(live):
                choice = TokenChoice(greedy[i]) if greedy[i] is not None else samplers[row].choose(logits[i])
                stopped = choice.token in stops
                done = stopped or step == max_new_tokens - 1
                yield StepEvent(row, choice, done, choice.token if stopped else None)
                if not done:
                    keep.append(i)
                    next_tokens.append(choice.token)
            if not keep:
                return
            if len(keep) != len(live):
                cache.keep_rows(keep)
                live = [live[i] for i in keep]
            ids = torch.tensor(next_tokens, device=device)[:, None]
            logits = model(ids, cache=cache)[:, -1]


def generate(model: Llama4Model, input_ids, max_new_tokens: int = 64, temperature: float = 0.0,
             stop_tokens: Sequence[int] | None = None, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
             seed: int | None = None, pixel_values: torch.Tensor | None = None, pad_token_id: int | None = None,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK, kv_cache: str = "auto"):
    """Generate continuations.

    ``input_ids``: LongTensor [B, T] (returns LongTensor [B, T + new], rows that stopped early padded
    with ``pad_token_id``, default the config's pad id or 0) or a list of token lists of any lengths
    (returns a list of lists: prompt + new tokens). ``stop_tokens=None`` stops on the model's
    end-of-turn / eos ids, ``[]`` never stops early. The stop token is kept in the output.
    Sampling with ``seed`` is reproducible; each row gets its own generator seeded with ``seed + row``.
    ``kv_cache`` (:func:`new_cache`): ``"auto"`` keeps keys/values in the model's dtype; ``"int8"`` / ``"fp8"``
    quantize the global layers' (the part that grows with the context, about half the bytes); ``"bf16"`` stores
    them in bf16 (a float32 model's).
    """
    prompts = _as_prompts(input_ids)
    requests = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                                presence_penalty=presence_penalty, seed=None if seed is None else seed + i)
        requests.append(Request(prompt, pixel_values if len(prompts) == 1 else None, params))
    if pixel_values is not None and len(prompts) != 1:
        raise ValueError("pixel_values with several prompts: pass one prompt per call (or use generate_tokens)")
    outputs = [list(p) for p in prompts]
    for event in generate_tokens(model, requests, max_new_tokens, stop_tokens, prefill_chunk, kv_cache=kv_cache):
        outputs[event.row].append(event.choice.token)
    if not isinstance(input_ids, torch.Tensor):
        return outputs
    pad = pad_token_id if pad_token_id is not None else (model.config.text.pad_token_id or 0)
    width = max(len(o) for o in outputs)
    return torch.tensor([o + [pad] * (width - len(o)) for o in outputs], dtype=torch.long)
