"""llama4.model.ops against float64 re-derivations written here from the reference sheet (§4).

Tolerances are stated per test. fp32 results are compared to float64 truth at ~1e-6 relative (a few
fp32 ulps); attention fast paths are compared to the slow `masked_attention` oracle at 1e-6 absolute.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama4.config import RopeScaling
from llama4.model import ops


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# rms_norm
# ----------------------------------------------------------------------------------------------------


def _rms_norm64(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rms_norm_fp32_without_weight(eps):
    x = torch.randn(3, 5, 64, generator=_gen(0)) * 3.0
    got = ops.rms_norm(x, None, eps)
    assert got.dtype == torch.float32
    # fp32 vs float64 re-derivation: 2e-6 relative (a few ulps after mean/rsqrt).
    torch.testing.assert_close(got.double(), _rms_norm64(x, eps), rtol=2e-6, atol=1e-7)
    # Normalised rows have RMS ~1 (not unit L2 norm: this is a mean, not a sum).
    rms = got.double().pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-4, atol=0)


def test_rms_norm_fp32_with_weight():
    x = torch.randn(4, 32, generator=_gen(1))
    w = 1.0 + 0.5 * torch.randn(32, generator=_gen(2))
    got = ops.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got.double(), _rms_norm64(x, 1e-5) * w.double(), rtol=2e-6, atol=1e-7)


def test_rms_norm_eps_is_inside_the_root():
    # A tiny input makes eps dominate: y = x / sqrt(mean(x^2) + eps), tolerance 1e-6 relative.
    x = torch.full((1, 8), 1e-4)
    got = ops.rms_norm(x, None, 1e-2)
    expected = 1e-4 / math.sqrt(1e-8 + 1e-2)
    torch.testing.assert_close(got, torch.full((1, 8), expected), rtol=1e-6, atol=0)


def test_rms_norm_bf16_normalises_in_fp32_then_casts_back_before_the_weight():
    """HF: weight * hidden.to(input_dtype): the normalised value is rounded to bf16 BEFORE the weight."""
    x = (torch.randn(64, 256, generator=_gen(3)) * 4).to(torch.bfloat16)
    w = (1.0 + 0.3 * torch.randn(256, generator=_gen(4))).to(torch.bfloat16)
    got = ops.rms_norm(x, w, 1e-5)
    assert got.dtype == torch.bfloat16
    # Exact (bitwise): the normalisation rounded to bf16, then a bf16 x bf16 product.
    normed_bf16 = _rms_norm64(x, 1e-5).float().to(torch.bfloat16)
    no_weight = ops.rms_norm(x, None, 1e-5)
    assert no_weight.dtype == torch.bfloat16
    # Normalisation computed in fp32 (not bf16): within one bf16 rounding of the float64 truth
    # (relative 2^-8), and equal to the float64-rounded value for >= 99% of entries.
    truth = _rms_norm64(x, 1e-5)
    assert ((no_weight.double() - truth).abs() <= truth.abs() * 2.0**-8 + 1e-30).all()
    assert (no_weight == normed_bf16).float().mean() >= 0.99
    assert torch.equal(got, no_weight * w)
    # ...which is observably different from applying the weight in fp32 and rounding once.
    weight_in_fp32 = (_rms_norm64(x, 1e-5).float() * w.float()).to(torch.bfloat16)
    assert not torch.equal(got, weight_in_fp32)


def test_rms_norm_bf16_input_is_not_normalised_in_bf16():
    # A bf16-only computation of mean(x^2) over 4096 entries loses ~3 significant bits; the fp32 path
    # stays within one bf16 rounding (2^-8 relative) of the float64 truth for every entry.
    x = (torch.randn(8, 4096, generator=_gen(5)) * 10).to(torch.bfloat16)
    got = ops.rms_norm(x, None, 1e-5).double()
    truth = _rms_norm64(x, 1e-5)
    assert ((got - truth).abs() <= truth.abs() * 2.0**-8).all()


# ----------------------------------------------------------------------------------------------------
# rope_inv_freq
# ----------------------------------------------------------------------------------------------------


def _inv_freq64(head_dim: int, theta: float) -> torch.Tensor:
    j = torch.arange(head_dim // 2, dtype=torch.float64)
    return 1.0 / theta ** (2 * j / head_dim)


def _llama3_inv_freq64(head_dim, theta, factor, low, high, orig) -> torch.Tensor:
    """llama3 scaling re-derived from the sheet (§4.3) in float64."""
    out = []
    for w in _inv_freq64(head_dim, theta).tolist():
        wavelen = 2 * math.pi / w
        if wavelen < orig / high:
            out.append(w)
        elif wavelen > orig / low:
            out.append(w / factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append((1 - smooth) * w / factor + smooth * w)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("head_dim,theta", [(128, 500000.0), (64, 10000.0), (16, 500000.0)])
def test_rope_inv_freq_default(head_dim, theta):
    got = ops.rope_inv_freq(head_dim, theta, None)
    assert got.dtype == torch.float32 and got.shape == (head_dim // 2,)
    # float32 power vs float64: 2e-6 relative.
    torch.testing.assert_close(got.double(), _inv_freq64(head_dim, theta), rtol=2e-6, atol=0)


def test_rope_inv_freq_scout_llama3_split_is_35_kept_29_divided_by_16():
    scaling = RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                          original_max_position_embeddings=8192)
    base = ops.rope_inv_freq(128, 500000.0, None)
    got = ops.rope_inv_freq(128, 500000.0, scaling)
    assert got.shape == (64,)
    # Exact: pairs 0..34 unchanged, 35..63 divided by 16 (a power of two, so bitwise).
    assert torch.equal(got[:35], base[:35])
    assert torch.equal(got[35:], base[35:] / 16)
    # Sheet: wavelength of pair 34 is ~6695, of pair 35 ~8219 (the split straddles 8192).
    wl = 2 * math.pi / _inv_freq64(128, 500000.0)
    assert 6690 < wl[34] < 6700 and 8215 < wl[35] < 8225
    torch.testing.assert_close(got.double(), _llama3_inv_freq64(128, 500000.0, 16, 1, 1, 8192), rtol=2e-6, atol=0)


def test_rope_inv_freq_llama3_smooth_band():
    """low 1 / high 4: wavelengths in [orig/4, orig] are interpolated (re-derived in float64)."""
    head_dim, theta, factor, low, high, orig = 128, 500000.0, 8.0, 1.0, 4.0, 8192
    scaling = RopeScaling(factor=factor, low_freq_factor=low, high_freq_factor=high,
                          original_max_position_embeddings=orig)
    got = ops.rope_inv_freq(head_dim, theta, scaling).double()
    ref = _llama3_inv_freq64(head_dim, theta, factor, low, high, orig)
    base = _inv_freq64(head_dim, theta)
    wl = 2 * math.pi / base
    medium = (wl >= orig / high) & (wl <= orig / low)
    assert medium.sum() >= 5, "the test config must have a non-empty smooth band"
    # The smoothed pairs are strictly between w/factor and w.
    assert ((ref[medium] < base[medium]) & (ref[medium] > base[medium] / factor)).all()
    # float32 vs float64 re-derivation: 3e-6 relative.
    torch.testing.assert_close(got, ref, rtol=3e-6, atol=0)


def test_rope_inv_freq_matches_transformers_llama3():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.Llama4TextConfig(
        hidden_size=64, num_attention_heads=4, head_dim=32, num_hidden_layers=1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    hf, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = ops.rope_inv_freq(32, 10000.0, RopeScaling(8.0, 1.0, 4.0, 64))
    torch.testing.assert_close(ours, hf.float(), rtol=1e-6, atol=0)  # same float32 recipe: ~1 ulp


# ----------------------------------------------------------------------------------------------------
# apply_rope / rope_table
# ----------------------------------------------------------------------------------------------------


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """The fast path under test: rope_table (complex64 rotations) then apply_rope."""
    return ops.apply_rope(x, ops.rope_table(positions, inv_freq))


def _rope64_complex(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, d] rotated as complex numbers z_j = x[2j] + i x[2j+1] by exp(i p w_j), float64."""
    xd = x.double()
    z = torch.complex(xd[..., 0::2], xd[..., 1::2])  # [B, T, H, d/2]
    angle = positions.double()[..., None] * inv_freq.double()  # [B or 1, T, d/2]
    rot = torch.polar(torch.ones_like(angle), angle)[:, :, None, :]
    out = z * rot
    return torch.stack((out.real, out.imag), dim=-1).flatten(-2)


