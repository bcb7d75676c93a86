"""Quality of llama4.quant's recipes on the embedded model: perplexity on held-out text, KL to the float model.

    python bench/quant_quality.py            # writes its table into docs/PERFORMANCE.md
    python bench/quant_quality.py --no-write
    python bench/quant_quality.py --dtype bf16 --windows 16 --recipes int8,int4-g32

The held-out text (TinyStories validation head) is tokenized once and cut into ``--windows`` windows of
``--window`` tokens. The float model and each recipe (applied to a fresh copy of the float model) score every
window: perplexity of the next tokens, mean KL(float || quantized) of the next-token distributions in nats per
token, how often the quantized model's top-1 token is the float model's, and the quantized weights' bytes
(codes, scales, zero points; ``quantized_bytes``).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama4  # noqa: E402
from common import ROOT, markdown_table, write_section  # noqa: E402
from llama4.quant import quantize_model, quantized_bytes  # noqa: E402

RECIPES = ("int8", "int4-g32", "int4-g64", "int4-g128", "int4-g32-asym", "experts=int4-g32,attention=int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_valid_head.txt.gz"


def load_windows(tokenizer, path: Path, windows: int, window: int) -> torch.Tensor:
    """[windows, window] token ids: the text tokenized once, cut into consecutive windows."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer.encode(text)
    if len(ids) < windows * window:
        raise SystemExit(f"{path}: {len(ids)} tokens, fewer than {windows} x {window}")
    return torch.tensor(ids[: windows * window], dtype=torch.long).view(windows, window)


@torch.inference_mode()
def log_probs(model, tokens: torch.Tensor, batch: int) -> torch.Tensor:
    """[windows, window - 1, vocab] float32 log-probs of the next token at each position but the last."""
    out = []
    for i in range(0, tokens.shape[0], batch):
        logits = model(tokens[i: i + batch])[:, :-1].float()
        out.append(torch.log_softmax(logits, -1))
    return torch.cat(out)


def score(lp: torch.Tensor, tokens: torch.Tensor, ref: torch.Tensor | None) -> dict:
    nll = -lp.gather(-1, tokens[:, 1:, None]).mean()
    result = {"ppl": math.exp(float(nll)), "kl": 0.0, "top1": 1.0}
    if ref is not None:
        result["kl"] = float((ref.exp() * (ref - lp)).sum(-1).mean())
        result["top1"] = float((ref.argmax(-1) == lp.argmax(-1)).float().mean())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="held-out text (.txt or .txt.gz)")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--window", type=int, default=256, help="tokens per window")
    parser.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--recipes", default=";".join(RECIPES),
                        help="recipes separated by ';' (a recipe may hold commas)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/PERFORMANCE.md alone")
    args = parser.parse_args()
    recipes = [r.strip() for r in args.recipes.split(";") if r.strip()]

    start = time.perf_counter()
    model = llama4.load_model(None, dtype=DTYPES[args.dtype], pack=False)
    tokens = load_windows(llama4.load_tokenizer(None), args.data, args.windows, args.window)
    ref = log_probs(model, tokens, args.batch)
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    base = score(ref, tokens, None)
    rows = [["float (" + args.dtype + ")", f"{base['ppl']:.3f}", "-", "-", "-", f"{float_bytes / 1e6:.1f} (all)"]]
    print(f"float: ppl {base['ppl']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    for recipe in recipes:
        quantized = quantize_model(copy.deepcopy(model), recipe)
        r = score(log_probs(quantized, tokens, args.batch), tokens, ref)
        rows.append([f"`{recipe}`", f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}%",
                     f"{r['kl']:.5f}", f"{100 * r['top1']:.2f}%", f"{quantized_bytes(quantized) / 1e6:.1f}"])
        print(f"{recipe}: ppl {r['ppl']:.3f}, KL {r['kl']:.5f} ({time.perf_counter() - start:.0f} s)", flush=True)
        del quantized

    table = markdown_table(["recipe", "ppl", "Δppl", "mean KL (nats/token)", "top-1 agreement",
                            "quantized weight MB"], rows)
    command = "python bench/quant_quality.py" + "".join(f" {a}" for a in sys.argv[1:] if a != "--no-write")
    setup = (f"`{command}`: embedded model, {args.dtype}, {args.windows} windows x {args.window} tokens of "
             f"{args.data.name} ({args.windows * (args.window - 1)} scored tokens); "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}. "
             "KL(float || quantized) and top-1 agreement against the float model; quantized weight MB: codes, "
             "scales and zero points of the quantized weights (float row: all parameters).")
    body = f"### Quantization quality\n\n{setup}\n\n{table}\n"
    print()
    print(body)
    if not args.no_write:
        write_section(ROOT / "docs" / "PERFORMANCE.md", "bench-quant-quality", body)


if __name__ == "__main__":
    main()
