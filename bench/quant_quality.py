"""Quality of llama4.quant's recipes on the embedded model: perplexity on held-out text, KL to the float model.

    python bench/quant_quality.py            # writes its table into docs/PERFORMANCE.md
    python bench/quant_quality.py --no-write
    python bench/quant_quality.py --dtype bf16 --windows 16 --recipes int8,int4-g32
    python bench/quant_quality.py --llamacpp /work/llamacpp --no-write   # + llama.cpp's Q8_0 and Q4_K_M rows
    python bench/quant_quality.py --kernel     # + each recipe in bf16 on this CPU's kernels (what generate runs)
    python bench/quant_quality.py --calibrate gptq --no-write   # + each recipe's GPTQ-calibrated codes

The held-out text (TinyStories validation head) is tokenized once and cut into ``--windows`` windows of
``--window`` tokens. The float model and each recipe (applied to a fresh copy of the float model) score every
window: perplexity of the next tokens, mean KL(float || quantized) of the next-token distributions in nats per
token, how often the quantized model's top-1 token is the float model's, and the quantized weights' bytes
(codes, scales, zero points; ``quantized_bytes``). Those rows compute on llama4.quant's reference modules
(dequantize, then the float product). ``--kernel`` adds each recipe as the commands run it: the model in bf16,
packed for this CPU's kernels (``kernels.cpu.pack``; the int4 products quantize each row's 32-input blocks to
int8 on the way, csrc/quant_linear.c), and the float model in bf16 packed the same way for scale.

``--calibrate gptq`` adds each recipe with GPTQ codes (llama4.quant.gptq), calibrated on ``--calibration-tokens``
tokens of the TinyStories *train* split (``--calibration-data``; never the held-out text scored here) in windows of
``--calibration-length``, as ``llama4 quantize --calibrate gptq`` does; with ``--kernel`` also in bf16 on the
kernels (calibrated on the bf16 model, as the command quantizes a bf16 checkpoint).

``--llamacpp DIR`` (a llama.cpp build laid out as bench/llamacpp_gguf.py says; benchmark-only, never a
dependency) adds llama.cpp's quantizations of the same checkpoint as rows of the same table, scored the way
llama-perplexity scores them, and switches our rows to that scoring too, so that every row sees the same tokens:

- the checkpoint is converted by llama.cpp's convert_hf_to_gguf.py to the base type matching ``--dtype`` (f32
  for fp32: the bf16 checkpoint's values exactly, computed in f32 as our fp32 reference is; bf16 for bf16), its
  hyper-parameters checked against config.json, and quantized by llama-quantize to each ``--llamacpp-types``
  variant (``TYPE:float-ends`` keeps the output head and token embeddings in the base type, as our recipes do);
- the text goes to a file that llama-perplexity tokenizes itself (the token stream it scores is read back from
  its base file and compared with ours); it prepends BOS, cuts ``--windows`` chunks of ``--window`` tokens
  (``-c``), puts BOS in each chunk's first position and scores only the second half of each chunk (positions
  ``window / 2`` to ``window - 2`` predicting the next token); our windows and scoring follow it exactly;
- ``--kl-divergence-base`` on the base GGUF, then ``--kl-divergence`` on each quantization, with the KV cache in
  the base type (``-ctk/-ctv``): its mean KLD, PPL(Q) and "Same top p" (top-1 agreement) are against its own base,
  as ours are against our float model; the base row compares llama.cpp's base with our float model on the same
  positions (KL(llama.cpp || ours), from the log-probs in its base file, 16-bit as it stores them, and computed
  as llama-perplexity computes its KLD).

llama.cpp's Llama 4 loader fixes the chunked-attention window at 8192 tokens (and the temperature-tuning floor
scale at 8192) whatever config.json says (the embedded model: 256): ``--window`` must stay within the
checkpoint's attention_chunk_size, so that every position is in the first chunk, where both compute the same
attention (the floor scale first differs at position floor_scale - 1, which is never scored).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama4  # noqa: E402
from common import ROOT, markdown_table, write_section  # noqa: E402
from llama4.build import resolve_model_path  # noqa: E402
from llama4.kernels import cpu as cpu_kernels  # noqa: E402
from llama4.kernels.cpu.options import KernelOptions  # noqa: E402
from llama4.quant import quantize_model, quantized_bytes  # noqa: E402
from llama4.quant.gptq import calibration_windows, gptq_quantize_model  # noqa: E402
from llamacpp_gguf import (  # noqa: E402
    LlamaCpp,
    bytes_of,
    check_hparams,
    convert,
    describe_types,
    quantize_variant,
    read_gguf,
    system_info,
)

RECIPES = ("int8", "int4-g32", "int4-g64", "int4-g128", "int4-g32-asym", "experts=int4-g32,attention=int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GGUF_BASE = {"fp32": "f32", "bf16": "bf16"}
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_valid_head.txt.gz"
CALIBRATION_DATA = ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_train_head.jsonl.gz"
LLAMACPP_TYPES = "Q8_0,Q4_K_M,Q8_0:float-ends,Q4_K_M:float-ends"
RECIPE_KINDS = ("attention", "experts", "shared")  # what our single-format recipes quantize


def read_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def load_windows(tokenizer, text: str, windows: int, window: int, bos: int | None = None) -> torch.Tensor:
    """[windows, window] token ids: the text tokenized once, cut into consecutive windows. With ``bos``
    (llama-perplexity's chunking): the stream starts with ``bos``, and each window's first token is ``bos``."""
    ids = ([bos] if bos is not None else []) + tokenizer.encode(text)
    if len(ids) < windows * window:
        raise SystemExit(f"{len(ids)} tokens, fewer than {windows} x {window}")
    tokens = torch.tensor(ids[: windows * window], dtype=torch.long).view(windows, window)
    if bos is not None:
        tokens[:, 0] = bos
    return tokens


@torch.inference_mode()
def log_probs(model, tokens: torch.Tensor, batch: int, first: int = 0) -> torch.Tensor:
    """[windows, window - 1 - first, vocab] float32 log-probs of the next token at each position from ``first``
    to the last but one."""
    out = []
    for i in range(0, tokens.shape[0], batch):
        logits = model(tokens[i: i + batch])[:, first:-1].float()
        out.append(torch.log_softmax(logits, -1))
    return torch.cat(out)


def score(lp: torch.Tensor, tokens: torch.Tensor, ref: torch.Tensor | None, first: int = 0) -> dict:
    nll = -lp.gather(-1, tokens[:, first + 1:, None]).mean()
    result = {"ppl": math.exp(float(nll)), "kl": 0.0, "top1": 1.0}
    if ref is not None:
        result["kl"] = float((ref.exp() * (ref - lp)).sum(-1).mean())
        result["top1"] = float((ref.argmax(-1) == lp.argmax(-1)).float().mean())
    return result


# -- llama.cpp ---------------------------------------------------------------------------------------------------


def run_perplexity(llamacpp: LlamaCpp, gguf: Path, args, extra: list[str], log: Path) -> str:
    """llama-perplexity on ``gguf`` over the text file, ``--windows`` chunks of ``--window``; its output (also
    written to ``log``)."""
    kv_type = GGUF_BASE[args.dtype]
    cmd = [str(llamacpp.binary("llama-perplexity")), "-m", str(gguf), "-f", str(args.text_file),
           "-c", str(args.window), "--chunks", str(args.windows), "-t", str(args.llamacpp_threads),
           "-ctk", kv_type, "-ctv", kv_type, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    output = done.stdout + done.stderr
    log.write_text(" ".join(cmd) + "\n\n" + output)
    if done.returncode != 0:
        raise SystemExit(f"llama-perplexity failed ({done.returncode}), see {log}:\n" + "\n".join(
            output.splitlines()[-15:]))
    return output


def number(pattern: str, text: str, what: str) -> float:
    match = re.search(pattern, text)
    if not match:
        raise SystemExit(f"llama-perplexity's output has no {what} (pattern {pattern!r})")
    return float(match[1])


def read_base_file(path: Path) -> tuple[int, int, np.ndarray, np.ndarray]:
    """llama-perplexity's --kl-divergence-base file: n_ctx, n_chunk, the token stream [n_chunk * n_ctx] and the
    log-probs [n_chunk * (n_ctx - 1 - n_ctx / 2), n_vocab] of the scored positions (stored as 16-bit steps
    between each row's minimum, max - 16, and its maximum)."""
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise SystemExit(f"{path}: not a llama-perplexity log-probability file")
        n_ctx, n_vocab, n_chunk = np.frombuffer(f.read(12), dtype=np.int32).tolist()
        tokens = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype=np.int32)
        nv = 2 * ((n_vocab + 1) // 2) + 4
        rows = np.frombuffer(f.read(), dtype=np.uint16).reshape(-1, nv)
    head = rows[:, :4].copy().view(np.float32)  # scale, minimum log-prob
    lp = rows[:, 4: 4 + n_vocab].astype(np.float32) * head[:, :1] + head[:, 1:2]
    return n_ctx, n_chunk, tokens, lp


def llamacpp_rows(args, stream: list[int], ref: torch.Tensor, float_ppl: float, config_text: dict) -> tuple[list, str]:
    """The table rows of llama.cpp's base and quantizations, and a note on what each row's GGUF holds."""
    llamacpp = LlamaCpp(args.llamacpp)
    work = args.llamacpp_work
    work.mkdir(parents=True, exist_ok=True)
    args.text_file = work / "heldout.txt"
    args.text_file.write_text(read_text(args.data), encoding="utf-8")
    base_type = GGUF_BASE[args.dtype]
    start = time.perf_counter()
    base = convert(llamacpp, resolve_model_path(None), work / f"embedded-{base_type}.gguf", base_type, "llama4")
    kv, tensors = read_gguf(base)
    problems = check_hparams(kv, config_text)
    if problems:
        raise SystemExit(f"{base}: the converted model differs from config.json: " + "; ".join(problems))
    base_file = work / f"embedded-{base_type}-c{args.window}-n{args.windows}.logits"
    out = run_perplexity(llamacpp, base, args, ["--kl-divergence-base", str(base_file)], work / "base.ppl.log")
    base_ppl = number(r"Final estimate: PPL = ([\d.]+)", out, "final PPL")
    features = system_info(out)
    n_ctx, n_chunk, their_tokens, their_lp = read_base_file(base_file)
    ours = np.asarray(stream[: n_ctx * n_chunk], dtype=np.int32)
    if n_ctx != args.window or n_chunk != args.windows or their_tokens.shape != ours.shape:
        raise SystemExit(f"llama-perplexity scored {n_chunk} chunks of {n_ctx}, not {args.windows} of {args.window}")
    mismatched = int((their_tokens != ours).sum())
    theirs = torch.from_numpy(their_lp).view_as(ref)
    # KL(llama.cpp base || our float) as llama-perplexity computes its KLD: base probabilities under e^-16 (stored
    # as the row's minimum, not as themselves) left out
    kept = theirs > -16
    cross_kl = float((theirs.exp() * (theirs - ref) * kept).sum(-1).mean())
    cross_top1 = float((ref.argmax(-1) == theirs.argmax(-1)).float().mean())
    print(f"llama.cpp {base_type}: ppl {base_ppl:.4f}, KL(llama.cpp || ours) {cross_kl:.2e}, "
          f"{mismatched} of {ours.size} tokens differ from ours ({time.perf_counter() - start:.0f} s)", flush=True)
    rows = [[f"llama.cpp {base_type} GGUF (vs our float)", f"{base_ppl:.3f}",
             f"{100 * (base_ppl / float_ppl - 1):+.2f}%", f"{cross_kl:.1e}", f"{100 * cross_top1:.2f}%",
             f"{bytes_of(tensors, RECIPE_KINDS) / 1e6:.1f} ({base_type})"]]
    notes = [f"llama.cpp {base_type} base: {describe_types(tensors)}"]
    for variant in [v.strip() for v in args.llamacpp_types.split(",") if v.strip()]:
        gguf = quantize_variant(llamacpp, base, variant, base_type, args.llamacpp_threads)
        out = run_perplexity(llamacpp, gguf, args, ["--kl-divergence-base", str(base_file), "--kl-divergence"],
                             work / f"{gguf.stem}.kld.log")
        ppl = number(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", out, "Mean PPL(Q)")
        kld = number(r"Mean\s+KLD:\s*(-?[\d.]+)", out, "Mean KLD")
        top1 = number(r"Same top p:\s*([\d.]+)", out, "Same top p")
        _, qtensors = read_gguf(gguf)
        rows.append([f"llama.cpp `{variant}`", f"{ppl:.3f}", f"{100 * (ppl / base_ppl - 1):+.2f}%", f"{kld:.5f}",
                     f"{top1:.2f}%", f"{bytes_of(qtensors, RECIPE_KINDS) / 1e6:.1f}"])
        notes.append(f"`{variant}`: {describe_types(qtensors)}")
        print(f"llama.cpp {variant}: ppl {ppl:.3f}, KLD {kld:.5f}, same top {top1:.2f}% "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    same = ("the same token stream as ours" if mismatched == 0
            else f"{mismatched} of {ours.size} tokens differing from ours")
    note = (f"llama.cpp {llamacpp.version()} ({llamacpp.build_flags()}; CPU features {features}), "
            f"{args.llamacpp_threads} threads, llama-perplexity -c {args.window} --chunks {args.windows} "
            f"-ctk {base_type} -ctv {base_type}; it tokenized the text itself into {same}. Its rows' Δppl, KL and "
            f"top-1 are against its own {base_type} base (the first llama.cpp row: that base against our float "
            "model); their weight MB counts the same kinds as our recipes (attention, shared, experts). GGUF types "
            "by kind (x tensors): " + "; ".join(notes) + ".")
    return rows, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="held-out text (.txt or .txt.gz)")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--window", type=int, default=256, help="tokens per window")
    parser.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--recipes", default=";".join(RECIPES),
                        help="recipes separated by ';' (a recipe may hold commas)")
    parser.add_argument("--llamacpp", type=Path, metavar="DIR",
                        help="add llama.cpp's quantizations (a llama.cpp folder: src/, build/bin/, venv/)")
    parser.add_argument("--llamacpp-types", default=LLAMACPP_TYPES,
                        help="llama-quantize types, comma-separated; TYPE:float-ends keeps head and embeddings float")
    parser.add_argument("--llamacpp-threads", type=int, default=2)
    parser.add_argument("--llamacpp-work", type=Path, default=Path(tempfile.gettempdir()) / "llama4-bench" / "llamacpp",
                        help="where the GGUFs, the text file and llama.cpp's logs go")
    parser.add_argument("--kernel", action="store_true",
                        help="also score each recipe in bf16 on this CPU's kernels (as generate and serve run it)")
    parser.add_argument("--calibrate", choices=["gptq"], help="also score each recipe with GPTQ-calibrated codes")
    parser.add_argument("--calibration-data", type=Path, default=CALIBRATION_DATA,
                        help="calibration text (.txt / .jsonl, optionally .gz); default: TinyStories train head")
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--calibration-length", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/PERFORMANCE.md alone")
    args = parser.parse_args()
    recipes = [r.strip() for r in args.recipes.split(";") if r.strip()]

    start = time.perf_counter()
    model = llama4.load_model(None, dtype=DTYPES[args.dtype], pack=False)
    tokenizer = llama4.load_tokenizer(None)
    config_text = json.loads((resolve_model_path(None) / "config.json").read_text())["text_config"]
    text = read_text(args.data)
    first, bos = 0, None
    if args.llamacpp:  # llama-perplexity's chunking and scoring (see the docstring)
        chunk = config_text.get("attention_chunk_size")
        if chunk and args.window > chunk:
            raise SystemExit(f"--window {args.window} is longer than the attention chunk ({chunk}); llama.cpp's "
                             "loader uses 8192: keep the windows within one chunk")
        first, bos = args.window // 2, tokenizer.bos_id
    tokens = load_windows(tokenizer, text, args.windows, args.window, bos)
    ref = log_probs(model, tokens, args.batch, first)
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    base = score(ref, tokens, None, first)
    rows = [["float (" + args.dtype + ")", f"{base['ppl']:.3f}", "-", "-", "-", f"{float_bytes / 1e6:.1f} (all)"]]
    print(f"float: ppl {base['ppl']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    def add_row(label: str, quantized, size: str) -> None:
        r = score(log_probs(quantized, tokens, args.batch, first), tokens, ref, first)
        rows.append([label, f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}%",
                     f"{r['kl']:.5f}", f"{100 * r['top1']:.2f}%", size])
        print(f"{label}: ppl {r['ppl']:.3f}, KL {r['kl']:.5f} ({time.perf_counter() - start:.0f} s)", flush=True)

    calibration = None
    if args.calibrate:
        calibration = calibration_windows(args.calibration_data, tokenizer, args.calibration_tokens,
                                          args.calibration_length, separator=tokenizer.end_of_text_id)
    options = KernelOptions()
    if args.kernel:
        if not cpu_kernels.supported(torch.bfloat16, torch.device("cpu"), options):
            raise SystemExit("--kernel: no CPU kernel runs here (see llama4.kernels.cpu.supported)")
        add_row("float (bf16, CPU kernels)", cpu_kernels.pack(copy.deepcopy(model).bfloat16(), options), "-")
    for recipe in recipes:
        quantized = quantize_model(copy.deepcopy(model), recipe)
        size = f"{quantized_bytes(quantized) / 1e6:.1f}"
        add_row(f"`{recipe}`", quantized, size)
        if args.kernel:
            add_row(f"`{recipe}` (bf16, CPU kernels)",
                    cpu_kernels.pack(quantize_model(copy.deepcopy(model).bfloat16(), recipe), options), size)
        del quantized
        if args.calibrate:
            calibrated = gptq_quantize_model(copy.deepcopy(model), recipe, calibration)
            add_row(f"`{recipe}` GPTQ", calibrated, size)
            del calibrated
            if args.kernel:
                calibrated = gptq_quantize_model(copy.deepcopy(model).bfloat16(), recipe, calibration)
                add_row(f"`{recipe}` GPTQ (bf16, CPU kernels)", cpu_kernels.pack(calibrated, options), size)
                del calibrated
    llamacpp_note = ""
    if args.llamacpp:
        stream = [bos] + tokenizer.encode(text)[: args.windows * args.window]
        extra, llamacpp_note = llamacpp_rows(args, stream, ref, base["ppl"], config_text)
        rows += extra

    table = markdown_table(["recipe", "ppl", "Δppl", "mean KL (nats/token)", "top-1 agreement",
                            "quantized weight MB"], rows)
    command = "python bench/quant_quality.py" + "".join(f" {a}" for a in sys.argv[1:] if a != "--no-write")
    scored = args.windows * (args.window - 1 - first)
    scoring = (f"the second half of each window (positions {first}-{args.window - 2}), each window's first token "
               "BOS, as llama-perplexity scores" if args.llamacpp else "every position")
    setup = (f"`{command}`: embedded model, {args.dtype}, {args.windows} windows x {args.window} tokens of "
             f"{args.data.name}, {scoring} ({scored} scored tokens); "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}. "
             "KL(float || quantized) and top-1 agreement against the float model; quantized weight MB: codes, "
             "scales and zero points of the quantized weights (float row: all parameters).")
    if calibration is not None:
        setup += (f" GPTQ rows: calibrated on {calibration.numel()} tokens ({calibration.shape[0]} windows x "
                  f"{calibration.shape[1]}) of {args.calibration_data.name}.")
    if llamacpp_note:
        setup += " " + llamacpp_note
    title = "### Quantization quality" + (", llama4 and llama.cpp" if args.llamacpp else "")
    body = f"{title}\n\n{setup}\n\n{table}\n"
    print()
    print(body)
    if not args.no_write:
        marker = "bench-quant-quality" + ("-llamacpp" if args.llamacpp else "")
        write_section(ROOT / "docs" / "PERFORMANCE.md", marker, body)


if __name__ == "__main__":
    main()