def _rope64_half_split(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    xd = x.double()
    half = xd.shape[-1] // 2
    a, b = xd[..., :half], xd[..., half:]
    angle = positions.double()[..., None] * inv_freq.double()
    c, s = angle.cos()[:, :, None, :], angle.sin()[:, :, None, :]
    return torch.cat((a * c - b * s, a * s + b * c), dim=-1)


@pytest.mark.parametrize("batch_positions", [False, True])
def test_apply_rope_interleaved_pairs_match_complex_rotation(batch_positions):
    b, t, h, d = 2, 7, 3, 16
    x = torch.randn(b, t, h, d, generator=_gen(10))
    inv_freq = ops.rope_inv_freq(d, 10000.0, None)
    if batch_positions:
        positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [40, 41, 42, 500, 501, 9000, 12345]])
    else:
        positions = torch.arange(100, 100 + t)[None]
    got = _rotate(x, positions, inv_freq)
    assert got.shape == x.shape and got.dtype == x.dtype
    ref = _rope64_complex(x, positions, inv_freq)
    # fp32 angles (float32(p) * float32(w)) vs float64: phase error ~ p * 6e-8 <= ~1e-3 at p=12345;
    # so 2e-3 absolute on unit-scale inputs, and 2e-6 for positions < 100.
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-3)
    small = (positions < 100).all(dim=0) if positions.shape[0] > 1 else positions[0] < 200
    torch.testing.assert_close(got[:, small].double(), ref[:, small], rtol=0, atol=2e-5)
    # Norm of every pair is preserved (rotation).
    pair_norm = lambda y: y.double().unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(got), pair_norm(x), rtol=1e-5, atol=1e-6)


