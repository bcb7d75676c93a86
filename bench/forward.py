"""Prefill throughput and peak memory: llama4 vs transformers on the same random weights.

    python bench/forward.py                      # small shape, 512/2048/8192 tokens, bf16 + fp32
    python bench/forward.py --lengths 2048 --dtypes bfloat16

Each (implementation, dtype, length) runs in a fresh process: one warm-up forward of 128 tokens, then
the best of ``--repeats`` timed forwards over the whole prompt (logits for the last position only, in
both). The table also gives our fraction of this machine's matmul peak: FLOPs per token (active
weights + attention over the keys each token sees) x tokens/s over a large-GEMM rate measured in the
same run. Results are written to docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, ensure_checkpoint, gemm_rate, markdown_table, peak_rss_bytes, run_worker, write_section  # noqa: E402


def worker(impl: str, dtype_name: str, length: int, path: str, threads: int, repeats: int) -> None:
    import json

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    ids = torch.randint(0, 32000, (1, length), generator=torch.Generator().manual_seed(0))
    if impl == "llama4":
        import llama4

        model = llama4.load_model(path, dtype=dtype)

        def forward(x):
            return model(x, num_logits=1)
    else:
        import types
        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
        import transformers

        model = transformers.Llama4ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()

        def forward(x):
            return model(x, logits_to_keep=1, use_cache=False).logits
    best = float("inf")
    with torch.inference_mode():
        forward(ids[:, :128])
        for _ in range(repeats):
            t = time.perf_counter()
            forward(ids)
            best = min(best, time.perf_counter() - t)
    print(json.dumps({"tok_s": length / best, "seconds": best, "peak_rss": peak_rss_bytes()}))


def flops_per_token(config, length: int) -> float:
    """Average FLOPs per prompt token: 2 x active matmul weights + QK and PV over the visible keys."""
    import llama4

    info = llama4.model_info(config)
    text = config.text
    matmul = info["active_params"] - info["embedding_params"] - text.vocab_size * text.hidden_size  # no LM head
    per_key = 4 * text.num_heads * text.head_dim  # QK^T and PV, multiply-add = 2 FLOPs each
    keys = 0.0
    for spec in text.layers:
        if spec.chunked:
            c = text.attention_chunk_size
            full, rest = divmod(length, c)
            keys += (full * c * (c + 1) / 2 + rest * (rest + 1) / 2) / length
        else:
            keys += (length + 1) / 2
    return 2 * matmul + per_key * keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-hf", action="store_true", help="measure llama4 only")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/PERFORMANCE.md")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, dtype_name, length, path, threads, repeats = args.worker
        worker(impl, dtype_name, int(length), path, int(threads), int(repeats))
        return

    import llama4

    torch.set_num_threads(args.threads)
    cache_dir = Path(tempfile.gettempdir()) / "llama4-bench"
    path = ensure_checkpoint(args.shape, cache_dir)
    config = llama4.load_model.__globals__["read_config"](path)
    impls = ["llama4"] if args.skip_hf else ["llama4", "transformers"]
    rows = []
    for dtype_name in args.dtypes:
        peak = gemm_rate(getattr(torch, dtype_name))
        for length in args.lengths:
            results = {impl: run_worker(Path(__file__), [impl, dtype_name, str(length), str(path), str(args.threads),
                                                          str(args.repeats)]) for impl in impls}
            ours, ref = results["llama4"], results.get("transformers", {})
            fraction = flops_per_token(config, length) * ours.get("tok_s", 0) / peak
            speedup = f"{ours['tok_s'] / ref['tok_s']:.2f}x" if "tok_s" in ours and "tok_s" in ref else "-"
            row = [dtype_name, length, f"{ours.get('tok_s', 0):.0f}", f"{ref['tok_s']:.0f}" if "tok_s" in ref else "-",
                   speedup, f"{ours.get('peak_rss', 0) / 2**20:.0f}",
                   f"{ref['peak_rss'] / 2**20:.0f}" if "peak_rss" in ref else "-",
                   f"{fraction:.0%}", f"{peak / 1e9:.0f}"]
            rows.append(row)
            print(" | ".join(map(str, row)), flush=True)
            for impl, result in results.items():
                if "error" in result:
                    print(f"  {impl} failed: {result['error']}", flush=True)
    headers = ["dtype", "tokens", "llama4 tok/s", "transformers tok/s", "speed-up", "llama4 peak RSS MiB",
               "transformers peak RSS MiB", "llama4 % of GEMM peak", "GEMM GFLOP/s"]
    table = markdown_table(headers, rows)
    print("\n" + table)
    if not args.no_write:
        body = (f"## Prefill (`python bench/forward.py`)\n\n`{args.shape}` shape from shared/bench, "
                "transformers' random "
                f"init (seed 0) saved as bf16 and loaded by both, {args.threads} threads, "
                f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                f"{time.strftime('%Y-%m-%d')}. Best of {args.repeats} forwards after a warm-up; logits for the last "
                "position only in both; peak RSS of the whole process (weights included).\n\n" + table)
        write_section(ROOT / "docs" / "PERFORMANCE.md", "bench-forward", body)


if __name__ == "__main__":
    main()
