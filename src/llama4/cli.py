"""The ``llama4`` command: the only place that reads argv or sets process-wide torch settings."""

from __future__ import annotations

import argparse
import json
import sys

from llama4.checkpoint.io import CheckpointError
from llama4.config import ConfigError


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def cmd_info(args: argparse.Namespace) -> int:
    from llama4.info import model_info

    info = model_info(args.model or args.preset or "scout")
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    note = "  (ASSUMED shape: only the headline figures are published)" if info["assumed"] else ""
    print(f"model: {info['source']}{note}")
    print(f"parameters: {info['total_params']:,} total ({_human(info['total_params'])}), "
          f"{info['active_params']:,} active per token ({_human(info['active_params'])})")
    print(f"  text {info['text_params']:,}  vision+projector {info['vision_params']:,}  "
          f"routed experts {info['routed_expert_params']:,}")
    print(f"experts: {info['num_experts']} routed, top-{info['experts_per_token']} + shared; "
          f"attention chunk {info['attention_chunk_size']}")
    print("weights: " + ", ".join(f"{fmt} {_bytes(b)}" for fmt, b in info["weight_bytes"].items()))
    print("layers:")
    for layer in info["layers"]:
        flags = [layer["attention"] + " attention", "RoPE" if layer["rope"] else "NoPE"]
        if layer["qk_norm"]:
            flags.append("QK-norm")
        if layer["temperature_tuning"]:
            flags.append("temperature tuning")
        flags.append("MoE" if layer["ffn"] == "moe" else "dense FFN")
        print(f"  {layer['index']:3d}: " + ", ".join(flags))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama4", description="Llama 4 in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="layer schedule, parameter counts and weight memory")
    source = info.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory (Hugging Face layout)")
    source.add_argument("--preset", help="scout, maverick, behemoth, tiny or small")
    info.add_argument("--json", action="store_true", help="print the figures as JSON")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"llama4: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
