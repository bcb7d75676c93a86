"""GPTQ calibration (llama4.quant.gptq).

* the blocked Cholesky implementation against a straightforward re-derivation in float64 (column by column, the
  inverse Hessian of the remaining columns updated explicitly, as the optimal brain surgeon update is written):
  identical codes, scales and zero points in float64, every format, several block sizes; in float32 the layer's
  output error within 1 % of the float64 one;
* with H = I (no correlation between inputs) GPTQ is round to nearest, bit for bit: the same layout as quantize();
* codes stay in their range when the compensation pushes weights past their group's range (clipped);
* on correlated inputs, GPTQ's output error ||X W^T - X Ŵ^T|| is below round to nearest's (linear and whole model);
* a calibrated model saves and loads back bit for bit (the compressed-tensors checkpoint), and `llama4 quantize
  --calibrate gptq` writes one;
* routed experts: each from its own tokens, the score-scaled rows it multiplies; too few tokens: round to nearest.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import llama4
from llama4.cli import main
from llama4.model.moe import MoE, sort_by_expert
from llama4.presets import text_config
from llama4.quant import QuantizedExperts, QuantizedLinear, quantize_model, quantized_with
from llama4.quant.formats import WeightFormat, dequantize, quantize, unpack_int4
from llama4.quant.gptq import (
    PERCDAMP,
    Hessian,
    calibration_windows,
    gptq_quantize,
    gptq_quantize_model,
    token_windows,
)

FORMATS = ["int8", "int4-g32", "int4-g64", "int4-g128", "int4-g32-asym", "int4-g128-asym"]
VOCAB = 97


def correlated_inputs(n: int, width: int, rank: int = 16, seed: int = 0) -> torch.Tensor:
    """Rows of a low-rank signal plus a little noise, with a few large channels (as real activations have)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, width, generator=g) + 0.1 * torch.randn(n, width,
                                                                                                      generator=g)
    return x * (1 + 4 * (torch.rand(width, generator=g) < 0.05))


