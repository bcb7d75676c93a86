"""Batch-1 bf16 prefill and decode, llama4 vs llama.cpp's CPU backend, on the same weights; with ``--quant``,
quantized weights on both sides (llama.cpp's Q8_0 and Q4_K_M, llama4.quant's recipes).

    python bench/llamacpp.py --llama-bench PATH/llama-bench --gguf PATH/model-bf16.gguf \\
        --checkpoint PATH/safetensors-folder [--threads 2] [--reps 3] [--rounds 2] [--cpu-path avx512bf16] \\
        [--no-write]
    python bench/llamacpp.py --quant --llamacpp /work/llamacpp [--checkpoint PATH] \\
        [--pairs 'bf16=BF16;int8=Q8_0;int4-g32=Q4_K_M'] [--batch 8] [--rounds 2] [--llama4-rounds N] \\
        [--llama4-gen N] [--no-write]

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

Quantized mode (``--quant --llamacpp DIR``): each ``--pairs`` item ``RECIPE=TYPE`` pairs a llama4.quant recipe
with a llama-quantize type (``bf16=BF16``: neither side quantized, the same run's baseline). llama.cpp's side:
llama-bench's pp and tg (as above) and llama-batched-bench's decode of ``--batch`` sequences (``-npp --prompt
-ntg --gen -npl --batch``: S_TG, tokens/s over all sequences, random tokens); ours: the checkpoint loaded with
``llama4.load_model(path, dtype=torch.bfloat16, pack=False)``, quantized by
``llama4.quant.quantize_model(model, QuantRecipe.parse(RECIPE))``, then packed for the CPU paths by
``llama4.kernels.cpu.pack(model, llama4.build.DEFAULT_KERNELS)`` (the environment's LLAMA4_CPU_KERNEL and
``--cpu-path`` apply); prompt as above; decode at batch 1 and ``--batch`` (random prompts of ``--prompt``
tokens) as bench/generate.py's ``steps``: ``--gen`` greedy steps of the model timed directly after a cached
prefill, best of 2 (``batch x gen`` / time). The roofline of each row: bytes one batch-1 decoded token reads
(active weights in their stored format: the routed experts at experts_used / experts, the embedding table
excluded; llama4: from ``llama4.quant.summary``, llama.cpp: the GGUF's tensor sizes) / the best copy bandwidth
measured in the same run (a probe each round). The GGUFs come from DIR's converter and llama-quantize
(bench/llamacpp_gguf.py: the checkpoint linked into ``--llamacpp-work`` with a byte-level tokenizer of its
vocabulary size written beside it, converted to bf16 with the pre-tokenizer pinned to ``gpt-2``, then
quantized; all reused while newer than the checkpoint). Without ``--checkpoint`` it is bench/common.py's
``ensure_checkpoint("small", ...)``. The table goes to docs/PERFORMANCE.md (``bench-llamacpp-quant-<path>``)
unless ``--no-write``.

DIR for ``--quant`` (llama.cpp's source via git, built outside this repository; nothing of it is committed):
``DIR/src`` the source tree; ``cmake -S DIR/src -B DIR/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON
-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF && cmake --build DIR/build -j2 --target
llama-quantize llama-perplexity llama-bench llama-batched-bench llama-cli``; ``python3 -m venv DIR/venv &&
DIR/venv/bin/pip install torch==2.13.0 numpy sentencepiece safetensors transformers==4.57.6 protobuf
-e DIR/src/gguf-py`` (the converter's requirements; its transformers pin from
DIR/src/requirements/requirements-convert_hf_to_gguf.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CPU_PATHS, ROOT, copy_bandwidth, cpu_name, ensure_checkpoint, markdown_table, write_section  # noqa: E402
from llamacpp_gguf import (  # noqa: E402
    LlamaCpp,
    active_bytes,
    build_flags,
    check_hparams,
    convert,
    describe_types,
    quantize_variant,
    read_gguf,
    stage_checkpoint,
)

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


def run_llamacpp(args, llama_bench: str | None = None, gguf: str | None = None) -> list[dict]:
    """pp{prompt} and tg{gen} from an empty context, then tg{gen} after a {prompt}-token context."""
    rows = []
    for prompt, depth in ((args.prompt, 0), (0, args.prompt)):
        cmd = [llama_bench or args.llama_bench, "-m", gguf or args.gguf, "-p", str(prompt), "-n", str(args.gen),
               "-d", str(depth),
               "-t", str(args.threads), "-r", str(args.reps), "-o", "json"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise SystemExit(f"llama-bench failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
        rows += json.loads(out.stdout)
    return rows


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


# -- quantized mode (--quant) -----------------------------------------------------------------------------------


def quant_paths(model) -> str:
    """Where a packed model's quantized weights run: llama4.quant's own modules (the reference path, left alone
    by pack()), or packed weights (duck-typed: ``is_quantized``) in the kernel's quantized layout or kept as a
    QuantizedTensor that every product dequantizes."""
    counts, seen = Counter(), set()
    for module in model.modules():
        if type(module).__name__ in ("QuantizedLinear", "QuantizedExperts"):
            counts["llama4.quant reference modules"] += 1
        for value in vars(module).values():
            for weight in value if isinstance(value, list) else [value]:
                if getattr(weight, "is_quantized", False) is True and id(weight) not in seen:
                    seen.add(id(weight))
                    kernel = getattr(weight, "quantized", None) is not None
                    counts["in the kernel's layout" if kernel else "dequantized per product"] += 1
    return ", ".join(f"{n} {what}" for what, n in counts.items()) or "none"


def quant_worker(path: str, recipe: str, prompt: int, gen: int, batch: int, threads: int, reps: int) -> dict:
    """Our side of one pair in this process: the checkpoint quantized by ``recipe`` (``bf16``: not quantized),
    packed, then prefill, batch-1 decode and batch-``batch`` decode."""
    import torch

    import llama4
    from generate import _generate
    from llama4.kernels.cpu import KernelOptions, pack, packed_with
    from llama4.quant import QuantRecipe, quantize_model, summary

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = llama4.load_model(path, dtype=torch.bfloat16, pack=False)
    text = model.config.text
    info = llama4.model_info(model.config)
    weight_bytes = float(info["active_params"] - info["embedding_params"]) * 2  # bf16
    if recipe != "bf16":
        quantize_model(model, QuantRecipe.parse(recipe))
        for row in summary(model):  # each quantized module's bytes in place of its bf16 bytes
            if row.format is not None:
                share = text.num_experts_per_tok / text.num_experts if row.kind == "experts" else 1
                weight_bytes -= share * (row.float_bytes - row.stored_bytes)
    # llama4.build.DEFAULT_KERNELS unless the environment (--cpu-path, --env) says otherwise, as bench/generate.py
    kernels = KernelOptions.from_environ(os.environ) if "LLAMA4_CPU_KERNEL" in os.environ else \
        llama4.build.DEFAULT_KERNELS
    pack(model, kernels)
    setup = time.perf_counter() - start
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, text.vocab_size, (batch, prompt), generator=g)

    def prefill(runs: int) -> list[float]:  # the prompt and the argmax of one new token, as the bf16 mode
        out = []
        for _ in range(runs):
            t = time.perf_counter()
            _generate("llama4", model, ids[:1], 1)
            out.append(time.perf_counter() - t)
        return out

    def decode(rows: torch.Tensor, runs: int = 2) -> float:
        """tok/s of ``gen`` greedy steps timed directly after a cached prefill (best of ``runs``): no difference
        of two timings, which other processes on the cores can make meaningless."""
        best = float("inf")
        for _ in range(runs):
            cache = llama4.KVCache(text)
            token = model(rows, cache=cache, num_logits=1)[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(gen):
                token = model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
            best = min(best, time.perf_counter() - t)
        return rows.shape[0] * gen / best

    with torch.inference_mode():
        _generate("llama4", model, ids[:1], 2)  # warm-up (kernel build/load)
        prefills = prefill(max(reps, 3))
        tg = decode(ids[:1])
        batch_tg = decode(ids)
    options = packed_with(model)
    kernel = options.kernel() if options is not None else None
    paths = quant_paths(model)
    return {"pp": [prompt / t for t in prefills], "tg": tg, "batch": batch_tg, "weight_bytes": weight_bytes,
            "kernel": kernel.name if kernel is not None else "off (oneDNN)", "quant_paths": paths,
            "setup_s": setup, "torch": torch.__version__}


def run_batched(binary: Path, gguf: Path, args) -> list[float]:
    """llama-batched-bench's decode tok/s over ``--batch`` sequences (S_TG), one run per ``--reps``."""
    n_ctx = args.batch * (args.prompt + args.gen)
    cmd = [str(binary), "-m", str(gguf), "-c", str(n_ctx), "-b", "2048", "-ub", "512", "-npp", str(args.prompt),
           "-ntg", str(args.gen), "-npl", str(args.batch), "-t", str(args.threads), "--output-format", "jsonl"]
    speeds = []
    for _ in range(args.reps):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise SystemExit(f"llama-batched-bench failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
        rows = [json.loads(line) for line in (out.stdout + out.stderr).splitlines() if line.startswith("{")]
        if not rows:
            raise SystemExit(f"llama-batched-bench printed no result: {out.stdout[-2000:]}")
        speeds.append(rows[-1]["speed_tg"])
    return speeds


def quant_main(args, env: dict[str, str], extra: dict[str, str]) -> None:
    llamacpp = LlamaCpp(args.llamacpp)
    llama_bench = args.llama_bench or str(llamacpp.binary("llama-bench"))
    batched = llamacpp.binary("llama-batched-bench")
    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(
        "small", Path(tempfile.gettempdir()) / "llama4-bench")
    work = args.llamacpp_work
    config = json.loads((checkpoint / "config.json").read_text())
    text_config = config.get("text_config", config)
    chunk = text_config.get("attention_chunk_size") or 8192
    if args.prompt + args.gen > chunk:
        raise SystemExit(f"--prompt + --gen is longer than the attention chunk ({chunk}); llama.cpp's loader uses "
                         "8192: keep the test within one chunk")
    staged = stage_checkpoint(checkpoint, work / f"{checkpoint.name}-hf")
    base = convert(llamacpp, staged, work / f"{checkpoint.name}-bf16.gguf", "bf16", "gpt-2")
    kv, tensors = read_gguf(base)
    problems = check_hparams(kv, text_config)
    if problems:
        raise SystemExit(f"{base}: the converted model differs from config.json: " + "; ".join(problems))
    used, experts = kv.get("llama4.expert_used_count", 1), kv.get("llama4.expert_count", 1)
    pairs = []
    for item in [x for x in args.pairs.split(";") if x.strip()]:
        recipe, sep, qtype = (part.strip() for part in item.rpartition("="))
        if not sep or not recipe or not qtype:
            raise SystemExit(f"--pairs wants RECIPE=TYPE items separated by ';', got {item!r}")
        gguf = base if qtype.upper() == "BF16" else quantize_variant(llamacpp, base, qtype, "bf16", args.threads)
        _, qtensors = read_gguf(gguf)
        pairs.append({"recipe": recipe, "type": qtype, "gguf": gguf, "bytes": active_bytes(qtensors, used, experts),
                      "types": describe_types(qtensors)})
    print(f"checkpoint {checkpoint}; GGUFs in {work}", flush=True)

    our_gen = args.llama4_gen or args.gen
    our_rounds = min(args.llama4_rounds or args.rounds, args.rounds)
    bandwidths: list[float] = []
    ours: dict[str, list[dict]] = {}
    theirs: dict[str, dict[str, list[float]]] = {}
    meta: dict = {}
    for round_ in range(args.rounds):
        bandwidths.append(copy_bandwidth())
        print(f"round {round_ + 1}: copy bandwidth {bandwidths[-1] / 1e9:.1f} GB/s", flush=True)
        for pair in pairs:
            for side in (("llamacpp", "llama4") if round_ % 2 == 0 else ("llama4", "llamacpp")):
                if side == "llama4" and round_ >= our_rounds:
                    continue
                wait_idle(args.wait_idle)
                if side == "llama4":
                    spec = json.dumps([str(checkpoint), pair["recipe"], args.prompt, our_gen, args.batch,
                                       args.threads, args.reps])
                    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--quant-worker", spec],
                                         capture_output=True, text=True, timeout=3600, env=env)
                    if out.returncode != 0:
                        raise SystemExit(f"llama4 worker ({pair['recipe']}) failed (exit {out.returncode}): "
                                         f"{(out.stderr.strip() or out.stdout.strip())[-3000:]}")
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                    ours.setdefault(pair["recipe"], []).append(res)
                    print(f"  llama4 {pair['recipe']}: pp{args.prompt} {max(res['pp']):.1f}, tg{our_gen} "
                          f"{res['tg']:.1f}, batch {args.batch} {res['batch']:.1f} tok/s "
                          f"(load + quantize + pack {res['setup_s']:.0f} s)", flush=True)
                else:
                    samples = theirs.setdefault(pair["type"], {})
                    for row in run_llamacpp(args, llama_bench, str(pair["gguf"])):
                        kind = "pp" if row["n_prompt"] else f"tg@d{row['n_depth']}"
                        samples.setdefault(kind, []).extend(row["samples_ts"])
                        meta = row
                    speeds = run_batched(batched, pair["gguf"], args)
                    samples.setdefault("batch", []).extend(speeds)
                    print(f"  llama.cpp {pair['type']}: pp{args.prompt} {max(samples['pp']):.1f}, tg{args.gen}@d"
                          f"{args.prompt} {max(samples[f'tg@d{args.prompt}']):.1f}, batch {args.batch} "
                          f"{spread(speeds)} tok/s", flush=True)

    bandwidth = max(bandwidths)
    p, n, b = args.prompt, args.gen, args.batch
    rows = []
    for pair in pairs:
        t, o = theirs[pair["type"]], ours[pair["recipe"]]
        their_tg, our_tg = t[f"tg@d{p}"], [r["tg"] for r in o]
        our_pp = [x for r in o for x in r["pp"]]
        our_b = [r["batch"] for r in o]
        their_bound = bandwidth / pair["bytes"]
        our_bytes = o[-1]["weight_bytes"]
        our_bound = bandwidth / our_bytes
        rows.append([f"llama.cpp `{pair['type']}`", f"{max(t['pp']):.1f} ({spread(t['pp'])})",
                     f"{max(their_tg):.1f} ({spread(their_tg)})", f"{max(t['batch']):.1f} ({spread(t['batch'])})",
                     f"{pair['bytes'] / 1e6:.1f}", f"{their_bound:.0f} tok/s, {max(their_tg) / their_bound:.0%}", "-",
                     f"tg{n} from an empty context {max(t['tg@d0']):.1f}; {pair['types']}"])
        rows.append([f"llama4 `{pair['recipe']}`", f"{max(our_pp):.1f} ({spread(our_pp)})",
                     f"{max(our_tg):.1f} ({spread(our_tg)})", f"{max(our_b):.1f} ({spread(our_b)})",
                     f"{our_bytes / 1e6:.1f}", f"{our_bound:.0f} tok/s, {max(our_tg) / our_bound:.0%}",
                     f"pp {max(our_pp) / max(t['pp']):.2f}x, tg {max(our_tg) / max(their_tg):.2f}x, "
                     f"batch {max(our_b) / max(t['batch']):.2f}x",
                     f"decode kernel {o[-1]['kernel']}; quantized weights after pack(): {o[-1]['quant_paths']}"])
    env_text = " ".join(f"{k}={v}" for k, v in extra.items()) or "none"
    only = f" (in {our_rounds} round(s) only: --llama4-rounds)" if our_rounds != args.rounds else ""
    fewer = f" (--llama4-gen: fewer than llama.cpp's {n}, for a slow path)" if our_gen != n else ""
    title = (f"### llama.cpp, quantized weights, prompt {p} + {n} decoded tokens, batch 1 and {b}, {args.threads} "
             f"threads, llama4 on the {args.cpu_path or 'native'} path")
    table = markdown_table(["implementation", f"prompt tok/s (pp{p})", f"decode tok/s (tg{n} after {p})",
                            f"batch-{b} decode tok/s", "MB read per token", "roofline, decode / roofline",
                            "ours / llama.cpp", "notes"], rows)
    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=30).stdout.strip() or "?"
    except OSError:
        commit = "?"
    command = "python bench/llamacpp.py" + "".join(f" {a}" for a in sys.argv[1:] if a != "--no-write")
    note = (f"`{command}`: `{checkpoint.name}` (transformers' random init saved as bf16 unless --checkpoint says "
            f"otherwise), llama4 {commit}, torch {next(iter(ours.values()))[-1]['torch']}, env {env_text}. "
            f"llama.cpp {llamacpp.version()} ({build_flags(llama_bench)}; backends "
            f"{meta.get('backends', '?')}). CPU: {cpu_name()}. Best (range) over {args.rounds} round(s), the sides "
            f"in turn (order alternating), llama4 in a fresh process per pair and round{only}: llama.cpp {args.reps} "
            f"llama-bench repetitions and {args.reps} llama-batched-bench runs a round (-npp {p} -ntg {n} -npl {b}: "
            f"S_TG), "
            f"llama4 {max(args.reps, 3)} prefills and 2 decodes of {our_gen} steps timed directly{fewer} a round "
            f"at each batch size. "
            f"Roofline: MB one batch-1 decoded token "
            f"reads (active weights as stored, routed experts at {used}/{experts}, embedding table excluded) / "
            f"{bandwidth / 1e9:.1f} GB/s, the best of {len(bandwidths)} copy probe(s) "
            f"({', '.join(f'{x / 1e9:.1f}' for x in bandwidths)} GB/s); {time.strftime('%Y-%m-%d')}.")
    body = f"{title}\n\n{table}\n\n{note}"
    print("\n" + body)
    if not args.no_write:
        write_section(ROOT / "docs" / "PERFORMANCE.md", f"bench-llamacpp-quant-{args.cpu_path or 'native'}", body)


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
    parser.add_argument("--quant", action="store_true", help="quantized weights on both sides (see above)")
    parser.add_argument("--llamacpp", type=Path, metavar="DIR",
                        help="--quant: llama.cpp's folder (src/, build/, venv/)")
    parser.add_argument("--pairs", default="bf16=BF16;int8=Q8_0;int4-g32=Q4_K_M",
                        help="--quant: RECIPE=TYPE items separated by ';' (llama4.quant recipe = llama-quantize type)")
    parser.add_argument("--batch", type=int, default=8, help="--quant: sequences of the batched decode")
    parser.add_argument("--llama4-rounds", type=int, metavar="N",
                        help="--quant: llama4 runs in the first N rounds only (default all), for a slow path")
    parser.add_argument("--llama4-gen", type=int, metavar="N",
                        help="--quant: llama4 decodes N tokens (default --gen), for a slow path: a rate, same context")
    parser.add_argument("--llamacpp-work", type=Path, default=Path(tempfile.gettempdir()) / "llama4-bench" / "llamacpp",
                        help="--quant: where the staged checkpoint and the GGUFs go")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--quant-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, prompt, gen, threads, reps = args.worker
        print(json.dumps(worker(path, int(prompt), int(gen), int(threads), int(reps))))
        return
    if args.quant_worker:
        print(json.dumps(quant_worker(*json.loads(args.quant_worker))))
        return
    required = ("llamacpp",) if args.quant else ("llama_bench", "gguf", "checkpoint")
    missing = [f"--{n.replace('_', '-')}" for n in required if not getattr(args, n)]
    if missing:
        parser.error("required: " + " ".join(missing))
    extra = dict(CPU_PATHS.get(args.cpu_path, {}))
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--env wants KEY=VALUE, got {item!r}")
        extra[key] = value
    env = {**os.environ, **extra}
    if args.quant:
        quant_main(args, env, extra)
        return

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
         f"{meta.get('cpu_info', '?')}; {build_flags(args.llama_bench)}; "
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
