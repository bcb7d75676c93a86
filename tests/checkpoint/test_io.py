"""Checkpoint directories: strict loading with specific errors, sharded saving, dtypes, tied embeddings, memory.

Weights are compared bitwise (a save/load round trip must be exact); logits against transformers at
1e-5 relative in fp32.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import llama4
from llama4.build import build_meta
from llama4.checkpoint.io import CheckpointError, load_weights, read_config
from llama4.presets import text_config

REPO = Path(__file__).resolve().parents[2]


def tiny_config(tie: bool = False, vision: bool = False) -> llama4.ModelConfig:
    text = text_config(
        num_layers=4, moe_step=2, vocab_size=67, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
        intermediate_size=24, intermediate_size_mlp=40, num_experts=4, attention_chunk_size=4, floor_scale=3,
        rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0, tie_word_embeddings=tie,
    )
    if not vision:
        return llama4.ModelConfig(text=text)
    from llama4.config import VisionConfig

    v = VisionConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=64, image_size=8, patch_size=4,
                     num_channels=3, norm_eps=1e-5, vision_output_dim=24, pixel_shuffle_ratio=0.5,
                     projector_input_dim=24, projector_output_dim=24, multi_modal_projector_bias=False,
                     rope_theta=10000.0)
    return llama4.ModelConfig(text=text, vision=v, image_token_id=60)


def load_plain(path, dtype=torch.float32):
    """The strict loader itself (no post-load transforms): meta model + load_weights."""
    model = build_meta(read_config(path))
    load_weights(model, path, dtype, "cpu")
    return model


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def assert_same_weights(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        assert torch.equal(pa[name], pb[name]), name


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def model():
    return llama4.random_model(tiny_config(), std=0.1, seed=1)


@pytest.fixture
def saved(model, tmp_path):
    path = tmp_path / "ckpt"
    llama4.save_model(model, path)
    return path


def _rewrite(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------------
# strict loading: every problem named
# ----------------------------------------------------------------------------------------------------


def test_round_trip_is_exact(model, saved):
    assert sorted(os.listdir(saved)) == ["config.json", "model.safetensors"]
    assert_same_weights(load_plain(saved), model)
    ids = torch.randint(0, 67, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(llama4.load_model(saved)(ids), model(ids)) <= 1e-6  # fp32, same weights


def test_missing_tensor(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing:\s+model\.layers\.2\.self_attn\.k_proj\.weight") as e:
        load_plain(saved)
    assert "unexpected" not in str(e.value) and "wrong shape" not in str(e.value)


def test_unexpected_tensor(saved):
    _rewrite(saved, lambda t: t.__setitem__("model.layers.0.self_attn.q_norm.weight", torch.ones(8)))
    with pytest.raises(CheckpointError, match=r"1 unexpected:\s+model\.layers\.0\.self_attn\.q_norm\.weight") as e:
        load_plain(saved)
    assert "missing" not in str(e.value)


def test_wrong_shape_names_both_shapes(saved):
    _rewrite(saved, lambda t: t.__setitem__("model.norm.weight", torch.ones(33)))
    with pytest.raises(CheckpointError, match=r"wrong shape:\s+model\.norm\.weight: checkpoint \[33\], model \[32\]"):
        load_plain(saved)


def test_wrong_shape_alone_is_not_also_reported_missing(saved):
    _rewrite(saved, lambda t: t.__setitem__("model.norm.weight", torch.ones(33)))
    with pytest.raises(CheckpointError) as e:
        load_plain(saved)
    assert "missing" not in str(e.value), str(e.value)


def test_missing_unexpected_and_wrong_shape_in_one_error(saved):
    def edit(t):
        t.pop("model.layers.1.feed_forward.experts.gate_up_proj")
        t["model.layers.9.self_attn.q_proj.weight"] = torch.zeros(32, 32)
        t["lm_head.weight"] = torch.zeros(66, 32)

    _rewrite(saved, edit)
    with pytest.raises(CheckpointError) as e:
        load_plain(saved)
    found = _sections(str(e.value))
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in found["missing"]
    assert found["unexpected"] == ["model.layers.9.self_attn.q_proj.weight"]
    assert found["wrong shape"] == ["lm_head.weight: checkpoint [66, 32], model [67, 32]"]


def _sections(message: str) -> dict[str, list[str]]:
    """Parse the loader's report: '  N label:' headers, each followed by '    item' lines."""
    found: dict[str, list[str]] = {}
    label = None
    for line in message.splitlines()[1:]:
        if line.startswith("    ") and label is not None:
            found[label].append(line.strip())
        elif line.strip().endswith(":"):
            label = line.strip()[:-1].split(" ", 1)[1]
            found[label] = []
    return found