def reference_gptq(weight: torch.Tensor, hessian: torch.Tensor, fmt: WeightFormat, scale_dtype: torch.dtype,
                   percdamp: float = PERCDAMP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ as the paper derives it, float64, unoptimised: columns left to right; after column j is rounded, the
    remaining columns move by -err * Hinv[j, k] / Hinv[j, j] and Hinv becomes the inverse Hessian of the remaining
    columns (Hinv - Hinv[:, j] Hinv[j, :] / Hinv[j, j]). A group's scale from its weights when it is reached.
    Returns (codes as integers q [out, in] with w ~ (q - zero) * scale, scale [out, groups], zero or None)."""
    w = weight.double().clone()
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, :], h[:, dead] = 0, 0
    h[dead, dead] = 1
    h += percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    out, width = w.shape
    group = fmt.group or width
    qmax = 2 ** (fmt.bits - 1) - 1
    codes = torch.zeros(out, width, dtype=torch.float64)
    scales = torch.zeros(out, width // group, dtype=torch.float64)
    zeros = torch.zeros(out, width // group, dtype=torch.float64)

    def stored(scale: torch.Tensor) -> torch.Tensor:  # rounded up to the storage dtype
        s = scale.to(scale_dtype)
        s = torch.where(s.double() < scale, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
        return s.double()

    for j in range(width):
        if j % group == 0:
            part = w[:, j:j + group]
            if fmt.symmetric:
                scale, zero = stored(part.abs().amax(1) / qmax), torch.zeros(out, dtype=torch.float64)
            else:
                low, high = part.amin(1).clamp(max=0), part.amax(1).clamp(min=0)
                scale = stored((high - low) / 15)
                zero = torch.round(-low / torch.where(scale == 0, 1, scale)).clamp(0, 15)
            scales[:, j // group], zeros[:, j // group] = scale, zero
        lo, hi = (-qmax, qmax) if fmt.symmetric else (0, 15)
        q = (torch.round(w[:, j] / torch.where(scale == 0, 1, scale)) + zero).clamp(lo, hi)
        codes[:, j] = q
        err = (w[:, j] - (q - zero) * scale) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return codes, scales, None if fmt.symmetric else zeros


def integer_codes(tensor) -> torch.Tensor:
    """The stored codes as the integers q of w ~ (q - zero) * scale (int4 symmetric: nibble - 8)."""
    if tensor.format.bits == 8:
        return tensor.codes.double()
    nibbles = unpack_int4(tensor.codes).double()
    return nibbles - 8 if tensor.format.symmetric else nibbles


def output_error(x: torch.Tensor, weight: torch.Tensor, tensor) -> float:
    return float((x.double() @ (weight.double() - dequantize(tensor, torch.float64)).t()).norm())


@pytest.mark.parametrize("name", FORMATS)
def test_matches_the_float64_rederivation(name):
    fmt = WeightFormat.parse(name)
    width = 256
    x = correlated_inputs(2048, width)
    x[:, 7] = 0  # a dead input
    weight = torch.randn(48, width, generator=torch.Generator().manual_seed(1)) * 0.02
    hessian = x.t() @ x
    ref_codes, ref_scale, ref_zero = reference_gptq(weight, hessian, fmt, torch.float32)
    for block in (32, 128, 1000):
        got = gptq_quantize(weight, hessian, fmt, block=block, dtype=torch.float64)
        assert torch.equal(integer_codes(got), ref_codes), (name, block)
        assert torch.equal(got.scale.double(), ref_scale)
        if ref_zero is not None:
            assert torch.equal(got.zero.double(), ref_zero)
    # float32 updates (the default): the output error within 1 % of float64's
    exact = output_error(x, weight, gptq_quantize(weight, hessian, fmt, dtype=torch.float64))
    assert abs(output_error(x, weight, gptq_quantize(weight, hessian, fmt)) - exact) <= 0.01 * exact


def test_dead_inputs_are_rounded_to_nearest_and_kept():
    """An input no calibration token reaches keeps its weights (rounded to nearest, not zeroed)."""
    x = correlated_inputs(512, 64)
    x[:, 3] = 0
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    got = gptq_quantize(weight, x.t() @ x, WeightFormat.parse("int8"))
    rtn = quantize(weight, WeightFormat.parse("int8"))
    assert torch.equal(got.codes[:, 3], rtn.codes[:, 3]) and got.codes[:, 3].abs().sum() > 0


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_identity_hessian_is_round_to_nearest_bit_for_bit(name, scale_dtype):
    fmt = WeightFormat.parse(name)
    weight = torch.randn(3, 40, 128, generator=torch.Generator().manual_seed(3))[1]
    weight[5, :32] = 0  # a group of zeros: scale 0
    got, rtn = gptq_quantize(weight, 2 * torch.eye(128), fmt, scale_dtype), quantize(weight, fmt, scale_dtype)
    assert got.format == rtn.format and got.codes.dtype == rtn.codes.dtype and got.scale.dtype == rtn.scale.dtype
    assert torch.equal(got.codes, rtn.codes) and torch.equal(got.scale, rtn.scale)
    assert (got.zero is None) == (rtn.zero is None) and (got.zero is None or torch.equal(got.zero, rtn.zero))


@pytest.mark.parametrize("name", FORMATS)
def test_codes_stay_in_range(name):
    """Outliers and strongly correlated inputs make the compensation push weights past their group's range: the
    codes are clipped, the layout is quantize()'s."""
    fmt = WeightFormat.parse(name)
    x = correlated_inputs(1024, 128, rank=4)
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(4))
    weight[::5, ::7] *= 20
    got = gptq_quantize(weight, x.t() @ x, fmt, percdamp=1e-4)
    rtn = quantize(weight, fmt)
    assert got.codes.shape == rtn.codes.shape and got.scale.shape == rtn.scale.shape
    q = integer_codes(got)
    if fmt.bits == 8:
        assert q.abs().max() <= 127
    elif fmt.symmetric:
        assert q.min() >= -7 and q.max() <= 7
    else:
        assert q.min() >= 0 and q.max() <= 15 and got.zero.dtype == torch.uint8 and int(got.zero.max()) <= 15
    assert torch.isfinite(dequantize(got)).all()


@pytest.mark.parametrize("name", ["int8", "int4-g32", "int4-g128-asym"])
def test_lower_output_error_than_round_to_nearest_on_correlated_inputs(name):
    fmt = WeightFormat.parse(name)
    x, held_out = correlated_inputs(8192, 256, seed=5).split(4096)  # calibration and held-out rows, one distribution
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(6)) * 0.05
    hessian = Hessian(256)
    for rows in x.split(1000):
        hessian.add(rows)
    assert hessian.count == 4096
    gptq, rtn = gptq_quantize(weight, hessian.sum, fmt), quantize(weight, fmt)
    assert output_error(held_out, weight, gptq) < 0.5 * output_error(held_out, weight, rtn)


