import argparse
import json
from pathlib import Path

import pytest

from llama4.checkpoint.hf_config import model_config_to_hf
from llama4.train.command import add_train_parser

from .conftest import tiny_config

DATA = Path("/work/shared/data")


def parse(argv):
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_parser_defaults():
    args = parse(["train", "--out", "x", "--steps", "5", "--bf16"])
    assert args.steps == 5 and args.bf16 and args.data == "tinystories" and not args.resume


@pytest.mark.skipif(not (DATA / "tinystories").is_dir(), reason="shared data folder not present")
def test_train_command_end_to_end(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(model_config_to_hf(tiny_config())))
    args = parse(["train", "--config", str(cfg), "--vocab", "300", "--data-dir", str(DATA), "--limit", "40",
                  "--steps", "3", "--min-lr", "1e-4", "--batch-size", "2", "--seq-len", "32", "--eval-every", "3",
                  "--warmup", "1",
                  "--out", str(tmp_path / "run")])
    assert args.func(args) == 0
    run = tmp_path / "run"
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "tokenizer.model").is_file()
    assert (run / "loss.png").is_file() and (run / "checkpoint" / "state.json").is_file()
    out = capsys.readouterr().out
    assert "expert token shares" in out and "eval loss" in out
    import llama4

    model = llama4.load_model(run / "model", pack=False)
    assert model.config.text.vocab_size == llama4.load_tokenizer(run / "model").vocab_size