def test_truncated_safetensors(saved):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        load_plain(saved)


@pytest.mark.parametrize("how", ["garbage_json", "huge_length", "tiny_file", "empty_file"])
def test_corrupt_header(saved, how):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    if how == "garbage_json":
        data = data[:8] + b"{garbage" + data[16:]
    elif how == "huge_length":
        data = (2**40).to_bytes(8, "little") + data[8:]
    elif how == "tiny_file":
        data = data[:20]
    else:
        data = b""
    file.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a valid safetensors file"):
        load_plain(saved)


def test_unknown_architecture_in_config(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json.*MistralForCausalLM"):
        llama4.load_model(saved)


def test_invalid_json_config(saved):
    (saved / "config.json").write_text('{"architectures": ["Llama4ForCausalLM"],')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        llama4.load_model(saved)


def test_no_config_json(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        llama4.load_model(saved)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        llama4.load_model(tmp_path / "does-not-exist")


def test_config_without_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        llama4.load_model(saved)


def test_pickle_only_checkpoint_is_refused_without_unpickling(saved, monkeypatch):
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(pickle.dumps({"boom": 1}))

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle loader was called")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*(pickle|safetensors)"):
        llama4.load_model(saved)


def test_index_listing_a_missing_shard(model, tmp_path):
    path = tmp_path / "sharded"
    llama4.save_model(model, path, max_shard_bytes=20_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (path / victim).unlink()
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        load_plain(path)


def test_invalid_index(model, tmp_path):
    path = tmp_path / "sharded"
    llama4.save_model(model, path, max_shard_bytes=20_000)
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="index"):
        load_plain(path)


# ----------------------------------------------------------------------------------------------------
# saving: shards, stale files, dtypes, tied embeddings, transformers compatibility
# ----------------------------------------------------------------------------------------------------


def _weight_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.endswith(".safetensors"))