def test_refusals():
    w, h = torch.randn(8, 64), torch.eye(64)
    with pytest.raises(ValueError, match="not nf4-g64"):
        gptq_quantize(w, h, WeightFormat.parse("nf4"))
    with pytest.raises(ValueError, match=r"Hessian of a weight \(8, 64\) is \[64, 64\]"):
        gptq_quantize(w, torch.eye(32), WeightFormat.parse("int8"))
    with pytest.raises(ValueError, match="multiple of 128"):
        gptq_quantize(w, h, WeightFormat.parse("int4-g128"))
    with pytest.raises(ValueError, match="inf or nan"):
        gptq_quantize(w, h * float("nan"), WeightFormat.parse("int8"))
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows([1, 2, 3], 64, 8)
    with pytest.raises(ValueError, match="do not fill one window"):
        token_windows(list(range(100)), 4, 8)


# -- whole models --------------------------------------------------------------------------------------------------


def config() -> llama4.ModelConfig:
    """Layers 0 and 2 dense, 1 and 3 MoE (top-1 of 4 experts); widths multiples of 128."""
    text = text_config(num_layers=4, moe_step=2, vocab_size=VOCAB, hidden_size=128, num_heads=4, num_kv_heads=2,
                       head_dim=32, intermediate_size=128, intermediate_size_mlp=256, num_experts=4,
                       attention_chunk_size=16, floor_scale=8, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
                       tie_word_embeddings=False)
    return llama4.ModelConfig(text=text)


@pytest.fixture(scope="module")
def correlated_model() -> nn.Module:
    """A random model whose token embeddings are low rank plus noise: every layer's inputs are correlated."""
    model = llama4.random_model(config(), seed=0, dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    embed = model.text.embed.weight
    embed.data = (torch.randn(VOCAB, 8, generator=g) @ torch.randn(8, 128, generator=g)
                  + 0.05 * torch.randn(VOCAB, 128, generator=g))
    return model.eval()


def tokens(rows: int, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def logits_error(model, quantized, ids) -> float:
    with torch.no_grad():
        ref, got = model(ids), quantized(ids)
    return float((got - ref).norm() / ref.norm())


@pytest.mark.parametrize("recipe", ["int4-g32,head=int8", "int4-g128-asym,head=int4-g32"])
def test_model_output_error_below_round_to_nearest(correlated_model, recipe):
    calibrated = gptq_quantize_model(copy.deepcopy(correlated_model), recipe, tokens(32))
    rtn = quantize_model(copy.deepcopy(correlated_model), recipe)
    assert str(quantized_with(calibrated)) == str(quantized_with(rtn))
    assert [type(m) for m in calibrated.modules()] == [type(m) for m in rtn.modules()]
    held_out = tokens(8, seed=1)
    assert logits_error(correlated_model, calibrated, held_out) < 0.8 * logits_error(correlated_model, rtn, held_out)


def test_experts_calibrate_on_their_own_score_scaled_tokens(correlated_model):
    """A routed expert's gate_up Hessian is built from exactly the rows model/moe.py multiplies it by: the tokens
    routed to it, times their router scores; its codes are GPTQ's on that Hessian."""
    model = copy.deepcopy(correlated_model)
    ids = tokens(4)
    moe = model.text.layers[1].ffn
    assert isinstance(moe, MoE)
    seen = []
    handle = moe.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, 128)))
    with torch.no_grad():
        model(ids)
    handle.remove()
    flat = seen[0]
    expert_ids, scores = llama4.model.moe.route(moe.router(flat), moe.top_k, flat.dtype)
    _, scaled, counts = sort_by_expert(flat, expert_ids, scores, moe.experts.num_experts)
    fmt = WeightFormat.parse("int4-g32")
    # experts only: everything before layer 1's experts stays float, so their inputs are the float model's
    calibrated = gptq_quantize_model(copy.deepcopy(correlated_model), "experts=int4-g32", ids, min_expert_tokens=1)
    experts = calibrated.text.layers[1].ffn.experts
    assert isinstance(experts, QuantizedExperts)
    rows = scaled.split(counts)
    for e in range(4):
        if counts[e] == 0:
            continue
        expected = gptq_quantize(moe.experts.gate_up[e].t(), rows[e].t() @ rows[e], fmt)
        assert torch.equal(experts.gate_up.codes[e], expected.codes), e
        assert torch.allclose(experts.gate_up.scale[e], expected.scale, rtol=1e-6)


def test_experts_with_too_few_tokens_round_to_nearest(correlated_model):
    said = []
    calibrated = gptq_quantize_model(copy.deepcopy(correlated_model), "experts=int4-g32", tokens(2, 8),
                                     min_expert_tokens=10**6, progress=said.append)
    rtn = quantize_model(copy.deepcopy(correlated_model), "experts=int4-g32")
    for i in (1, 3):
        got, want = calibrated.text.layers[i].ffn.experts, rtn.text.layers[i].ffn.experts
        assert torch.equal(got.gate_up.codes, want.gate_up.codes) and torch.equal(got.down.codes, want.down.codes)
    assert sum("round to nearest" in line for line in said) == 2 * 2 * 4  # 2 layers, gate_up and down, 4 experts


