"""Long prompts: 64+ chunks prefilled in pieces with memory bounded by the piece, not the prompt."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, torch, llama4
    from llama4.inference.generate import prefill
    from llama4.presets import text_config
    torch.set_num_threads(1)
    chunk, chunks, piece = 32, 96, 256
    cfg = text_config(num_layers=4, vocab_size=128, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=64, num_experts=4, attention_chunk_size=chunk)
    model = llama4.random_model(llama4.ModelConfig(text=cfg), seed=0)
    ids = torch.randint(0, 128, (1, chunk * chunks), generator=torch.Generator().manual_seed(0))

    def hwm():
        return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024

    with torch.inference_mode():  # warm up the kernels on a short prompt first
        prefill(model, ids[:, :piece], llama4.KVCache(cfg), chunk=piece)
        before = hwm()
        cache = llama4.KVCache(cfg)
        last = prefill(model, ids, cache, chunk=piece)
        growth = hwm() - before
        full = model(ids, num_logits=1)[:, -1] if len(sys.argv) > 1 else None
    out = {"growth": growth, "kv": cache.nbytes(), "seq": cache.seq_len,
           "local": [cache._len[i][0] for i in cfg.local_layers]}
    if full is not None:
        out["err"] = ((last - full).norm() / full.norm()).item()
    print(json.dumps(out))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_prefill_of_96_chunks_in_pieces_is_exact_and_memory_bounded():
    out = subprocess.run([sys.executable, "-c", SCRIPT, "check"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["seq"] == 32 * 96
    assert result["err"] <= 1e-5  # piecewise prefill equals one full forward (fp32)
    assert all(n <= 32 for n in result["local"])  # chunked layers keep at most one chunk
    # KV: the one global layer holds 3072 tokens x 2 KV heads x 16 x (k, v) x 4 bytes = 768 KiB; the
    # activations of a 256-token piece are a few MB. Peak growth stays far below what the whole
    # 3072-token prompt would need at once with a T x T score matrix (3072^2 x 4 heads x 4 B = 144 MiB).
    assert result["kv"] < 2 * 2**20
    assert result["growth"] < 64 * 2**20, result