def test_apply_rope_is_not_the_half_split_convention():
    b, t, h, d = 1, 5, 2, 16
    x = torch.randn(b, t, h, d, generator=_gen(11))
    inv_freq = ops.rope_inv_freq(d, 10000.0, None)
    positions = torch.arange(1, 1 + t)[None]
    got = _rotate(x, positions, inv_freq).double()
    half = _rope64_half_split(x, positions, inv_freq)
    assert (got - half).abs().max() > 0.1  # the wrong convention is far off (O(1) differences)
    # The interleaved pair (x[0], x[1]) is rotated by w_0 = 1 rad/position: check it directly.
    p = positions[0, 2].item()
    c, s = math.cos(p), math.sin(p)
    x0, x1 = x[0, 2, 0, 0].item(), x[0, 2, 0, 1].item()
    assert got[0, 2, 0, 0].item() == pytest.approx(x0 * c - x1 * s, abs=1e-6)
    assert got[0, 2, 0, 1].item() == pytest.approx(x0 * s + x1 * c, abs=1e-6)


def test_apply_rope_bf16_rotates_in_fp32_and_casts_back():
    x = torch.randn(1, 6, 2, 32, generator=_gen(12)).to(torch.bfloat16)
    inv_freq = ops.rope_inv_freq(32, 500000.0, None)
    positions = torch.arange(6)[None]
    got = _rotate(x, positions, inv_freq)
    assert got.dtype == torch.bfloat16
    ref = _rope64_complex(x.float(), positions, inv_freq)
    # One bf16 rounding of the fp32 result: <= 2^-8 relative of the pair magnitude.
    assert ((got.double() - ref).abs() <= ref.abs().clamp_min(1e-3) * 2.0**-8 + 1e-6).all()
    assert torch.equal(got, _rotate(x.float(), positions, inv_freq).to(torch.bfloat16))


def test_rope_table_uses_fp32_product_of_position_and_frequency():
    inv_freq = ops.rope_inv_freq(128, 500000.0, None)
    positions = torch.tensor([[0, 1, 8191, 8192, 100_000, 10_485_759]])
    table = ops.rope_table(positions, inv_freq)
    assert table.dtype == torch.complex64 and table.shape == (1, 6, 64)
    angles = positions[..., None].float() * inv_freq  # the HF recipe: float32(p) * float32(w), then polar
    assert torch.equal(table, torch.polar(torch.ones_like(angles), angles))
    assert torch.equal(table[0, 0], torch.ones(64, dtype=torch.complex64))
    torch.testing.assert_close(table.abs(), torch.ones(1, 6, 64), rtol=0, atol=1e-6)  # unit modulus


# ----------------------------------------------------------------------------------------------------
# temperature_scale
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,expected",
    [(0, 1.0), (1, 1.0), (8190, 1.0), (8191, 1.0693147), (16382, 1.0693147), (16383, 1.1098612),
     (65535, 1.2197225), (1_048_575, 1.4859812), (10_485_759, 1.7155396)],
)
def test_temperature_scale_sheet_values(n, expected):
    got = ops.temperature_scale(torch.tensor([n]), 8192, 0.1)
    assert got.dtype == torch.float32
    if expected == 1.0:
        assert got.item() == 1.0  # exactly a no-op below 8191
    else:
        assert got.item() == pytest.approx(expected, abs=1e-6)  # sheet values have 7 decimals
    truth = 1 + 0.1 * math.log(1 + math.floor((n + 1) / 8192))
    assert got.item() == pytest.approx(truth, rel=1e-6)