def test_calibrated_checkpoint_loads_back_bit_for_bit(correlated_model, tmp_path):
    model = gptq_quantize_model(copy.deepcopy(correlated_model), "experts=int4-g32-asym,attention=int8,head=int8,"
                                "shared=int4-g64", tokens(8))
    assert isinstance(model.text.output, QuantizedLinear) and isinstance(model.text.layers[0].attn.wo, QuantizedLinear)
    llama4.save_model(model, tmp_path)
    back = llama4.load_model(tmp_path, pack=False)
    assert str(quantized_with(back)) == str(quantized_with(model))
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        assert torch.equal(back(tokens(2)), model(tokens(2)))


def test_model_refusals(correlated_model):
    model = copy.deepcopy(correlated_model)
    with pytest.raises(ValueError, match="GPTQ calibrates int8 and int4 formats, not nf4-g64"):
        gptq_quantize_model(model, "nf4", tokens(2))
    with pytest.raises(ValueError, match="calibration token ids"):
        gptq_quantize_model(model, "int8", torch.full((2, 8), VOCAB + 5))
    with pytest.raises(ValueError, match=r"integer tensors \[batch, tokens\]"):
        gptq_quantize_model(model, "int8", torch.zeros(2, 8))
    with pytest.raises(ValueError, match="got none"):
        gptq_quantize_model(model, "int8", [])
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # refused before any swap
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        gptq_quantize_model(model, "int8", tokens(2))


def test_calibration_windows_read_text_and_jsonl(tmp_path):
    tok = llama4.load_tokenizer(None)
    stories = ["Once upon a time there was a cat.", "The dog ran to the park and played all day."] * 20
    jsonl = tmp_path / "stories.jsonl"
    jsonl.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    windows = calibration_windows(jsonl, tok, 64, 16, separator=tok.end_of_text_id)
    assert windows.shape == (4, 16)
    expected = tok.encode(stories[0]) + [tok.end_of_text_id] + tok.encode(stories[1])
    assert windows.flatten()[:len(expected)].tolist() == expected
    txt = tmp_path / "stories.txt"
    txt.write_text(" ".join(stories))
    assert calibration_windows(txt, tok, 64, 16).flatten().tolist() == tok.encode(" ".join(stories))[:64]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"story": "no text field"}\n')
    with pytest.raises(ValueError, match='line 1: not a JSON object with a "text" string'):
        calibration_windows(bad, tok, 64, 16)
    with pytest.raises(FileNotFoundError, match="calibration text .* not found"):
        calibration_windows(tmp_path / "missing.txt", tok, 64, 16)
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match="expected a .txt"):
        calibration_windows(csv, tok, 64, 16)


def test_quantize_command_calibrates(tmp_path, capsys):
    """`llama4 quantize --calibrate gptq` on the embedded model: a checkpoint in the usual layout, which loads."""
    data = tmp_path / "calibration.jsonl"
    data.write_text("".join(json.dumps({"text": f"Story {i}: a little girl named Lily found a red ball in the "
                                        f"park and played with her dog."}) + "\n" for i in range(40)))
    out = tmp_path / "gptq"
    assert main(["quantize", "--out", str(out), "--recipe", "int4-g32-asym,head=int8", "--dtype", "fp32",
                 "--calibrate", "gptq", "--calibration-data", str(data), "--calibration-tokens", "512",
                 "--calibration-length", "128"]) == 0
    printed = capsys.readouterr().out
    assert "GPTQ calibration: 4 windows of 128 tokens" in printed and f"wrote {out}" in printed
    model = llama4.load_model(out, pack=False)
    assert str(quantized_with(model)) == "experts=int4-g32-asym,shared=int4-g32-asym,attention=int4-g32-asym,head=int8"
    assert main(["quantize", "--out", str(tmp_path / "x"), "--recipe", "int8", "--calibration-tokens", "512"]) == 2
    assert "--calibration-tokens only apply with --calibrate gptq" in capsys.readouterr().err
    assert main(["quantize", "--out", str(tmp_path / "x"), "--recipe", "int8", "--calibrate", "gptq",
                 "--calibration-data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl not found" in capsys.readouterr().err
    assert main(["quantize", "--out", str(tmp_path / "x"), "--recipe", "nf4", "--calibrate", "gptq",
                 "--calibration-data", str(data), "--calibration-tokens", "128", "--calibration-length", "64"]) == 2
    assert "not nf4-g64" in capsys.readouterr().err