def test_sharded_save_loads_back_and_in_transformers(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "sharded"
    llama4.save_model(model, path, max_shard_bytes=20_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = _weight_files(path)
    assert len(shards) >= 3 and "model.safetensors" not in shards
    assert sorted(set(index["weight_map"].values())) == shards
    assert all(name.startswith("model-") and name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert index["metadata"]["total_size"] == total
    for shard in shards:  # every shard respects the limit unless it holds a single larger tensor
        with safe_open(path / shard, "pt") as f:
            keys = list(f.keys())
            size = sum(f.get_tensor(k).numel() * 4 for k in keys)
        assert size <= 20_000 or len(keys) == 1, shard
    assert_same_weights(load_plain(path), model)
    hf = transformers.Llama4ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.randint(0, 67, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) <= 1e-5  # fp32 parity through the saved shards


@pytest.mark.parametrize("sequence", [(20_000, 50_000), (50_000, 20_000), (20_000, None), (None, 20_000)])
def test_saving_twice_leaves_no_stale_files(model, tmp_path, sequence):
    path = tmp_path / "twice"
    for limit in sequence:
        llama4.save_model(model, path, max_shard_bytes=limit)
    index_file = path / "model.safetensors.index.json"
    files = _weight_files(path)
    if sequence[-1] is None:
        assert files == ["model.safetensors"] and not index_file.exists()
    else:
        assert sorted(set(json.loads(index_file.read_text())["weight_map"].values())) == files
    assert not [p.name for p in path.iterdir() if p.name.endswith(".tmp")]
    assert_same_weights(load_plain(path), model)


def test_bf16_model_saved_as_bf16(tmp_path):
    model = llama4.random_model(tiny_config(), dtype=torch.bfloat16, std=0.1, seed=2)
    llama4.save_model(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert_same_weights(load_plain(tmp_path, torch.bfloat16), model)


def test_load_fp32_checkpoint_as_bf16(model, saved):
    loaded = load_plain(saved, torch.bfloat16)
    for name, p in params(loaded).items():
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p, params(model)[name].to(torch.bfloat16)), name  # one rounding, exact
    public = llama4.load_model(saved, dtype=torch.bfloat16)
    ids = torch.randint(0, 67, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = public(ids)
        ref = model(ids)
    assert out.dtype == torch.float32  # logits are returned in float32
    assert rel_err(out, ref) <= 3e-2  # bf16 weights and activations vs fp32


def test_tied_embeddings_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = llama4.random_model(tiny_config(tie=True), std=0.1, seed=3)
    assert model.text.output is None
    llama4.save_model(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True
    loaded = load_plain(tmp_path)
    assert loaded.config.text.tie_word_embeddings and loaded.text.output is None
    assert_same_weights(loaded, model)
    hf = transformers.Llama4ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    ids = torch.randint(0, 67, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(llama4.load_model(tmp_path)(ids), hf(ids).logits) <= 1e-5


def test_tied_checkpoint_that_also_stores_lm_head_loads(tmp_path):
    """transformers may write the tied lm_head too; it is the embedding, so it is accepted and ignored."""
    model = llama4.random_model(tiny_config(tie=True), std=0.1, seed=4)
    llama4.save_model(model, tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    assert_same_weights(load_plain(tmp_path), model)


def test_multimodal_round_trip_names(tmp_path):
    model = llama4.random_model(tiny_config(vision=True), std=0.1, seed=5)
    llama4.save_model(model, tmp_path, max_shard_bytes=30_000)
    names = set()
    for shard in _weight_files(tmp_path):
        with safe_open(tmp_path / shard, "pt") as f:
            names |= set(f.keys())
    assert "language_model.model.embed_tokens.weight" in names
    assert "language_model.lm_head.weight" in names
    assert "vision_model.patch_embedding.linear.weight" in names
    assert "multi_modal_projector.linear_1.weight" in names
    assert not any(n.startswith("model.") or n.startswith("text.") for n in names)
    assert_same_weights(load_plain(tmp_path), model)


# ----------------------------------------------------------------------------------------------------
# peak memory of loading a ~110 MB fp32 checkpoint as bf16, measured in a fresh process
# ----------------------------------------------------------------------------------------------------

_MEASURE = textwrap.dedent(
    """
    import json, sys, threading, time
    import torch, llama4
    from llama4.build import build_meta
    from llama4.checkpoint.io import load_weights, read_config

    torch.set_num_threads(1)
    path, mode = sys.argv[1], sys.argv[2]

    def status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    # warm up torch's one-time allocations (~70 MB) so they are not charged to the loader
    expected = 2 * sum(p.numel() for p in build_meta(read_config(path)).parameters())
    torch.ones(8) @ torch.ones(8)
    base = status()
    peak = dict(base)
    done = False

    def sample():
        while not done:
            s = status()
            for k in ("VmRSS", "RssAnon"):
                peak[k] = max(peak[k], s[k])
            time.sleep(0.0002)

    thread = threading.Thread(target=sample)
    thread.start()
    if mode == "loader":
        model = build_meta(read_config(path))
        load_weights(model, path, torch.bfloat16, "cpu")
    else:
        model = llama4.load_model(path, dtype=torch.bfloat16)
    done = True
    thread.join()
    end = status()
    for k in ("VmRSS", "RssAnon"):
        peak[k] = max(peak[k], end[k])
    print(json.dumps({"bf16_bytes": expected, "anon_peak": peak["RssAnon"] - base["RssAnon"],
                      "rss_peak": max(peak["VmRSS"], end["VmHWM"]) - base["VmRSS"],
                      "anon_end": end["RssAnon"] - base["RssAnon"]}))
    """
)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """~116 MB fp32 (30.4M parameters); the largest tensor is 8 MB, so one tensor in flight is small."""
    cfg = llama4.ModelConfig(text=text_config(
        num_layers=8, vocab_size=1000, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
        intermediate_size=512, intermediate_size_mlp=1024, num_experts=8, attention_chunk_size=64,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=0))
    model = build_meta(cfg)
    for i, (name, p) in enumerate(list(model.named_parameters())):
        module, _, attr = name.rpartition(".")
        model.get_submodule(module)._parameters[attr] = torch.nn.Parameter(
            torch.full(p.shape, 0.01 * (i % 7 + 1)), requires_grad=False)
    path = tmp_path_factory.mktemp("big")
    llama4.save_model(model, path)
    size = (path / "model.safetensors").stat().st_size
    assert 100e6 < size < 130e6
    return path, size


def _measure(path: Path, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), mode], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loader_peak_memory_fp32_checkpoint_as_bf16(big_checkpoint):
    """The loader's own memory (anonymous RSS) peaks at <= 1.6x the bf16 model; total RSS additionally
    counts the checkpoint's memory-mapped (file-backed, reclaimable) pages, bounded by the file size."""
    path, file_size = big_checkpoint
    m = _measure(path, "loader")
    bf16 = m["bf16_bytes"]
    assert m["anon_peak"] <= 1.6 * bf16, (m["anon_peak"] / bf16, m)
    assert m["rss_peak"] <= 1.6 * bf16 + file_size, (m["rss_peak"] / bf16, m)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_load_model_peak_memory_fp32_checkpoint_as_bf16(big_checkpoint):
    path, file_size = big_checkpoint
    m = _measure(path, "load_model")
    bf16 = m["bf16_bytes"]
    assert m["anon_peak"] <= 1.6 * bf16, (m["anon_peak"] / bf16, m)
