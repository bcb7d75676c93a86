"""Batch-1 bf16 prefill and decode, llama4 vs llama.cpp's CPU backend, on the same weights.

    python bench/llamacpp.py --llama-bench PATH/llama-bench --gguf PATH/model-bf16.gguf \\
        --checkpoint PATH/safetensors-folder [--threads 2] [--reps 3] [--rounds 2] [--cpu-path avx512bf16] \\
        [--no-write]

What it measures, with the same thread count on both sides:
- prompt tok/s: a random ``--prompt``-token prompt (128) processed at once. llama.cpp: llama-bench's
  ``pp128`` (only the last position's logits); llama4: ``--prompt`` / best wall time of
  ``llama4.generate(prompt, max_new_tokens=1)`` (prefill and the argmax of the one token).
- decode tok/s: ``--gen`` (128) tokens one at a time after a ``--prompt``-token context. llama.cpp:
  llama-bench's ``tg128 @ d128`` (random tokens fed one by one, no sampling; ``tg128`` from an empty
  context is shown beside it); llama4: as bench/generate.py, ``gen`` / (best time of ``gen + 1`` new tokens
  - best time of 1 new token), greedy with no early stop.
llama-bench runs ``-r --reps`` repetitions; the two sides run in turn for ``--rounds`` rounds (order
alternating; llama4 each round in a fresh process); the table keeps each side's best and shows the range.
``--cpu-path avx512bf16`` (or ``avx2``) caps llama4's worker at that instruction set (bench/common.py's
CPU_PATHS: oneDNN, ATen and our kernel), e.g. to keep it off AMX on a CPU that has it; ``--env KEY=VALUE``
(repeatable) adds to its environment. The llama.cpp side's instruction set is what its binary was built
for (shown from the CMakeCache.txt of its build folder). The table goes to docs/PERFORMANCE.md (one section
per CPU path) unless ``--no-write``.

Set-up (llama.cpp is never a runtime or test dependency of llama4; nothing here installs it):
1. Build llama.cpp's llama-bench, e.g. for AVX-512 BF16 without AMX (what a Zen 4 EPYC runs):
   ``cmake -S llama.cpp -B build-noamx -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON
   -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON
   -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
   -DGGML_AMX_BF16=OFF -DGGML_OPENMP=ON && cmake --build build-noamx --target llama-bench``
2. A bf16 safetensors checkpoint: bench/common.py's ``ensure_checkpoint("small", DIR)`` (transformers'
   random init), plus tokenizer files whose vocabulary has the config's vocab_size (any byte-level BPE:
   only speed is measured).
3. ``python llama.cpp/convert_hf_to_gguf.py CHECKPOINT --outtype bf16 --outfile model-bf16.gguf`` (its
   pre-tokenizer check knows no synthetic tokenizer: pin ``tokenizer.ggml.pre``, e.g. to ``llama-bpe``).
llama.cpp's Llama 4 loader fixes the chunked-attention window at 8192 tokens whatever the checkpoint says:
keep ``--prompt + --gen`` within the checkpoint's attention_chunk_size (1024 for ``small``) so both
compute the same attention.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CPU_PATHS, ROOT, cpu_name, markdown_table, write_section  # noqa: E402

ONEDNN_PROBE = """
import torch
torch.set_num_threads({threads})
w = torch.randn(1024, 1024).bfloat16()
p = torch.ops.mkldnn._reorder_linear_weight(w, 1)
for rows in (1, 128):
    torch.ops.mkldnn._linear_pointwise(torch.randn(rows, 1024).bfloat16(), p, None, "none", [], "")