def test_temperature_scale_vector_and_other_floor():
    n = torch.arange(0, 40)
    got = ops.temperature_scale(n, 3, 0.25)
    truth = torch.tensor([1 + 0.25 * math.log(1 + (i + 1) // 3) for i in range(40)])
    torch.testing.assert_close(got.double(), truth.double(), rtol=1e-6, atol=0)
    assert (got[:2] == 1.0).all() and (got[2:] > 1.0).all()


# ----------------------------------------------------------------------------------------------------
# swiglu
# ----------------------------------------------------------------------------------------------------


def _swiglu(x, gate, up, down):
    from llama4.model.moe import SwiGLU

    mlp = SwiGLU(x.shape[-1], gate.shape[0])
    with torch.no_grad():
        mlp.gate.weight.copy_(gate)
        mlp.up.weight.copy_(up)
        mlp.down.weight.copy_(down)
        return mlp(x)


def test_swiglu_against_float64():
    x = torch.randn(5, 16, generator=_gen(20))
    gate, up = torch.randn(24, 16, generator=_gen(21)) * 0.3, torch.randn(24, 16, generator=_gen(22)) * 0.3
    down = torch.randn(16, 24, generator=_gen(23)) * 0.3
    got = _swiglu(x, gate, up, down)
    xd = x.double()
    g = xd @ gate.double().T
    ref = ((g * torch.sigmoid(g)) * (xd @ up.double().T)) @ down.double().T
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)  # fp32 matmul chain
    # gate and up are not interchangeable (silu applies to the gate only).
    swapped = _swiglu(x, up, gate, down)
    assert (swapped - got).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------
# attention: fast paths vs the masked oracle, and the oracle vs float64 first principles
# ----------------------------------------------------------------------------------------------------


def _qkv(b, h, hkv, tq, tk, d=8, seed=0, dtype=torch.float32):
    g = _gen(seed)
    q = torch.randn(b, h, tq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, tk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, tk, d, generator=g, dtype=dtype)
    return q, k, v


def _attention64(q, k, v, q_start, k_start, chunk):
    """float64 per-query loop: query i sees keys j <= i (and same chunk); KV head of query head h is h // G."""
    b, h, tq, d = q.shape
    groups = h // k.shape[1]
    out = torch.zeros(b, h, tq, d, dtype=torch.float64)
    for i in range(tq):
        qi = q_start + i
        keys = [j for j in range(k.shape[2]) if k_start + j <= qi
                and (chunk is None or (k_start + j) // chunk == qi // chunk)]
        for head in range(h):
            kk = k[:, head // groups, keys].double()
            vv = v[:, head // groups, keys].double()
            s = (kk @ q[:, head, i].double()[..., None])[..., 0] / math.sqrt(d)
            out[:, head, i] = (s.softmax(-1)[..., None] * vv).sum(1)
    return out


def test_masked_attention_oracle_matches_float64_loop():
    q, k, v = _qkv(2, 4, 2, 5, 11, seed=1)
    for chunk in (None, 4):
        got = ops.masked_attention(q, k, v, q_start=9, k_start=3, chunk=chunk)
        torch.testing.assert_close(got.double(), _attention64(q, k, v, 9, 3, chunk), rtol=0, atol=2e-6)


# (q_start, k_start, Tq, chunk): the keys always cover [k_start, q_start + Tq).
CHUNKED_CASES = [
    (0, 0, 16, 4),  # prefill, T a multiple of the chunk
    (0, 0, 13, 4),  # prefill, ragged tail
    (0, 0, 3, 4),  # prefill shorter than one chunk
    (0, 0, 1, 4),  # first token
    (6, 4, 1, 4),  # decode mid-chunk, keys from the chunk start
    (3, 0, 1, 4),  # decode just before a boundary (last slot of chunk 0)
    (4, 4, 1, 4),  # decode exactly at a boundary (first slot of chunk 1)
    (5, 4, 1, 4),  # decode just after a boundary
    (4, 0, 1, 4),  # at a boundary with the whole previous chunk still passed as keys
    (2, 0, 7, 4),  # query block starting mid-chunk, spanning one boundary
    (5, 4, 14, 4),  # mid-chunk start, spans several boundaries, ragged end
    (6, 0, 10, 4),  # keys start a whole chunk before the query chunk
    (8, 8, 8, 4),  # block starting at a boundary, whole chunks
    (7, 4, 2, 4),  # last slot + first slot of the next chunk
    (3, 0, 1, 1),  # chunk 1: every query sees only itself
    (0, 0, 9, 1),
    (10, 0, 6, 16),  # chunk larger than everything: plain causal
    (17, 14, 30, 7),  # chunk not a power of two
]


@pytest.mark.parametrize("q_start,k_start,tq,chunk", CHUNKED_CASES)
@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (4, 1)])  # GQA groups 1, 2, 4
def test_chunked_causal_attention_matches_masked_oracle(q_start, k_start, tq, chunk, h, hkv):
    tk = q_start + tq - k_start
    q, k, v = _qkv(3, h, hkv, tq, tk, seed=q_start * 31 + tq)
    got = ops.chunked_causal_attention(q, k, v, q_start, k_start, chunk)
    ref = ops.masked_attention(q.double(), k.double(), v.double(), q_start, k_start, chunk)
    assert got.shape == (3, h, tq, 8)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6)  # fp32 vs float64: outputs are O(1)


def test_chunked_attention_really_is_block_diagonal():
    """Not a sliding window: the first query of a chunk sees only itself."""
    q, k, v = _qkv(1, 2, 2, 8, 8, seed=3)
    out = ops.chunked_causal_attention(q, k, v, 0, 0, 4)
    torch.testing.assert_close(out[:, :, 4], v[:, :, 4], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0], rtol=0, atol=1e-6)
    full = ops.masked_attention(q, k, v, 0, 0, None)
    assert (out[:, :, 5] - full[:, :, 5]).abs().max() > 1e-3


@pytest.mark.parametrize("tq,tk", [(9, 9), (3, 9), (1, 9), (1, 1), (2, 2)])
@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (6, 2)])
def test_causal_attention_matches_masked_oracle_bottom_right_aligned(tq, tk, h, hkv):
    q, k, v = _qkv(2, h, hkv, tq, tk, seed=tq * 7 + tk)
    got = ops.causal_attention(q, k, v)
    # Queries are the last tq of the tk keys: query i sits at index tk - tq + i.
    ref = ops.masked_attention(q.double(), k.double(), v.double(), q_start=tk - tq, k_start=0, chunk=None)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6)  # fp32 vs float64: outputs are O(1)


