"""The ``llama4`` command line: ``info`` output, JSON mode, exit codes and error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llama4
import llama4.info as llama4_info
from llama4.cli import main
from llama4.presets import text_config

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the installed ``llama4`` entry point (or ``python -m llama4.cli`` if it is not installed)."""
    exe = Path(sys.executable).parent / "llama4"
    cmd = [str(exe), *args] if exe.exists() else [sys.executable, "-m", "llama4.cli", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_info_preset_scout_subprocess():
    out = run_cli("info", "--preset", "scout")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "108,641,793,536 total" in text
    assert "17,172,894,720 active" in text
    assert "16 routed, top-1 + shared" in text
    indices = [int(line.split(":")[0]) for line in text.split("layers:\n", 1)[1].splitlines()]
    assert indices == list(range(48))
    assert "  0: chunked attention, RoPE, QK-norm, MoE" in text
    assert "  3: global attention, NoPE, temperature tuning, MoE" in text
    assert " 47: global attention, NoPE, temperature tuning, MoE" in text


def test_info_preset_maverick(capsys):
    assert main(["info", "--preset", "maverick"]) == 0
    text = capsys.readouterr().out
    assert "401,583,781,376 total" in text and "17,184,691,200 active" in text
    assert "  0: chunked attention, RoPE, dense FFN" in text
    assert "  1: chunked attention, RoPE, MoE" in text
    assert "  3: global attention, NoPE, temperature tuning, MoE" in text
    assert "QK-norm" not in text


def test_info_json_parses(capsys):
    assert main(["info", "--preset", "scout", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] == 108_641_793_536
    assert info["active_params"] == 17_172_894_720
    assert len(info["layers"]) == 48 and info["layers"][3]["attention"] == "global"


def test_info_default_is_the_embedded_model(capsys, monkeypatch):
    from llama4.build import EMBEDDED_DIR

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] == llama4_info.model_info(EMBEDDED_DIR)["total_params"] < 25_000_000
    monkeypatch.setattr("llama4.build.EMBEDDED_DIR", EMBEDDED_DIR / "missing")  # no embedded model: Scout
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == 108_641_793_536


def test_info_behemoth_says_assumed(capsys):
    assert main(["info", "--preset", "behemoth"]) == 0
    assert "ASSUMED" in capsys.readouterr().out


def test_info_on_a_checkpoint(tmp_path, capsys):
    cfg = llama4.ModelConfig(text=text_config(
        num_layers=4, vocab_size=50, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=12,
        intermediate_size_mlp=20, num_experts=2, attention_chunk_size=4, bos_token_id=1, eos_token_ids=(2,),
        pad_token_id=0))
    model = llama4.random_model(cfg)
    llama4.save_model(model, tmp_path)
    assert main(["info", "--model", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] == sum(p.numel() for p in model.parameters())


def test_unknown_preset_exit_code_2_subprocess():
    out = run_cli("info", "--preset", "llama5-ultra")
    assert out.returncode == 2
    assert out.stderr.startswith("llama4: error:") and "llama5-ultra" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_preset_message_names_the_presets(capsys):
    assert main(["info", "--preset", "llama5-ultra"]) == 2
    err = capsys.readouterr().err
    assert "preset" in err and "scout" in err and "maverick" in err, err


def test_missing_checkpoint_exit_code_2(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path / "nothing")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_preset_and_model_are_mutually_exclusive(capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", "--preset", "scout", "--model", "x"])
    assert e.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_no_subcommand_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_info_memory_plan(capsys):
    assert main(["info", "--preset", "scout", "--quant", "int4", "--memory", "80GiB"]) == 0
    text = capsys.readouterr().out
    assert "memory plan: weights experts=int4-g32,shared=int4-g32,attention=int4-g32" in text
    assert "    experts     int4-g32" in text and "in 80.0 GiB: largest context" in text
    assert main(["info", "--preset", "scout", "--quant", "experts=int4-g32,attention=int8", "--memory", "24GiB"]) == 0
    assert "does not fit: weights alone need 75.8 GiB" in capsys.readouterr().out


def test_info_memory_plan_json(capsys):
    from llama4.info import memory_plan

    assert main(["info", "--preset", "scout", "--quant", "int8", "--kv", "fp32", "--context", "4096",
                 "--memory", "24GB", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    expected = json.loads(json.dumps(memory_plan(llama4.preset("scout"), "int8", "fp32", 4096, 24 * 10**9)))
    assert info["memory"] == expected and info["memory"]["fits"] is False
    assert info["memory"]["kv_cache"]["context"] == 4096
    assert main(["info", "--preset", "scout", "--json"]) == 0
    assert "memory" not in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("args,message", [(["--memory", "80 gigs"], "memory size"),
                                          (["--quant", "int3"], "unknown weight format"),
                                          (["--quant", "mlp=int8"], "unknown kind")])
def test_info_memory_plan_errors(args, message, capsys):
    assert main(["info", "--preset", "scout", *args]) == 2
    assert message in capsys.readouterr().err


def test_info_plans_quantized_kv_caches(capsys):
    """--kv int8 / fp8: the global layers quantized (codes + a bf16 scale per token and KV head), chunked bf16."""
    from llama4.info import memory_plan

    for kv in ("int8", "fp8"):
        assert main(["info", "--preset", "scout", "--kv", kv, "--context", "100000", "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)["memory"]
        assert plan == json.loads(json.dumps(memory_plan(llama4.preset("scout"), None, kv, 100_000)))
        assert plan["kv_cache"]["bytes_per_token_global"] == 12 * 8 * (128 + 2) * 2  # 25 KiB; bf16: 48 KiB
    assert main(["info", "--preset", "scout", "--kv", "int8", "--context", "1000"]) == 0
    assert "KV cache int8 (global layers; chunked layers bf16)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["info", "--kv", "int4"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_quantize_writes_a_complete_checkpoint(tmp_path, capsys):
    """`llama4 quantize` of the embedded model: compressed-tensors weights beside the tokenizer and generation
    files; the result loads, generates, and cannot be quantized again or written over its source."""
    from llama4.build import EMBEDDED_DIR

    out = tmp_path / "int4"
    assert main(["quantize", "--out", str(out), "--recipe", "experts=int4-g32,attention=int8", "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "experts    int4-g32" in printed and f"wrote {out}" in printed
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (EMBEDDED_DIR / name).read_bytes()
    model = llama4.load_model(out, pack=False)
    assert str(llama4.quant.quantized_with(model)) == "experts=int4-g32,attention=int8"
    assert main(["generate", "--model", str(out), "--raw", "--max-tokens", "3", "--quiet", "Once upon a time"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["quantize", "--model", str(out), "--out", str(tmp_path / "again"), "--recipe", "int8"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", "--model", str(out), "--out", str(out), "--recipe", "int8"]) == 2
    assert "is the checkpoint being quantized" in capsys.readouterr().err


def test_quant_option_quantizes_at_load(capsys):
    assert main(["generate", "--quant", "int8", "--raw", "--max-tokens", "3", "--quiet", "Once upon a time"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", "--quant", "int3", "--raw", "--max-tokens", "3", "Once"]) == 2
    assert "unknown weight format 'int3'" in capsys.readouterr().err
