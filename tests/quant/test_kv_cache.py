"""Quantized KV cache storage (llama4.quant.kv_cache): the formats against float64 re-derivations, the caches that
store the global layers so, and the embedded model's long generations against its bf16 cache.

Tolerances. Formats, per element, against float64: int8 within scale / 2 (x (1 + 1e-6) for float32 division),
the bf16 scale at most one bf16 step (2^-7 relative) above amax / 127; fp8 codes are the float64 nearest e4m3
value of x / scale (ties to the even code), within half an e4m3 step of it. Decoding is the exact product rounded
once, bit for bit. Model: a cache split into any pieces computes what token-by-token decode computes (fp32,
1e-5); the paged cache what KVCache computes (1e-6); against the plain cache the logits of a random fp32 model
stay within 1e-2 (int8) / 5e-2 (fp8). The embedded model in bf16 over 300 prompt + 400 generated tokens, against
bf16 KV on the same (torch) layers: int8 writes the same greedy tokens; teacher-forced logits within 5e-3 (int8)
/ 1e-2 (fp8) relative on average and 3e-2 / 5e-2 at worst, with the same top-1 token at >= 99 % of the steps
(where fp8 differs, the bf16 top two are within 2 bf16 steps of each other); the global layers' storage is
66/128 of bf16's (measured from the tensors).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

import llama4
from llama4.inference.generate import new_cache, prefill
from llama4.kernels.cpu.fused_decode import _KV_FORMATS
from llama4.model.cache import KVCache
from llama4.model.paged_cache import GLOBAL, LOCAL, PagedKVCache
from llama4.quant.kv_cache import KVFormat, check_kv_format, dequantize_kv, kv_storage, quantize_kv
from tests.model.test_cache import ids, rel_err, tiny_text

CHUNK = 4


def samples(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes, heavy tails, a row of zeros and a row with one large outlier."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 33, 64, generator=g) * torch.logspace(-6, 6, 33)[None, :, None]
    x[:, ::5] = torch.distributions.StudentT(2.0).sample((6, 7, 64))
    x[0, 0] = 0
    x[1, 1, 7] = 1e4
    return x.to(dtype)


def e4m3_table() -> torch.Tensor:
    """Every finite float8_e4m3fn value by its code (0..255, NaN codes 127 and 255 as nan), in float64 from the
    format's definition (sign, 4 exponent bits with bias 7, 3 mantissa bits, subnormals at exponent 0)."""
    values = []
    for code in range(256):
        sign, exponent, mantissa = -1.0 if code & 0x80 else 1.0, (code >> 3) & 15, code & 7
        if exponent == 15 and mantissa == 7:
            values.append(float("nan"))
        elif exponent == 0:
            values.append(sign * mantissa / 8 * 2.0 ** -6)
        else:
            values.append(sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return torch.tensor(values, dtype=torch.float64)


# --- formats ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_codes_scales_and_error_against_float64(dtype):
    x = samples(dtype)
    codes, scale = quantize_kv(x, "int8")
    assert codes.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (*x.shape[:-1], 1)
    x64, s64 = x.double(), scale.double()
    amax = x64.abs().amax(-1, keepdim=True)
    assert (s64 >= amax / 127).all() and (s64 <= amax / 127 * (1 + 2 ** -7)).all()
    exact = x64 / torch.where(s64 == 0, 1, s64)
    near_half = ((exact - exact.floor()) - 0.5).abs() < 1e-5  # float32 division may round across .5 there
    diff = codes.double() - exact.round()
    assert (diff[~near_half] == 0).all() and (diff.abs() <= 1).all()
    assert codes.abs().max() <= 127
    err = (dequantize_kv(codes, scale).double() - x64).abs()
    assert (err <= s64 / 2 * (1 + 1e-6)).all()
    assert (dequantize_kv(codes, scale)[0, 0] == 0).all()  # a row of zeros comes back as zeros


def test_fp8_codes_are_the_nearest_e4m3_values_in_float64():
    x = samples()
    codes, scale = quantize_kv(x, "fp8")
    assert codes.dtype == torch.float8_e4m3fn
    table = e4m3_table()
    finite = torch.arange(256)[~table.isnan()]
    y = (x.double() / torch.where(scale.double() == 0, 1, scale.double())).clamp(-448, 448)
    distance = (y[..., None] - table[finite]).abs()  # [..., 254]
    best = distance.min(-1, keepdim=True).values
    ties = (distance == best).sum(-1) > 1
    nearest = finite[distance.argmin(-1)]
    got = codes.view(torch.uint8).long()
    assert (got[~ties] == nearest[~ties]).all()
    assert ((got[ties] & 1) == 0).all()  # ties to the even mantissa
    assert (table[got] - y).abs().le(best[..., 0] + 1e-12).all()
    # so: within half an e4m3 step of x / scale, i.e. relative 2^-4 for normal codes, absolute 2^-10 below 2^-6
    half_step = torch.where(y.abs() >= 2 ** -6, 2.0 ** (y.abs().clamp(min=2 ** -6).log2().floor() - 4), 2.0 ** -10)
    assert ((table[got] - y).abs() <= half_step).all()
    assert torch.equal(dequantize_kv(codes, scale).double(), table[got] * scale.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decoding_is_the_exact_product_rounded_once(dtype):
    """Every code (int8: -127..127; fp8: the 254 finite ones) times scales across the bf16 range."""
    scale = torch.logspace(-30, 30, 41, dtype=torch.float64).to(torch.bfloat16)[:, None]
    int8 = torch.arange(-127, 128, dtype=torch.int8)[None].expand(41, -1)
    table = e4m3_table()
    fp8 = torch.arange(256, dtype=torch.uint8)[~table.isnan()].view(torch.float8_e4m3fn)[None].expand(41, -1)
    for codes, values in ((int8, int8.double()), (fp8, table[~table.isnan()][None])):
        expected = (values * scale.double()).to(dtype)
        assert torch.equal(dequantize_kv(codes, scale, dtype), expected)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_stored_layout_round_trips_and_zeros_stay_zeros(fmt):
    storage = KVFormat(fmt)
    x = samples(torch.bfloat16)
    stored = storage.encode(x)
    assert stored.dtype == torch.uint8 and stored.shape == (*x.shape[:-1], 66) == (*x.shape[:-1], storage.width(64))
    assert storage.entry_bytes(64) == 66 and storage.entry_bytes(128) == 130
    codes, scale = quantize_kv(x, fmt)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(storage.decode(stored, dtype), dequantize_kv(codes, scale, dtype))
        strided = torch.zeros(6, 40, 66, dtype=torch.uint8)[:, 3:36]  # a slice of a larger buffer
        strided.copy_(stored)
        assert torch.equal(storage.decode(strided, dtype), dequantize_kv(codes, scale, dtype))
    assert (storage.encode(torch.zeros(2, 64)) == 0).all()  # a zero entry is stored as zero bytes...
    assert (storage.decode(torch.zeros(3, 66, dtype=torch.uint8), torch.bfloat16) == 0).all()  # ...and read back


def test_storage_per_layer_and_refusals():
    text = tiny_text(num_layers=8, moe_step=2)
    assert kv_storage(text, "auto", torch.bfloat16) is None
    assert kv_storage(text, "bf16", torch.bfloat16) is None  # already the attention's dtype
    for fmt, dtype in (("int8", torch.bfloat16), ("fp8", torch.float32), ("bf16", torch.float32)):
        storage = kv_storage(text, fmt, dtype)
        assert [i for i, s in enumerate(storage) if s is not None] == list(text.global_layers) == [3, 7]
        assert storage[3] == KVFormat(fmt)
    for bad in ("int4", "INT8", "q8_0"):
        with pytest.raises(ValueError, match="expected one of auto, bf16, int8, fp8"):
            kv_storage(text, bad, torch.bfloat16)
        with pytest.raises(ValueError, match="expected one of auto, bf16, int8, fp8"):
            check_kv_format(bad)
    with pytest.raises(ValueError, match="expected int8, fp8 or bf16"):
        KVFormat("int4")
    with pytest.raises(ValueError, match="int8 or fp8"):
        quantize_kv(torch.zeros(2, 8), "bf16")
    with pytest.raises(ValueError, match="one entry per layer"):
        KVCache(text, storage=[None, KVFormat("int8")])


# --- caches on a small random model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    # chunked layers 0-2 and 4-6 (chunk 4), global layers 3 and 7; temperature tuning on
    return llama4.random_model(llama4.ModelConfig(text=tiny_text(num_layers=8, moe_step=2)), std=0.2, seed=3)


@pytest.mark.parametrize("fmt,tolerance", [("int8", 1e-2), ("fp8", 5e-2), ("bf16", 1e-2)])
def test_pieces_and_steps_agree_and_stay_close_to_the_plain_cache(model, fmt, tolerance):
    """Per-entry scales: prefill pieces, token-by-token steps and the plain cache's logits agree."""
    text = model.config.text
    x = ids(97, 2, 4 * CHUNK + 3, seed=1)
    storage = kv_storage(text, fmt, torch.float32)
    with torch.no_grad():
        plain = model(x)
        stepped = KVCache(text, block_size=3, storage=storage)
        steps = torch.cat([model(x[:, t:t + 1], cache=stepped) for t in range(x.shape[1])], 1)
        pieces, at, cache = [], 0, KVCache(text, block_size=5, storage=storage)
        for size in (1, CHUNK + 1, 2, 2 * CHUNK + 1, 2):  # 19 tokens, pieces across chunk ends
            pieces.append(model(x[:, at:at + size], cache=cache))
            at += size
    assert rel_err(torch.cat(pieces, 1), steps) <= 1e-5
    assert 1e-5 < rel_err(steps, plain) <= tolerance  # (and it really is stored otherwise)
    for layer in range(text.num_layers):
        keys = stepped._k[layer]
        expected = (torch.float32, 8) if text.layers[layer].chunked else (storage[3].dtype, storage[3].width(8))
        assert (keys.dtype, keys.shape[-1]) == expected


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_rows_stacked_kept_and_copied_decode_as_their_solo_runs(model, fmt):
    """Prompts of different lengths prefilled apart and stacked, a row dropped, the rest copied: every row's
    logits are its solo run's, bit for bit (products batch-invariant; a token's codes depend on it alone)."""
    text = model.config.text
    storage = kv_storage(text, fmt, torch.float32)
    prompts = [ids(97, 1, n, seed=n) for n in (3, 2 * CHUNK + 1, CHUNK)]
    feed = ids(97, 1, 6, seed=9)  # the tokens every row is fed after its prompt

    def solo(prompt):
        cache = KVCache(text, storage=storage)
        return torch.cat([model(prompt, cache=cache)[:, -1]] +
                         [model(feed[:, t:t + 1], cache=cache)[:, -1] for t in range(6)])

    model.set_batch_invariant(True)
    try:
        with torch.no_grad():
            expected = [solo(p) for p in prompts]
            caches = [KVCache(text, storage=storage) for _ in prompts]
            got = [[model(p, cache=c)[:, -1]] for p, c in zip(prompts, caches)]
            batch, rows = KVCache.stack(caches), [0, 1, 2]
            for t in range(6):
                if t == 3:  # the middle row leaves, then the others go on in a copy
                    batch.keep_rows([0, 2])
                    batch, rows = batch.copy_rows([0, 1]), [0, 2]
                out = model(feed[:, t:t + 1].expand(len(rows), 1), cache=batch)[:, -1]
                for i, row in enumerate(rows):
                    got[row].append(out[i:i + 1])
    finally:
        model.set_batch_invariant(False)
    assert batch.storage == tuple(storage)
    for row in range(3):
        assert torch.equal(torch.cat(got[row]), expected[row][:len(got[row])]), row
    with pytest.raises(ValueError, match="same storage"):
        KVCache.stack([KVCache(text, storage=storage), KVCache(text)])


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_the_paged_cache_stores_as_kvcache_and_halves_the_global_blocks(model, fmt):
    """Two sequences prefilled apart, decoded as a ragged batch (blocks interleaved, then one moved to consecutive
    blocks), one prefix copy: the logits of KVCache with the same storage (1e-6)."""
    text = model.config.text
    storage = kv_storage(text, fmt, torch.float32)
    pool = PagedKVCache(text, block_size=3, initial_blocks=2, storage=storage)
    x = ids(97, 2, 3 * CHUNK + 2, seed=4)
    with torch.no_grad():
        seqs = [pool.sequence(), pool.sequence()]
        paged = [torch.cat([model(x[b:b + 1, :5], cache=pool.batch([seqs[b]])) for b in range(2)])]
        reference = KVCache(text, storage=storage)
        plain = [model(x[:, :5], cache=reference)]
        for t in range(5, x.shape[1] - 3):
            paged.append(model(x[:, t:t + 1], cache=pool.batch(seqs)))
            plain.append(model(x[:, t:t + 1], cache=reference))
        copy = seqs[0].copy_prefix(seqs[0].length - 1)
        seqs[1].release()
        tail = [model(x[:1, t:t + 1], cache=pool.batch([seqs[0]])) for t in range(x.shape[1] - 3, x.shape[1])]
        ref_tail = reference.copy_rows([0])
        expected_tail = [model(x[:1, t:t + 1], cache=ref_tail) for t in range(x.shape[1] - 3, x.shape[1])]
        again = model(x[:1, copy.length:copy.length + 1], cache=pool.batch([copy]))
    assert rel_err(torch.cat(paged, 1), torch.cat(plain, 1)) <= 1e-6
    assert rel_err(torch.cat(tail, 1), torch.cat(expected_tail, 1)) <= 1e-6
    assert rel_err(again, paged[-1][:1]) <= 1e-6  # the copy recomputes the last token the original ran
    assert pool.stored_dtype(3, torch.float32) == torch.uint8 and pool.stored_dtype(0, torch.float32) == torch.float32
    for layer in range(text.num_layers):
        stored, kind = pool._k[layer], LOCAL if text.layers[layer].chunked else GLOBAL
        width = 8 if kind == LOCAL else 10
        assert stored.shape[-1] == width and stored.dtype == (torch.float32 if kind == LOCAL else torch.uint8)
    blocks = {kind: pool._kinds[kind].capacity for kind in (GLOBAL, LOCAL)}
    measured = {kind: sum(pool._k[i].nbytes + pool._v[i].nbytes for i in pool._kinds[kind].layers) // blocks[kind]
                for kind in (GLOBAL, LOCAL)}
    assert measured[GLOBAL] == pool.block_bytes(GLOBAL) == 2 * 2 * 3 * 2 * 10  # layers x k,v x tokens x heads x bytes
    assert measured[LOCAL] == pool.block_bytes(LOCAL) == 6 * 2 * 3 * 2 * 8 * 4
    pool.trim()
    assert pool.capacity_bytes() == sum(t.nbytes for t in (*pool._k, *pool._v) if t is not None)


# --- the embedded model -----------------------------------------------------------------------------------------

PROMPT, NEW = 300, 400


@pytest.fixture(scope="module")
def embedded():
    """The shipped model in bf16 on its torch layers (a quantized cache makes the fused C decode layer decline, so
    its bf16 baseline runs the same layers), a TinyStories prompt and the bf16 cache's greedy run with its logits."""
    model, tok = llama4.load_model(dtype=torch.bfloat16), llama4.load_tokenizer()
    data = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinystories" / "tinystories_valid_head.txt.gz"
    if not data.is_file():
        pytest.skip(f"needs {data}")
    with gzip.open(data, "rt") as f:
        prompt = tok.encode(f.read(20_000), bos=True)[:PROMPT]
    fused, model.text.fast_decode = model.text.fast_decode, None
    try:
        cache = new_cache(model, "auto")
        with torch.inference_mode():
            logits = [prefill(model, torch.tensor([prompt]), cache)]
            tokens = [int(logits[-1].argmax())]
            for _ in range(NEW - 1):
                logits.append(model(torch.tensor([[tokens[-1]]]), cache=cache)[:, -1])
                tokens.append(int(logits[-1].argmax()))
        yield model, prompt, tokens, torch.cat(logits).float(), cache
    finally:
        model.text.fast_decode = fused


def teacher_forced(model, prompt: list[int], tokens: list[int], fmt: str):
    cache = new_cache(model, fmt)
    seq = torch.tensor([prompt + tokens])
    with torch.inference_mode():
        logits = [prefill(model, seq[:, :len(prompt)], cache)]
        logits += [model(seq[:, t:t + 1], cache=cache)[:, -1] for t in range(len(prompt), seq.shape[1] - 1)]
    return torch.cat(logits).float(), cache


@pytest.mark.parametrize("fmt,mean_tol,max_tol", [("int8", 5e-3, 3e-2), ("fp8", 1e-2, 5e-2)])
def test_embedded_model_long_generation_against_bf16_kv(embedded, fmt, mean_tol, max_tol):
    model, prompt, tokens, reference, bf16_cache = embedded
    logits, cache = teacher_forced(model, prompt, tokens, fmt)
    err = (logits - reference).norm(dim=-1) / reference.norm(dim=-1)
    assert err.mean() <= mean_tol and err.max() <= max_tol
    differ = logits.argmax(-1) != reference.argmax(-1)
    assert differ.float().mean() <= 0.01
    top2 = reference.topk(2, dim=-1).values
    step = 2.0 ** (top2[:, 0].abs().log2().floor() - 7)  # one bf16 step at the top logit
    assert (top2[differ, 0] - top2[differ, 1] <= 2 * step[differ]).all()  # only near-ties flip
    glob, local = model.config.text.global_layers, model.config.text.local_layers
    assert cache.nbytes(glob) * 128 == bf16_cache.nbytes(glob) * 66  # measured: codes + a bf16 scale per entry
    assert cache.nbytes(local) == bf16_cache.nbytes(local)
    if fmt == "int8":
        out = llama4.generate(model, [prompt], max_new_tokens=NEW, stop_tokens=[], kv_cache=fmt)[0][PROMPT:]
        assert out == tokens


@pytest.mark.parametrize("name", ["bf16", "int8", "fp8"])
def test_the_fused_decode_layer_knows_each_storage_by_its_name_and_layout(name):
    """The C decode layer (kernels/cpu/fused_decode.py) reads and writes these entries itself, found by the
    KVStorage's name: its idea of an entry's bytes must be the format's own."""
    fmt = KVFormat(name)
    for head_dim in (32, 64, 128):
        assert _KV_FORMATS[fmt.name][1](head_dim) == fmt.width(head_dim) * fmt.dtype.itemsize == fmt.entry_bytes(
            head_dim)
