"""Vision tower throughput: tiles/s through encoder + adapter + projector, llama4 vs transformers.

    python bench/vision.py                  # the released Scout/Maverick vision tower (34 layers, 1408 wide)
    python bench/vision.py --layers 4       # a shallower tower for a quick look

Both load one checkpoint (transformers' random init, seed 0, saved as bf16) with a tiny text model
beside the real-size vision tower. Each (implementation, dtype) runs in a fresh process: a warm-up,
then the best of ``--repeats`` passes over 1 and over 4 tiles.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table, peak_rss_bytes, run_worker, write_section  # noqa: E402

VISION = dict(hidden_size=1408, num_hidden_layers=34, num_attention_heads=16, intermediate_size=5632,
              image_size=336, patch_size=14, vision_output_dim=4096, projector_input_dim=4096,
              projector_output_dim=4096, pixel_shuffle_ratio=0.5, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 10000.0})
TEXT = dict(vocab_size=1024, hidden_size=5120, intermediate_size=256, intermediate_size_mlp=256, num_hidden_layers=1,
            num_attention_heads=40, num_key_value_heads=8, head_dim=128, num_local_experts=2)


def _transformers():
    import types
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import transformers

    return transformers


def ensure_checkpoint(layers: int, cache_dir: Path) -> Path:
    path = cache_dir / f"vision-{layers}layers-seed0"
    if (path / "config.json").is_file():
        return path
    transformers = _transformers()
    torch.manual_seed(0)
    config = transformers.Llama4Config(vision_config=dict(VISION, num_hidden_layers=layers), text_config=TEXT,
                                       image_token_index=1000, boi_token_index=1001, eoi_token_index=1002)
    transformers.Llama4ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(path)
    return path


def worker(impl: str, path: str, dtype_name: str, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    if impl == "llama4":
        import llama4

        model = llama4.load_model(path, dtype=dtype)

        def encode(pixels):
            return model.projector(model.vision(pixels).flatten(0, 1))
    else:
        model = _transformers().Llama4ForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa").eval()

        def encode(pixels):
            features = model.get_image_features(pixel_values=pixels, return_dict=True).last_hidden_state
            return model.multi_modal_projector(features.reshape(-1, features.shape[-1]))
    result = {}
    with torch.inference_mode():
        for tiles in (1, 4):
            pixels = torch.randn(tiles, 3, 336, 336, generator=torch.Generator().manual_seed(0)).to(dtype)
            encode(pixels)
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                encode(pixels)
                best = min(best, time.perf_counter() - t)
            result[str(tiles)] = tiles / best
    result["peak_rss"] = peak_rss_bytes()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=34)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, path, dtype_name, threads, repeats = args.worker
        print(json.dumps(worker(impl, path, dtype_name, int(threads), int(repeats))))
        return
    path = ensure_checkpoint(args.layers, Path(tempfile.gettempdir()) / "llama4-bench")
    rows = []
    for dtype_name in args.dtypes:
        res = {impl: run_worker(Path(__file__), [impl, str(path), dtype_name, str(args.threads), str(args.repeats)])
               for impl in ("llama4", "transformers")}
        for tiles in ("1", "4"):
            ours, ref = res["llama4"].get(tiles), res["transformers"].get(tiles)
            rows.append([dtype_name, tiles, f"{ours:.2f}" if ours else res["llama4"],
                         f"{ref:.2f}" if ref else res["transformers"],
                         f"{ours / ref:.2f}x" if ours and ref else "-"])
            print(rows[-1], flush=True)
    table = markdown_table(["dtype", "tiles per call", "llama4 tiles/s", "transformers tiles/s", "speed-up"], rows)
    print("\n" + table)
    if not args.no_write:
        body = (f"## Vision tower (`python bench/vision.py`)\n\n{args.layers}-layer Llama 4 vision tower (1408 wide, "
                f"16 heads, 336 px tiles) + adapter + projector, transformers' random init (seed 0) saved as bf16, "
                f"{args.threads} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                f"{time.strftime('%Y-%m-%d')}. Best of {args.repeats} after a warm-up.\n\n" + table)
        write_section(ROOT / "docs" / "PERFORMANCE.md", "bench-vision", body)


if __name__ == "__main__":
    main()
