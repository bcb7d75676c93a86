"""Generation benchmark: decode, prefill, memory at long context, vs transformers on the same weights.

    python bench/generate.py                 # everything below on the `small` shape (bf16, 2 threads)
    python bench/generate.py --skip-hf --sections decode

Sections (each measurement in a fresh process, so peak RSS belongs to it alone):
- decode: tokens/s at batch 1 and 8 after a 128-token prompt (greedy, no early stop), ours vs HF, the two
  sides in turn for --rounds rounds, best round per side;
- prefill: tokens/s for 2k and 8k-token prompts;
- memory: peak RSS after prefilling 8k and 32k tokens and decoding 8 more;
- context: the longest prompt of the `tiny` shape we prefill within a memory cap (--context-lengths);
- roofline: bytes of weights read per decoded token / measured copy bandwidth = the batch-1 bound (with
  decode: a copy probe per round, the highest kept);
- load: our batch-1 decode alone and with one busy process per core, at the default thread count and at 1.
- quant (only when asked: --sections quant): batch-1 and batch-8 decode and a 2k prefill with weights quantized by
  each of --recipes against bf16, each batch-1 figure against the roofline of its own bytes per token.

The decode table also runs our decode on the paths of CPUs other than this one (--cpu-paths: oneDNN, ATen
and our kernel capped at AVX-512 BF16, as on an AMD EPYC, or at AVX2), on this machine's cores and memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CPU_PATHS,
    ROOT,
    BusyCores,
    copy_bandwidth,
    cpu_name,
    ensure_checkpoint,
    markdown_table,
    peak_rss_bytes,
    run_worker,
    write_section,
)


def _load(impl: str, path: str, dtype: torch.dtype):
    if impl.startswith("llama4"):  # "llama4-invariant": as the server runs it (batch/split-invariant)
        import llama4
        from llama4.kernels.cpu import KernelOptions

        impl, _, recipe = impl.partition("+")  # "llama4+int4-g32": quantized by that recipe as it loads
        model = llama4.load_model(path, dtype=dtype, kernels=KernelOptions.from_environ(os.environ),
                                  quant=recipe or None)
        model.set_batch_invariant(impl == "llama4-invariant")
        if impl == "llama4-layers":  # decode through the model's torch layers, not the fused C layer
            model.text.fast_decode = None
        return model
    import types
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import transformers

    return transformers.Llama4ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()


def _generate(impl: str, model, ids: torch.Tensor, new: int) -> None:
    if impl.startswith("llama4"):
        import llama4

        llama4.generate(model, ids, max_new_tokens=new, stop_tokens=[])
    else:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0)


def worker(kind: str, impl: str, path: str, dtype_name: str, a: int, b: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    model = _load(impl, path, dtype)
    vocab = model.config.text.vocab_size if impl.startswith("llama4") else model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    if kind == "decode":  # a = batch, b = new tokens; decode time = best(b + 1 new) - best(1 new)
        ids = torch.randint(3, vocab, (a, 128), generator=g)

        def best_of(new: int, runs: int = 3) -> float:
            best = float("inf")
            for _ in range(runs):
                t = time.perf_counter()
                _generate(impl, model, ids, new)
                best = min(best, time.perf_counter() - t)
            return best

        with torch.inference_mode():
            _generate(impl, model, ids, 4)  # warm-up
            prefill = best_of(1)
            total = best_of(b + 1, runs=2)
        return {"tok_s": a * b / (total - prefill)}
    if kind == "steps":  # a = batch, b = new tokens: decode steps timed directly after a cached prefill (best of 3)
        import llama4

        ids = torch.randint(3, vocab, (a, 128), generator=g)
        best = float("inf")
        with torch.inference_mode():
            for _ in range(3):
                cache = llama4.KVCache(model.config.text)
                token = model(ids, cache=cache, num_logits=1)[:, -1].argmax(-1, keepdim=True)
                start = time.perf_counter()
                for _ in range(b):
                    token = model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
                best = min(best, time.perf_counter() - start)
        return {"tok_s": a * b / best}
    if kind == "prefill":  # a = prompt length
        ids = torch.randint(3, vocab, (1, a), generator=g)
        with torch.inference_mode():
            _generate(impl, model, ids[:, :128], 1)
            t = time.perf_counter()
            _generate(impl, model, ids, 1)
            return {"tok_s": a / (time.perf_counter() - t)}
    if kind == "memory":  # a = prompt length; 8 decoded tokens after it
        ids = torch.randint(3, vocab, (1, a), generator=g)
        with torch.inference_mode():
            t = time.perf_counter()
            _generate(impl, model, ids, 8)
        return {"peak_rss": peak_rss_bytes(), "seconds": time.perf_counter() - t}
    raise ValueError(kind)


def active_weight_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of weights one decoded token reads: active parameters minus the embedding table."""
    import llama4

    info = llama4.model_info(config)
    return (info["active_params"] - info["embedding_params"]) * torch.finfo(dtype).bits // 8


