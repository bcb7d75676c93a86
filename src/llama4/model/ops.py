"""Pure tensor functions of the Llama 4 text decoder.

Each function states the shapes it takes. Numerics follow the reference sheet (and so transformers):
norms and rotations are computed in float32 and cast back to the working dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llama4.config import RopeScaling


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMS-normalise the last dim in float32, cast back, then scale by ``weight`` (if any) in x's dtype.

    torch's fused kernel accumulates in float32 and rounds once, giving exactly
    ``(x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)`` (tested against that formula in fp32 and bf16).
    """
    y = F.rms_norm(x, (x.shape[-1],), eps=eps)
    return y if weight is None else y * weight


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Rotary inverse frequencies, float32 [head_dim // 2], with optional llama3-style scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    if scaling.high_freq_factor == scaling.low_freq_factor:
        return scaled  # no band between the two wavelengths to interpolate in
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_table(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Unit complex rotations e^(i * position * freq), complex64 [..., head_dim // 2] for positions [...]."""
    angles = positions[..., None].float() * inv_freq
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2j, 2j+1) of x [B, T, H, d] by ``rotation`` [B or 1, T, d/2], in float32.

    Llama 4 checkpoints keep Meta's complex-number layout: pairs are adjacent, not split in halves.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation[:, :, None, :]).flatten(-2).type_as(x)


def temperature_scale(cache_index: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Query scale of NoPE layers: 1 + attn_scale * log(1 + floor((n + 1) / floor_scale)), float32 [T].

    ``cache_index`` n is the token's index in the sequence (not its RoPE position). Exactly 1 for
    n < floor_scale - 1, so short prompts are unaffected.
    """
    return torch.log1p(torch.floor((cache_index.float() + 1.0) / floor_scale)) * attn_scale + 1.0


# ----------------------------------------------------------------------------------------------------
# Attention. Inputs are head-major: q [B, H, Tq, d], k/v [B, Hkv, Tk, d]. Query i sits at sequence index
# q_start + i, key j at k_start + j. The fast paths below never build a Tq x Tk mask for long inputs;
# `masked_attention` is the slow reference they are tested against.
# ----------------------------------------------------------------------------------------------------


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
          causal: bool = False) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query per sequence that may see every key: fold the GQA group into the query axis.

    q [B, H, 1, d], k/v [B, Hkv, S, d] -> [B, H, 1, d], without repeating the keys per head.
    """
    b, h, _, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, h // hkv, d)
    out = F.scaled_dot_product_attention(qg, k, v)
    return out.reshape(b, h, 1, d)


def ragged_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            valid: torch.Tensor | list[int]) -> torch.Tensor:
    """One query per row that sees the first valid[b] keys of its row: q [B, H, 1, d], k/v [B, Hkv, S, d].

    Batch-invariant: each row is computed exactly as its own batch-1 decode step computes it (the same
    kernel over exactly its valid keys), so its result does not depend on the other rows or on the
    buffer width S. One masked call over the padded buffer would round differently: the kernel's
    softmax and value sums run over S keys instead of valid[b]. Consecutive rows of one length share a
    call (the unmasked kernel is batch-invariant).
    """
    lengths = valid.tolist() if isinstance(valid, torch.Tensor) else list(valid)
    groups, sizes = [lengths[0]], [1]  # runs of consecutive rows at one length
    for n in lengths[1:]:
        if n == groups[-1]:
            sizes[-1] += 1
        else:
            groups.append(n)
            sizes.append(1)
    if len(groups) == 1:
        return causal_attention(q, k[:, :, :groups[0]], v[:, :, :groups[0]])
    outputs = [causal_attention(qg, kg[:, :, :n], vg[:, :, :n])
               for n, qg, kg, vg in zip(groups, q.split(sizes), k.split(sizes), v.split(sizes))]
    return torch.cat(outputs)


def masked_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One query per row that sees the first valid[b] keys of its row: q [B, H, 1, d], k/v [B, Hkv, S, d].

    One masked call over the padded buffer: a row's rounding depends on S (see ragged_decode_attention).
    """
    b, h, _, d = q.shape
    hkv = k.shape[1]
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < valid[:, None]  # [B, S]
    qg = q.reshape(b, hkv, h // hkv, d)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None, :])
    return out.reshape(b, h, 1, d)


# Batch-invariant attention (model.invariance): a query that sees n keys is attended by one masked
# call over exactly bucket(n) keys (n rounded up to ATTENTION_BUCKET; the keys past n are masked, so
# their values never matter and a cache may hand over wider buffers). The CPU kernel computes every
# batch entry on its own, so a query's result depends only on its own query, keys and n: not on the
# other rows of a decode batch, not on the other queries of a prefill piece, not on a buffer's width.
# Queries in one bucket share one call (a decode batch's rows; a prefill piece's queries, as batch
# entries over the same keys), where exact per-query calls cost a kernel launch per row, token and layer.

ATTENTION_BUCKET = 256  # keys: coarse, so that a decode batch at ordinary lengths is one call per layer
MASK_ELEMENTS = 1 << 22  # most query x key mask entries of one call (16 MB once the kernel makes it float)


def attention_bucket(n: int) -> int:
    """The number of keys a batch-invariant call over n keys runs on: n rounded up to ATTENTION_BUCKET."""
    return -(-n // ATTENTION_BUCKET) * ATTENTION_BUCKET


def _keys_width(x: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """x[:, :, start:start + width], zero-padded where x ends sooner (masked entries: any finite value)."""
    x = x[:, :, start:start + width]
    return x if x.shape[2] == width else F.pad(x, (0, 0, 0, width - x.shape[2]))


_KEY_INDEX: dict[torch.device, torch.Tensor] = {}  # one read-only arange per device, grown by doubling


def _key_index(width: int, device: torch.device) -> torch.Tensor:
    """arange(width) on ``device``: a view of one shared arange, so memory follows the widest call."""
    index = _KEY_INDEX.get(device)
    if index is None or len(index) < width:
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            index = _KEY_INDEX[device] = torch.arange(max(width, 2 * len(index) if index is not None else 0),
                                                      device=device)
    return index[:width]


def _bucket_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | int) -> torch.Tensor:
    """q [N, H, 1, d], k/v [N, Hkv, L, d] (L a bucket): entry n sees its first lengths[n] keys (an int:
    the same for all) -> [N, H, 1, d]."""
    n, h, _, d = q.shape
    hkv = k.shape[1]
    index = _key_index(k.shape[2], q.device)
    mask = (index < lengths)[None, :] if isinstance(lengths, int) else index[None, :] < lengths[:, None]  # [1 or N, L]
    out = F.scaled_dot_product_attention(q.reshape(n, hkv, h // hkv, d), k, v, attn_mask=mask[:, None, None, :])
    return out.reshape(n, h, 1, d)


def bucketed_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              valid: torch.Tensor | list[int]) -> torch.Tensor:
    """One query per row that sees the first valid[b] keys of its row: q [B, H, 1, d], k/v [B, Hkv, S, d].

    Batch-invariant (see above): rows in one key bucket share a call; row b equals its batch-1 step.
    """
    lengths = valid.tolist() if isinstance(valid, torch.Tensor) else list(valid)
    widths = [attention_bucket(n) for n in lengths]
    lengths_t = torch.tensor(lengths, device=q.device)
    if len(set(widths)) == 1:
        return _bucket_attention(q, _keys_width(k, 0, widths[0]), _keys_width(v, 0, widths[0]), lengths_t)
    out = torch.empty_like(q)
    for width in sorted(set(widths)):
        rows = torch.tensor([b for b, w in enumerate(widths) if w == width], device=q.device)
        part = _bucket_attention(q[rows], _keys_width(k[rows], 0, width), _keys_width(v[rows], 0, width),
                                 lengths_t[rows])
        out.index_copy_(0, rows, part)
    return out


def _first_key(position: int, chunk: int | None, k_start: int) -> int:
    """The first key a query at ``position`` sees (its chunk's start, or 0), checked against the buffer."""
    first = (position // chunk) * chunk if chunk else 0
    if first < k_start:
        raise ValueError(f"query {position} sees keys from {first}, but the keys start at {k_start}")
    return first


def rowwise_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int,
                             chunk: int | None) -> torch.Tensor:
    """Causal (and, with ``chunk``, chunk-local) attention where every query is computed as a one-token
    decode step computes it (bucketed, see above), so its output does not depend on which other tokens
    share its pass: a prompt prefilled in any pieces, or fed one token at a time, gives the same keys,
    values and logits bit for bit. q [B, H, Tq, d]; keys cover [k_start, q_start + Tq).

    The queries with the same first key and bucket are one call, as batch entries over one set of keys
    (expanded, not copied).
    """
    b, h, tq, d = q.shape
    if tq == 1:  # a decode step
        first = _first_key(q_start, chunk, k_start)
        width = attention_bucket(q_start + 1 - first)
        return _bucket_attention(q, _keys_width(k, first - k_start, width), _keys_width(v, first - k_start, width),
                                 q_start + 1 - first)
    if b > 1:  # row by row: expanded keys of several rows could not stay views
        return torch.cat([rowwise_causal_attention(q[r:r + 1], k[r:r + 1], v[r:r + 1], q_start, k_start, chunk)
                          for r in range(b)])
    hkv = k.shape[1]
    outputs, i = [], 0
    while i < tq:
        position = q_start + i
        first = _first_key(position, chunk, k_start)
        n = position + 1 - first
        width = attention_bucket(n)
        end = min(first + (min(width, chunk) if chunk else width), q_start + tq)  # same first key and bucket
        m = min(end - position, max(1, MASK_ELEMENTS // width))  # the [m, width] mask stays small at long context
        keys = _keys_width(k, first - k_start, width).expand(m, hkv, width, d)
        values = _keys_width(v, first - k_start, width).expand(m, hkv, width, d)
        queries = q[0, :, i:i + m].transpose(0, 1)[:, :, None]  # [m, H, 1, d]
        out = _bucket_attention(queries, keys, values, torch.arange(n, n + m, device=q.device))
        outputs.append(out[:, :, 0].transpose(0, 1)[None])  # [1, H, m, d]
        i += m
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full causal attention where the queries are the last Tq of the Tk keys (bottom-right aligned)."""
    tq, tk = q.shape[2], k.shape[2]
    if tq == 1:
        return _decode_attention(q, k, v)
    if tq == tk:
        return _sdpa(q, k, v, causal=True)
    return _prefix_then_causal_attention(q, k, v)


def _prefix_then_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bottom-right causal attention without a Tq x Tk mask (a prefill piece after a long cached prefix).

    Every query sees all Tk - Tq prefix keys and the new keys causally; the two parts are attended
    separately and merged exactly by their log-sum-exps, so memory stays O(Tq + Tk) at any context.
    """
    b, h, tq, d = q.shape
    hkv = k.shape[1]
    prefix = k.shape[2] - tq
    # Prefix: no mask, so the GQA group folds into the query axis and the keys are not repeated.
    q_grouped = q.reshape(b, hkv, h // hkv * tq, d)
    out_prefix, lse_prefix = _flash_with_lse(q_grouped, k[:, :, :prefix], v[:, :, :prefix], causal=False)
    out_prefix, lse_prefix = out_prefix.reshape(b, h, tq, d), lse_prefix.reshape(b, h, tq)
    groups = h // hkv
    k_new, v_new = k[:, :, prefix:], v[:, :, prefix:]
    if groups > 1:
        k_new, v_new = k_new.repeat_interleave(groups, dim=1), v_new.repeat_interleave(groups, dim=1)
    out_new, lse_new = _flash_with_lse(q, k_new, v_new, causal=True)
    top = torch.maximum(lse_prefix, lse_new)
    w_prefix, w_new = torch.exp(lse_prefix - top), torch.exp(lse_new - top)
    merged = ((out_prefix.float() * w_prefix[..., None] + out_new.float() * w_new[..., None])
              / (w_prefix + w_new)[..., None])
    return merged.to(q.dtype)


def _flash_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and its log-sum-exp [B, H, Tq] (float32), via the fused kernel where available."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.exp(scores - lse[..., None]) @ v.float()).to(q.dtype), lse


def chunked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int,
                             chunk: int) -> torch.Tensor:
    """Causal attention restricted to the query's own chunk (index // chunk), chunk-native.

    Keys must cover [k_start, q_start + Tq) with k_start <= the chunk start of q_start. Cost is
    O(Tq x chunk): the queries are cut at chunk boundaries and each piece attends only to its chunk.
    """
    tq = q.shape[2]
    q_end = q_start + tq
    first_chunk_start = (q_start // chunk) * chunk
    if k_start > first_chunk_start:
        raise ValueError(f"keys start at {k_start}, after the chunk start {first_chunk_start} of query {q_start}")
    if k.shape[2] != q_end - k_start:
        raise ValueError(f"keys must cover [{k_start}, {q_end}), got {k.shape[2]} keys")
    k = k[:, :, first_chunk_start - k_start:]
    v = v[:, :, first_chunk_start - k_start:]
    boundary = min(first_chunk_start + chunk, q_end)  # end of the chunk holding the first query
    head_q = q[:, :, : boundary - q_start]
    outputs = [causal_attention(head_q, k[:, :, : boundary - first_chunk_start],
                                v[:, :, : boundary - first_chunk_start])]
    rest = q_end - boundary  # queries from the next chunk boundary on: whole chunks + a ragged tail
    if rest > 0:
        outputs.append(_aligned_chunks_attention(q[:, :, boundary - q_start:], k[:, :, boundary - first_chunk_start:],
                                                 v[:, :, boundary - first_chunk_start:], chunk))
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


def _aligned_chunks_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """Block-diagonal causal attention for q, k, v [B, H*, T, d] that start at a chunk boundary."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    n_full = t // chunk
    outputs = []
    if n_full:
        span = n_full * chunk

        def blocks(x: torch.Tensor, heads: int) -> torch.Tensor:  # [B, h, n*C, d] -> [B*n, h, C, d]
            return (x[:, :, :span].reshape(b, heads, n_full, chunk, d).transpose(1, 2)
                    .reshape(b * n_full, heads, chunk, d))

        out = _sdpa(blocks(q, h), blocks(k, hkv), blocks(v, hkv), causal=True)
        outputs.append(out.reshape(b, n_full, h, chunk, d).transpose(1, 2).reshape(b, h, span, d))
    if t % chunk:
        tail = n_full * chunk
        outputs.append(_sdpa(q[:, :, tail:], k[:, :, tail:], v[:, :, tail:], causal=t - tail > 1))
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int,
                     chunk: int | None) -> torch.Tensor:
    """Reference: explicit Tq x Tk mask (causal, and same chunk when ``chunk`` is given), eager softmax."""
    qi = torch.arange(q.shape[2], device=q.device)[:, None] + q_start
    kj = torch.arange(k.shape[2], device=q.device)[None, :] + k_start
    allowed = kj <= qi
    if chunk is not None:
        allowed &= (kj // chunk) == (qi // chunk)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ v


# ----------------------------------------------------------------------------------------------------
# The two attention backends a layer picks from (Attention.batch_invariant). Both take a pass's q [B, H, Tq, d]
# at sequence indices q_start.., keys/values [B, Hkv, Tk, d] from k_start, and, for a decode batch at ragged
# lengths, ``valid`` (row b sees its first valid[b] keys); ``chunk``: chunk-local attention (None: global).
# ----------------------------------------------------------------------------------------------------


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int,
                        valid: torch.Tensor | list[int] | None, chunk: int | None) -> torch.Tensor:
    """The fastest exact path for each pass: a ragged decode batch row by row (each as its solo step), a
    chunk-native pass, or one fused causal call."""
    if valid is not None:
        return ragged_decode_attention(q, k, v, valid)
    if chunk is not None:
        return chunked_causal_attention(q, k, v, q_start, k_start, chunk)
    return causal_attention(q, k, v)


def batch_invariant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int,
                              valid: torch.Tensor | list[int] | None, chunk: int | None) -> torch.Tensor:
    """Every query as a one-token decode step attends it (key buckets, see above): a decode batch's rows,
    and each token of a prefill piece, whatever else shares the pass."""
    if valid is not None:
        return bucketed_decode_attention(q, k, v, valid)
    return rowwise_causal_attention(q, k, v, q_start, k_start, chunk)