def test_causal_attention_single_query_sees_every_key():
    q, k, v = _qkv(2, 4, 2, 1, 6, seed=8)
    got = ops.causal_attention(q, k, v)
    ref = _attention64(q, k, v, q_start=5, k_start=0, chunk=None)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-6)


def test_chunked_attention_rejects_keys_starting_after_the_chunk_start():
    q, k, v = _qkv(1, 2, 2, 1, 2, seed=4)
    with pytest.raises(ValueError, match="chunk start"):
        ops.chunked_causal_attention(q, k, v, q_start=6, k_start=5, chunk=4)  # chunk of 6 starts at 4


@pytest.mark.parametrize("tk", [3, 5])
def test_chunked_attention_rejects_keys_not_covering_the_queries(tk):
    q, k, v = _qkv(1, 2, 2, 2, tk, seed=5)
    with pytest.raises(ValueError, match="cover"):
        ops.chunked_causal_attention(q, k, v, q_start=4, k_start=0, chunk=4)  # needs exactly 6 keys


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    chunk=st.integers(1, 9),
    q_start=st.integers(0, 40),
    tq=st.integers(1, 30),
    back=st.integers(0, 2),
    groups=st.sampled_from([1, 2, 4]),
    batch=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_chunked_attention_randomized(chunk, q_start, tq, back, groups, batch, seed):
    # keys start at the query's chunk start, or `back` chunks earlier (clamped at 0)
    k_start = max(0, (q_start // chunk - back) * chunk)
    tk = q_start + tq - k_start
    q, k, v = _qkv(batch, 2 * groups, 2, tq, tk, seed=seed)
    got = ops.chunked_causal_attention(q, k, v, q_start, k_start, chunk)
    ref = ops.masked_attention(q.double(), k.double(), v.double(), q_start, k_start, chunk)
    # fp32 against the float64 oracle: outputs are O(1), a few ulp of accumulated rounding whichever kernels
    # ATen picks (the fp32-vs-fp32 masked path differed by 1.13e-6 under ATen's AVX2 kernels)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6)