def active_quantized_bytes(config, recipe: str | None, dtype: torch.dtype) -> int:
    """Bytes of weights one decoded token reads under a quant recipe (llama4 info's byte rules): every text
    weight but the embedding table, the routed experts at top_k / num_experts of theirs."""
    from llama4.info import weight_bytes

    kinds = weight_bytes(config, recipe, dtype)["kinds"]
    text = config.text
    share = text.num_experts_per_tok / text.num_experts if text.num_experts else 1.0
    return round(sum(row["bytes"] * (share if kind == "experts" else 1.0) for kind, row in kinds.items()
                     if kind not in ("embeddings", "vision")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sections", nargs="+", default=["roofline", "decode", "prefill", "memory", "context", "load"])
    parser.add_argument("--cpu-paths", nargs="*", default=list(CPU_PATHS), choices=list(CPU_PATHS),
                        help="decode: also our decode on these CPU paths (default: all)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="decode: rounds of both sides in turn (best kept)")
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--context-lengths", type=int, nargs="+", default=[131072, 262144])
    parser.add_argument("--context-cap-gib", type=float, default=20.0)
    parser.add_argument("--recipes", nargs="+", default=["int8", "int4-g32", "int4-g32,scales=bf16"],
                        help="quant: the quantization recipes compared with bf16 (llama4 quantize --recipe syntax)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, impl, path, dtype_name, a, b, threads = args.worker
        print(json.dumps(worker(kind, impl, path, dtype_name, int(a), int(b), int(threads))))
        return

    from llama4.checkpoint.io import read_config

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cache_dir = Path(tempfile.gettempdir()) / "llama4-bench"
    path = ensure_checkpoint(args.shape, cache_dir)
    config = read_config(path)
    impls = ["llama4"] if args.skip_hf else ["llama4", "transformers"]
    script = Path(__file__)
    sections: dict[str, str] = {}  # written to docs/PERFORMANCE.md each under its own marker

    def run(kind, impl, a, b=0, shape_path=path, timeout=3600, threads=args.threads):
        cpu_path = impl.partition("@")[2]  # "llama4@avx2": ours on that CPU path
        return run_worker(script, [kind, impl.partition("@")[0], str(shape_path), args.dtype, str(a), str(b),
                                   str(threads)], timeout, env=CPU_PATHS.get(cpu_path))

    bound = None
    if "roofline" in args.sections or "decode" in args.sections:
        weight_bytes = active_weight_bytes(config, dtype)
        bandwidths = [copy_bandwidth()]
    if "decode" in args.sections:
        # The host's memory bandwidth swings by 2x within seconds (other tenants), and a slow spell over one
        # side's worker would decide the ratio: the sides take turns, round after round (each worker in a
        # fresh process), a copy probe opens every round, and each side keeps its best round.
        rates: dict[tuple[int, str], list[float]] = {}
        errors: dict[tuple[int, str], str] = {}
        # ours without the fused C layer, then ours on other CPUs' paths
        decode_impls = [*impls, "llama4-layers", *(f"llama4@{p}" for p in args.cpu_paths)]
        for round_ in range(args.rounds):
            if round_:
                bandwidths.append(copy_bandwidth())
            for batch in (1, 8):
                for impl in decode_impls if round_ % 2 == 0 else decode_impls[::-1]:
                    res = run("decode", impl, batch, args.new_tokens)
                    if "tok_s" in res:
                        rates.setdefault((batch, impl), []).append(res["tok_s"])
                    else:
                        errors[(batch, impl)] = res.get("error", str(res))
            print(f"round {round_ + 1}: copy {bandwidths[-1] / 1e9:.1f} GB/s, "
                  + ", ".join(f"{impl} b{b} {r[-1]:.1f}" for (b, impl), r in rates.items()), flush=True)
    if "roofline" in args.sections or "decode" in args.sections:
        bandwidth = max(bandwidths)
        bound = bandwidth / weight_bytes
        sections["roofline"] = (f"Batch-1 decode roofline: {weight_bytes / 1e6:.0f} MB of active weights per token / "
                                f"{bandwidth / 1e9:.1f} GB/s measured copy bandwidth = **{bound:.0f} tok/s** "
                                f"(the highest of {len(bandwidths)} copy probe(s): "
                                f"{', '.join(f'{b / 1e9:.1f}' for b in bandwidths)} GB/s).")
        print(sections["roofline"], flush=True)
    if "decode" in args.sections:
        rows = []
        for batch in (1, 8):
            best = {impl: max(rates[(batch, impl)]) for impl in decode_impls if (batch, impl) in rates}
            ours, ref, layers = best.get("llama4"), best.get("transformers"), best.get("llama4-layers")
            paths = [best.get(f"llama4@{p}") for p in args.cpu_paths]
            rows.append([batch, f"{ours:.1f}" if ours else errors.get((batch, "llama4")), f"{ref:.1f}" if ref else "-",
                         f"{ours / ref:.1f}x" if ours and ref else "-",
                         f"{ours / bound:.0%}" if ours and batch == 1 else "-",
                         f"{layers:.1f}" if layers else errors.get((batch, "llama4-layers"), "-"),
                         *(f"{rate:.1f} ({rate / bound:.0%})" if rate and batch == 1 else f"{rate:.1f}" if rate else "-"
                           for rate in paths),
                         "; ".join(" / ".join(f"{r:.0f}" for r in rates.get((batch, impl), []))
                                   for impl in decode_impls)])
            print(rows[-1], flush=True)
        sections["decode"] = (
            "### Decode after a 128-token prompt\n\n" + sections.get("roofline", "") + "\n\n" + markdown_table(
            ["batch", "llama4 tok/s", "transformers tok/s", "speed-up", "llama4 / roofline",
             "llama4 without the fused C layer tok/s", *(f"llama4 on the {p} path tok/s" for p in args.cpu_paths),
             f"each round ({'; '.join(decode_impls)})"], rows)
            + f"\n\nBest of {args.rounds} rounds per side; in each round the sides ran in turn (alternating the "
            "order), each in a fresh process. The CPU-path columns cap oneDNN, ATen and our kernel at that "
            "instruction set (" + "; ".join(" ".join(f"{k}={v}" for k, v in CPU_PATHS[p].items())
                                            for p in args.cpu_paths) + ") on this machine's cores and memory.")
    if "prefill" in args.sections:
        rows = []
        ours_impls = ["llama4", "llama4-invariant", *(f"{impl}@{p}" for p in args.cpu_paths
                                                        for impl in ("llama4", "llama4-invariant"))]
        for length in (2048, 8192):
            res = {impl: run("prefill", impl, length) for impl in [*impls, *ours_impls[1:]]}
            ref = res.get("transformers", {}).get("tok_s")
            rates = [res[impl].get("tok_s") for impl in ours_impls]
            rows.append([length, *(f"{r:.0f}" if r else res[impl].get("error", "-")
                                   for r, impl in zip(rates, ours_impls)),
                         f"{ref:.0f}" if ref else "-", f"{rates[0] / ref:.1f}x" if rates[0] and ref else "-"])
            print(rows[-1], flush=True)
        path_columns = [f"llama4{' batch-invariant' if 'invariant' in impl else ''} on the {impl.partition('@')[2]} "
                        "path tok/s" for impl in ours_impls[2:]]
        sections["prefill"] = ("### Prefill (whole prompt, then one token)\n\n" + markdown_table(
            ["prompt tokens", "llama4 tok/s", "llama4 batch-invariant tok/s (server default)", *path_columns,
             "transformers tok/s", "speed-up"], rows))
    if "memory" in args.sections:
        rows = []
        for length in args.memory_lengths:
            res = {impl: run("memory", impl, length) for impl in impls}
            ours, ref = res["llama4"].get("peak_rss"), res.get("transformers", {}).get("peak_rss")
            rows.append([length, f"{ours / 2**20:.0f}" if ours else res["llama4"],
                         f"{ref / 2**20:.0f}" if ref else res.get("transformers", "-"),
                         f"{ours / ref:.2f}" if ours and ref else "-"])
            print(rows[-1], flush=True)
        sections["memory"] = (
            "### Peak RSS after prefill + 8 decoded tokens (MiB, weights included)\n\n" + markdown_table(
            ["context", "llama4", "transformers", "ratio"], rows))
    if "context" in args.sections:
        tiny = ensure_checkpoint("tiny", cache_dir)
        rows = []
        for length in args.context_lengths:
            res = run("memory", "llama4", length, shape_path=tiny, timeout=4 * 3600)
            fits = "peak_rss" in res and res["peak_rss"] <= args.context_cap_gib * 2**30
            rows.append([length, f"{res['peak_rss'] / 2**30:.2f}" if "peak_rss" in res else res,
                         f"{res.get('seconds', 0):.0f}", "yes" if fits else "no"])
            print(rows[-1], flush=True)
        from llama4.inference.generate import DEFAULT_PREFILL_CHUNK

        sections["context"] = (
            f"### Long-context prefill, `tiny` shape (cap {args.context_cap_gib:g} GiB)\n\n" + markdown_table(
            ["prompt tokens", "llama4 peak RSS GiB", "seconds", "within cap"], rows) + "\n\n"
            f"`llama4.generate` of a random prompt: prefill in {DEFAULT_PREFILL_CHUNK:,}-token pieces, then 8 decoded "
            "tokens; peak RSS of the whole process, weights included; seconds: prefill and decode, wall clock.")
    if "load" in args.sections:
        # Other processes on the cores (a desktop, a shared server): one busy process per core. Each figure
        # is the best of --rounds runs; alone and loaded alternate.
        cores = len(os.sched_getaffinity(0))
        settings = [("default", torch.get_num_threads()), ("1 thread", 1)]
        rows, found = [], {}
        for round_ in range(args.rounds):
            for label, threads in settings:
                for loaded in (False, True):
                    with BusyCores(cores if loaded else 0):
                        res = run("steps", "llama4", 1, args.new_tokens, threads=threads)
                    found.setdefault((label, loaded), []).append(res.get("tok_s", 0.0))
        for label, threads in settings:
            alone, loaded = max(found[(label, False)]), max(found[(label, True)])
            rows.append([f"{label} ({threads})", f"{alone:.1f}", f"{loaded:.1f}",
                         f"{alone / loaded:.2f}x" if loaded else "-",
                         " / ".join(f"{a:.0f}-{b:.0f}" for a, b in zip(found[(label, False)], found[(label, True)]))])
            print(rows[-1], flush=True)
        sections["load"] = (f"### Batch-1 decode with other work on the machine ({cores} cores)\n\n" + markdown_table(
            ["threads", "alone tok/s", f"with {cores} busy processes tok/s", "slow-down", "each round (alone-loaded)"],
            rows) + f"\n\nBest of {args.rounds} rounds, alone and loaded in turn; in each, "
            f"{args.new_tokens} greedy decode "
            "steps after a 128-token prompt, timed directly, best of 3. A busy process is a Python loop per core, "
            "running for the whole loaded measurement (load, prefill and decode).")
    if "quant" in args.sections:
        # Quantized weights against bf16 on the same checkpoint: batch-1 and batch-8 decode and a 2k prefill,
        # the recipes and bf16 in turn for --rounds rounds (best kept), each batch-1 figure against the
        # roofline of its own bytes per token.
        sides = ["llama4", *(f"llama4+{recipe}" for recipe in args.recipes)]
        found: dict[tuple[str, str], list[float]] = {}
        bandwidths = [copy_bandwidth()]
        for round_ in range(args.rounds):
            if round_:
                bandwidths.append(copy_bandwidth())
            for impl in sides if round_ % 2 == 0 else sides[::-1]:
                for case, (kind, a, b) in {"b1": ("decode", 1, args.new_tokens), "b8": ("decode", 8, args.new_tokens),
                                           "pp2048": ("prefill", 2048, 0)}.items():
                    res = run(kind, impl, a, b)
                    found.setdefault((impl, case), []).append(res.get("tok_s", 0.0))
            print(f"round {round_ + 1}: "
                  + ", ".join(f"{impl} {case} {r[-1]:.1f}" for (impl, case), r in found.items()), flush=True)
        bandwidth = max(bandwidths)
        rows = []
        for impl in sides:
            recipe = impl.partition("+")[2] or None
            size = active_quantized_bytes(config, recipe, dtype)
            best = {case: max(found[(impl, case)]) for case in ("b1", "b8", "pp2048")}
            base = {case: max(found[("llama4", case)]) for case in best}
            rows.append([recipe or "bf16", f"{size / 1e6:.0f}", f"{best['b1']:.1f}", f"{best['b1'] / base['b1']:.2f}x",
                         f"{best['b1'] / (bandwidth / size):.0%}", f"{best['b8']:.1f}",
                         f"{best['b8'] / base['b8']:.2f}x", f"{best['pp2048']:.0f}",
                         f"{best['pp2048'] / base['pp2048']:.2f}x",
                         " / ".join(f"{r:.0f}" for r in found[(impl, "b1")])])
            print(rows[-1], flush=True)
        sections["quant"] = (
            "### Quantized weights: decode and prefill against bf16\n\n" + markdown_table(
                ["weights", "MB read per token", "batch-1 tok/s", "vs bf16", "of its roofline", "batch-8 tok/s",
                 "vs bf16", "prefill 2k tok/s", "vs bf16", "batch-1 each round"], rows)
            + f"\n\nBest of {args.rounds} rounds, the sides in turn (alternating the order), each figure from its own "
            f"process; roofline: the bytes of weights a token reads (embedding table excluded, routed experts at "
            f"top-k of theirs) / {bandwidth / 1e9:.1f} GB/s, the best of {len(bandwidths)} copy probes. Recipes as "
            "`llama4 quantize --recipe` takes them (scales fp32 unless `scales=bf16`); the quantized model is the "
            "bf16 checkpoint quantized as it loads (`load_model(quant=...)`).")
    if "decode" in sections:
        sections.pop("roofline", None)  # the decode table carries it
    print("\n" + "\n\n".join(sections.values()))
    if not args.no_write:
        setup = (f"`{args.shape}` shape (the context rows: `tiny`), transformers' random init (seed 0) saved as bf16, "
                 f"run in {args.dtype}, {args.threads} threads, {cpu_name()}, "
                 f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; greedy, no early stop, each figure from its "
                 "own process (`python bench/generate.py`).")
        for name, body in sections.items():
            write_section(ROOT / "docs" / "PERFORMANCE.md", f"bench-generate-{name}", body + "\n\n" + setup)


if __name__ == "__main__":
    main()