"""


def worker(path: str, prompt: int, gen: int, threads: int, reps: int) -> dict:
    """llama4's prefill and decode in this process (run under the --env environment)."""
    import torch

    from generate import _generate, _load

    torch.set_num_threads(threads)
    model = _load("llama4", path, torch.bfloat16)
    ids = torch.randint(3, model.config.text.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))

    def times(new: int, runs: int) -> list[float]:
        out = []
        for _ in range(runs):
            t = time.perf_counter()
            _generate("llama4", model, ids, new)
            out.append(time.perf_counter() - t)
        return out

    with torch.inference_mode():
        _generate("llama4", model, ids, 4)  # warm-up (kernel build/load, packing)
        prefill = times(1, max(reps, 3))
        total = times(gen + 1, 2)
    from llama4.kernels.cpu import packed_with

    options = packed_with(model)
    kernel = options.kernel() if options is not None else None
    kernel = kernel.name if kernel is not None else "off (oneDNN)"
    return {"pp": [prompt / t for t in prefill], "tg": gen / (min(total) - min(prefill)),
            "kernel": kernel, "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()}


def busy_fraction(seconds: float = 1.0) -> float:
    """Share of the machine's CPU time spent busy over ``seconds`` (/proc/stat)."""
    def sample():
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return v[3] + v[4], sum(v)
    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_idle(limit: float) -> None:
    """Wait (up to ``limit`` s) for the machine to be idle: with 2 threads on 2 cores, another process taking a
    core stalls every barrier (llama.cpp's spinning ggml barriers most of all: tg128 can drop 30x)."""
    if limit <= 0:
        return
    start = time.monotonic()
    while (busy := busy_fraction()) > 0.1:
        if time.monotonic() - start > limit:
            print(f"  (machine still {busy:.0%} busy after {limit:.0f} s: measuring anyway)", flush=True)
            return


def run_ours(args, env: dict[str, str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", args.checkpoint, str(args.prompt),
           str(args.gen), str(args.threads), str(args.reps)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def onednn_isa(env: dict[str, str], threads: int) -> str:
    """oneDNN's ISA and the bf16 linear implementation it picks, under ``env`` (ONEDNN_VERBOSE probe)."""
    out = subprocess.run([sys.executable, "-c", ONEDNN_PROBE.format(threads=threads)], capture_output=True,
                         text=True, timeout=300, env={**env, "ONEDNN_VERBOSE": "1"}).stdout
    isa = re.search(r"isa:([^\n]*)", out)
    impls = sorted(set(re.findall(r"exec,cpu,inner_product,([^,]+),", out)))
    return f"{isa.group(1).strip() if isa else '?'} ({', '.join(impls) or '?'})"


def run_llamacpp(args) -> list[dict]:
    """pp{prompt} and tg{gen} from an empty context, then tg{gen} after a {prompt}-token context."""
    rows = []
    for prompt, depth in ((args.prompt, 0), (0, args.prompt)):
        cmd = [args.llama_bench, "-m", args.gguf, "-p", str(prompt), "-n", str(args.gen), "-d", str(depth),
               "-t", str(args.threads), "-r", str(args.reps), "-o", "json"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise SystemExit(f"llama-bench failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
        rows += json.loads(out.stdout)
    return rows


def llamacpp_build_flags(binary: str) -> str:
    """The GGML_* instruction-set options of the build folder the binary came from (its CMakeCache.txt)."""
    for folder in Path(binary).resolve().parents:
        cache = folder / "CMakeCache.txt"
        if cache.is_file():
            opts = dict(re.findall(r"^(GGML_(?:NATIVE|AVX\w*|AMX\w*|FMA|F16C|OPENMP)):BOOL=(\w+)$",
                                   cache.read_text(), re.M))
            on = [k[5:] for k, v in opts.items() if v.upper() in ("ON", "1", "TRUE")]
            off = [k[5:] for k, v in opts.items() if v.upper() not in ("ON", "1", "TRUE")]
            return f"build: {' '.join(on)} on; {' '.join(off)} off"
    return "build flags unknown (no CMakeCache.txt above the binary)"


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-bench", required=False, help="path to llama.cpp's llama-bench binary")
    parser.add_argument("--gguf", required=False, help="the bf16 GGUF converted from --checkpoint")
    parser.add_argument("--checkpoint", required=False, help="the safetensors checkpoint folder llama4 loads")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3, help="llama-bench -r; llama4's prefill runs (at least 3)")
    parser.add_argument("--rounds", type=int, default=2, help="both sides in turn, best kept")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each side, wait up to this long for other processes to leave the CPUs")
    parser.add_argument("--cpu-path", choices=list(CPU_PATHS), help="run llama4 on this CPU path (see above)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="set for llama4's worker only (repeatable)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, prompt, gen, threads, reps = args.worker
        print(json.dumps(worker(path, int(prompt), int(gen), int(threads), int(reps))))
        return
    missing = [f"--{n.replace('_', '-')}" for n in ("llama_bench", "gguf", "checkpoint") if not getattr(args, n)]
    if missing:
        parser.error("required: " + " ".join(missing))
    extra = dict(CPU_PATHS.get(args.cpu_path, {}))
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--env wants KEY=VALUE, got {item!r}")
        extra[key] = value
    env = {**os.environ, **extra}

    ours: list[dict] = []
    theirs: dict[tuple[str, int], list[float]] = {}  # (pp|tg, depth) -> samples (tok/s)
    meta: dict = {}
    for round_ in range(args.rounds):
        for side in (("llamacpp", "llama4") if round_ % 2 == 0 else ("llama4", "llamacpp")):
            wait_idle(args.wait_idle)
            if side == "llama4":
                res = run_ours(args, env)
                if "error" in res:
                    raise SystemExit(f"llama4 worker failed: {res['error']}")
                ours.append(res)
                print(f"round {round_ + 1} llama4: pp{args.prompt} {max(res['pp']):.1f}, tg{args.gen} {res['tg']:.1f} "
                      f"tok/s", flush=True)
            else:
                for row in run_llamacpp(args):
                    kind = "pp" if row["n_prompt"] else "tg"
                    theirs.setdefault((kind, row["n_depth"]), []).extend(row["samples_ts"])
                    meta = row
                print(f"round {round_ + 1} llama.cpp: " + ", ".join(
                    f"{k}@d{d} {spread(v[-args.reps:])}" for (k, d), v in sorted(theirs.items())), flush=True)

    p, n = args.prompt, args.gen
    our_pp = [x for r in ours for x in r["pp"]]
    our_tg = [r["tg"] for r in ours]
    their_pp, their_tg, their_tg0 = theirs[("pp", 0)], theirs[("tg", p)], theirs[("tg", 0)]
    env_text = " ".join(f"{k}={v}" for k, v in extra.items()) or "none"
    rows = [
        ["llama.cpp", f"{max(their_pp):.1f} ({spread(their_pp)})", f"{max(their_tg):.1f} ({spread(their_tg)})", "-",
         f"{meta.get('cpu_info', '?')}; {llamacpp_build_flags(args.llama_bench)}; "
         f"backends {meta.get('backends', '?')}; commit {meta.get('build_commit', '?')}; "
         f"tg{n} from an empty context {max(their_tg0):.1f}"],
        ["llama4", f"{max(our_pp):.1f} ({spread(our_pp)})", f"{max(our_tg):.1f} ({spread(our_tg)})",
         f"pp {max(our_pp) / max(their_pp):.2f}x, tg {max(our_tg) / max(their_tg):.2f}x",
         f"env {env_text}; decode kernel {ours[-1]['kernel']}; oneDNN {onednn_isa(env, args.threads)}; "
         f"torch {ours[-1]['torch']} ({ours[-1]['capability']})"],
    ]
    title = (f"### llama.cpp, batch-1 bf16, prompt {p} + {n} decoded tokens, {args.threads} threads, llama4 on the "
             f"{args.cpu_path or 'native'} path")
    table = markdown_table(["implementation", f"prompt tok/s (pp{p})", f"decode tok/s (tg{n} after {p})",
                            "ours / llama.cpp", "CPU / flags"], rows)
    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=30).stdout.strip() or "?"
    except OSError:
        commit = "?"
    note = (f"llama4 {commit}. CPU: {cpu_name()}. Best (range) over {args.rounds} round(s): llama.cpp {args.reps} "
            f"llama-bench repetitions a round, llama4 {max(args.reps, 3)} prefills and 2 decodes a round, each round "
            f"in a fresh process; {time.strftime('%Y-%m-%d')} (`python bench/llamacpp.py"
            f"{' --cpu-path ' + args.cpu_path if args.cpu_path else ''}`, set-up in its docstring).")
    body = f"{title}\n\n{table}\n\n{note}"
    print("\n" + body)
    if not args.no_write:
        write_section(ROOT / "docs" / "PERFORMANCE.md", f"bench-llamacpp-{args.cpu_path or 'native'}", body)


if __name__ == "__main__":
    main()
