"""The ``llama4`` command: the only place that reads argv or sets process-wide torch settings."""

from __future__ import annotations

import argparse
import json
import os
import sys

from llama4.checkpoint.io import CheckpointError
from llama4.config import ConfigError
from llama4.dtypes import WEIGHT_DTYPES, torch_dtype


def kernel_options():
    """The CPU fast paths this process may use, from LLAMA4_CPU_KERNEL, LLAMA4_FUSED_DECODE, CC and
    XDG_CACHE_HOME."""
    from llama4.kernels.cpu import KernelOptions

    return KernelOptions.from_environ(os.environ)


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


def _info_source(args: argparse.Namespace):
    """What ``llama4 info`` describes: --model, else --preset, else the embedded model (Scout if none)."""
    from llama4.build import EMBEDDED_DIR
    from llama4.presets import preset

    if args.model:
        return args.model, None
    if args.preset:
        return preset(args.preset), args.preset.lower()
    if (EMBEDDED_DIR / "config.json").is_file():
        return EMBEDDED_DIR, None
    return preset("scout"), "scout"


def cmd_info(args: argparse.Namespace) -> int:
    from llama4.info import model_info
    from llama4.presets import ASSUMED_PRESETS

    source, preset_name = _info_source(args)
    info = model_info(source)
    if preset_name is not None:
        info["source"] = f"preset {preset_name}"
        info["assumed"] = preset_name in ASSUMED_PRESETS
    if args.finetune:
        return _finetune_info(args, source)
    plan = None
    if any(v is not None for v in (args.quant, args.kv, args.context, args.memory, args.tp, args.ep, args.cp,
                                   args.prefill_chunk, args.dtype)):
        import torch

        from llama4.distributed import ParallelPlan
        from llama4.info import memory_plan, resolve_config

        config, _ = resolve_config(source)
        parallel = ParallelPlan(args.tp or 1, args.ep or 1) if args.tp or args.ep else None
        recipe, dtype = args.quant, torch.float32 if args.dtype == "fp32" else torch.bfloat16
        if args.dtype == "fp8":
            if args.quant is not None and args.quant != "fp8":
                raise ValueError(f"--dtype fp8 plans an FP8 checkpoint (--quant fp8): it cannot be combined with "
                                 f"--quant {args.quant}")
            recipe = "fp8"
        plan = memory_plan(config, recipe, args.kv or "bf16", args.context, args.memory, dtype=dtype,
                           parallel=parallel, cp=1 if args.cp is None else args.cp, chunk=args.prefill_chunk)
        info["memory"] = plan
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
    if plan is not None:
        _print_plan(plan)
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


def _finetune_info(args: argparse.Namespace, source) -> int:
    """``llama4 info --finetune lora|qlora``: the one-device training memory plan (llama4.info.finetune_plan)."""
    from llama4.info import finetune_plan, resolve_config

    config, _ = resolve_config(source)
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else None
    plan = finetune_plan(config, args.finetune, args.context or 4096, args.lora_rank, targets, args.quant,
                         memory=args.memory)
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    base, ad, acts = plan["base"], plan["adapters"], plan["activations"]
    print(f"fine-tuning plan ({plan['method']}, one device, batch 1, {plan['context']:,} tokens): LoRA rank "
          f"{plan['rank']} on {','.join(plan['targets'])}")
    print(f"  frozen base {base['recipe']} (float {base['dtype']}): {_bytes(base['total_bytes'])}")
    print(f"  adapters {_human(ad['params'])} params: weights {_bytes(ad['weights'])} + gradients "
          f"{_bytes(ad['gradients'])} + AdamW moments {_bytes(ad['adamw_states'])} (the model's dtype; no fp32 "
          f"master copy)")
    for key, name in (("checkpointing", "with gradient checkpointing"), ("no_checkpointing", "without")):
        a = acts[key]
        print(f"  activations {name}: {_bytes(a['total'])} (layers {_bytes(a['layers'])}, logits and loss "
              f"{_bytes(a['head'])}); total {_bytes(plan['total_' + key])}")
    if "memory_bytes" in plan:
        print(f"  in {_bytes(plan['memory_bytes'])}: largest context {plan['max_context_checkpointing']:,} tokens "
              f"with checkpointing, {plan['max_context_no_checkpointing']:,} without (0: the base does not fit)")
    return 0


def _print_plan(plan: dict) -> None:
    """The memory plan of ``llama4 info`` (see llama4.info.memory_plan)."""
    weights, acts, kv = plan["weights"], plan["activations"], plan["kv_cache"]
    scales = f", {weights['scale_dtype']} scales" if weights["scale_dtype"] else ""
    kv_name = plan["kv_dtype"] + (" (global layers; chunked layers bf16)" if kv["global_format"] else "")
    print(f"memory plan: weights {weights['recipe']} (float {weights['dtype']}{scales}), KV cache {kv_name}, batch 1")
    parallel = plan.get("parallel")
    if parallel:
        kv_heads = (f"{parallel['kv_heads_per_device']} KV head(s) per device"
                    + (" (replicated: fewer KV heads than tp ranks)" if parallel["kv_heads_replicated"] else ""))
        print(f"  PER DEVICE: tp={parallel['tp']}, ep={parallel['ep']} on {parallel['devices']} devices; "
              f"{parallel['experts_per_device']} routed experts x hidden {parallel['expert_hidden_per_device']} "
              f"per device; {kv_heads}; all devices' weights {_bytes(parallel['all_devices_weight_bytes'])}")
    context = plan.get("context_parallel")
    if context:
        print(f"  PER DEVICE with context parallelism: cp={context['cp']} x {context['devices'] // context['cp']} "
              f"tp/ep rank(s) = {context['devices']} devices; the prompt prefilled in slices of "
              f"{acts['slice_tokens']:,} tokens (each in pieces of {acts['prefill_chunk']:,}), the global layers' KV "
              f"split over the cp ranks (the fullest rank's figures)")
    print(f"  weights {_bytes(weights['total_bytes'])}")
    for kind, row in weights["kinds"].items():
        split = ("  split" if row["split"] else "  replicated") if "split" in row else ""
        print(f"    {kind:<11} {row['format']:<15} {_human(row['params']):>8} params  "
              f"{_bytes(row['bytes']):>10}{split}")
    if context and (kv["context"] or plan.get("max_context") != -1):
        print(f"  KV cache at {kv['context']:,} tokens {_bytes(kv['total_bytes'])} = global layers "
              f"{_bytes(kv['global_bytes'])} ({kv['global_entries_per_layer']:,} tokens each of this rank's slice "
              f"and round-robin decode entries, in buffers of {kv['global_capacity_per_layer']:,}) + chunked "
              f"layers {_bytes(kv['local_bytes'])} (the current chunk, on every rank)")
        if kv["growth_bytes"]:
            print(f"    decoding past the slice's last block grows each global layer's buffer by half: "
                  f"+{_bytes(kv['growth_bytes'])} per device")
    elif kv["context"] or plan.get("max_context") != -1:
        print(f"  KV cache at {kv['context']:,} tokens {_bytes(kv['total_bytes'])} = global layers "
              f"{_bytes(kv['global_bytes'])} ({_bytes(kv['bytes_per_token_global'])} per token) + chunked layers "
              f"{_bytes(kv['local_bytes'])} (at most one chunk each)")
    if context:
        pre = acts["prefill"]
        print(f"  activations ~{_bytes(acts['total_bytes'])} (the slice's prefill pass layer by layer in pieces of "
              f"{acts['prefill_chunk']:,} tokens: the slice's residual stream {_bytes(pre['residual'])}; per piece "
              f"hidden {_bytes(pre['hidden'])}, q/k/v {_bytes(pre['attention'])}, FFN {_bytes(pre['ffn'])}, ring "
              f"blocks and partial outputs {_bytes(pre['ring'])}, chunked view {_bytes(pre['chunk_view'])}; "
              f"largest dequantized weight {_bytes(acts['dequantized_weight'])})")
    else:
        print(f"  activations ~{_bytes(acts['total_bytes'])} (prefill piece of {acts['prefill_chunk']} tokens: logits "
              f"{_bytes(acts['prefill']['logits'])}, hidden/attention/FFN "
              f"{_bytes(acts['prefill']['total'] - acts['prefill']['logits'])}; largest dequantized weight "
              f"{_bytes(acts['dequantized_weight'])})")
    print(f"  total {_bytes(plan['total_bytes'])}")
    if "memory_bytes" in plan:
        budget, found = _bytes(plan["memory_bytes"]), plan["max_context"]
        if found is None:
            print(f"  in {budget}: any context fits (the KV cache stops growing at one chunk)")
        elif found == -1:
            fixed = weights["total_bytes"] + acts["total_bytes"]
            if weights["total_bytes"] > plan["memory_bytes"]:
                print(f"  in {budget}: does not fit: weights alone need {_bytes(weights['total_bytes'])}")
            else:
                print(f"  in {budget}: does not fit: weights and activations need {_bytes(fixed)}")
        else:
            print(f"  in {budget}: largest context {found:,} tokens (KV cache "
                  f"{_bytes(plan['max_context_kv_bytes'])})")


def _setup_torch(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def _load(args: argparse.Namespace):
    """Model and tokenizer from --model (default: the embedded model), with a progress bar."""
    from tqdm import tqdm

    import llama4

    _setup_torch(args)
    bar = tqdm(total=0, desc="loading weights", unit="tensor", disable=args.quiet or not sys.stderr.isatty(),
               leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    model = llama4.load_model(args.model, dtype=torch_dtype(args.dtype), progress=progress,
                              kernels=kernel_options(), quant=args.quant)
    bar.close()
    path = args.model if args.model is not None else llama4.build.resolve_model_path(None)
    return model, llama4.load_tokenizer(path)


def _sampling(args: argparse.Namespace):
    from llama4.inference.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                          presence_penalty=args.presence_penalty, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    from llama4.distributed.launch import LaunchEnv

    if args.tp is not None or args.ep is not None or args.cp is not None or LaunchEnv.launched(os.environ):
        return _generate_distributed(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    return _generate(args, prompt, *_load(args))


def _generate_distributed(args: argparse.Namespace) -> int:
    """``generate`` on every rank of a torchrun job (llama4.distributed.launch): each rank loads its shard, all
    step together with the same seed, rank 0 prints."""
    import llama4
    from llama4.distributed import launch

    if args.prompt is None:
        raise ValueError("give the prompt as an argument in a distributed run (every rank would read standard input)")
    if args.quant:
        from llama4.quant import QuantRecipe

        QuantRecipe.parse(args.quant)  # a bad recipe stops every rank before any loads
    path = llama4.build.resolve_model_path(args.model)
    options = launch.LaunchOptions(tp=args.tp, ep=args.ep, cp=1 if args.cp is None else args.cp,
                                   timeout_s=args.dist_timeout, device=args.dist_device)
    prompt_ids = None
    if options.cp > 1:  # checked before any rank starts: a prompt shorter than cp is refused (no fallback)
        try:
            prompt_ids = _context_prompt(args, llama4.load_tokenizer(path), options.cp)
        except ValueError:
            if launch.LaunchEnv.from_environ(os.environ).rank != 0:
                return 2  # every rank finds the same problem: rank 0 says it
            raise

    def body(run: launch.DistributedRun) -> int:
        _setup_torch(args)
        model, tok = run.load(path, torch_dtype(args.dtype), args.quant), llama4.load_tokenizer(path)
        args.seed = run.shared_seed(args.seed)
        stream = None
        if run.context is not None:
            def stream(completion):
                return _context_stream(args, run, model, tok, prompt_ids, completion)
        return _generate(args, args.prompt, model, tok, show=run.is_main,
                         finished=lambda tokens: run.check_same(tokens, args.max_tokens), stream=stream)

    return launch.run(options, os.environ, body)


def _context_prompt(args: argparse.Namespace, tok, cp: int) -> list[int]:
    """The prompt's tokens for a context-parallel run, as ``generate`` renders them (raw, or the chat template);
    refused where context parallelism cannot split it (images, fewer tokens than cp)."""
    from llama4.distributed import ContextPlan

    if args.image:
        raise ValueError("--cp: images in the prompt are not supported with context parallelism yet")
    if args.raw:
        ids = tok.encode(args.prompt, bos=True)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        ids = tok.apply_chat_template(messages + [{"role": "user", "content": args.prompt}],
                                      add_generation_prompt=True)
    ContextPlan(cp).slices(len(ids))  # every rank of the context group needs at least one prompt token
    return ids


def _context_stream(args: argparse.Namespace, run, model, tok, ids: list[int], completion):
    """Text pieces of a reply whose prompt is prefilled context-parallel (run.context_tokens), sampled and cut at
    stop strings by llama4.inference.text.text_pieces, as for one process."""

    from llama4.inference.sampling import Sampler
    from llama4.inference.text import text_pieces

    sampler = Sampler(_sampling(args), model.config.text.vocab_size, ids)
    completion.prompt_tokens = len(ids)

    def choose(logits):
        return int(logits.argmax()) if sampler.plain_greedy else sampler.choose(logits).token

    def steps():
        for token in run.context_tokens(model, ids, choose, args.max_tokens, tok.eos_ids, piece=args.prefill_chunk,
                                        kv_cache=args.kv_cache):
            yield None if token in tok.eos_ids else (token, None)

    return text_pieces(tok, steps(), completion, args.stop)


def _generate(args: argparse.Namespace, prompt: str, model, tok, show: bool = True, finished=None,
              stream=None) -> int:
    """Generate and print (where ``show``); ``finished(tokens)`` is called with the tokens before the summary.
    ``stream(completion)``: the text pieces, where another loop generates them (context parallelism)."""
    from llama4.inference.text import Completion, stream_chat, stream_tokens_as_text

    completion = Completion()
    if stream is not None:
        stream = stream(completion)
    elif args.raw:
        if args.image:
            raise ValueError("--image needs the chat format; drop --raw")
        stream = stream_tokens_as_text(model, tok, tok.encode(prompt, bos=True), params=_sampling(args),
                                       max_new_tokens=args.max_tokens, stop=args.stop, completion=completion,
                                       kv_cache=args.kv_cache)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        parts = [{"type": "image", "image": path} for path in args.image]
        messages.append({"role": "user", "content": parts + [{"type": "text", "text": prompt}] if parts else prompt})
        stream = stream_chat(model, tok, messages, params=_sampling(args), max_new_tokens=args.max_tokens,
                             stop=args.stop, allow_image_paths=True, completion=completion, kv_cache=args.kv_cache)
    for piece in stream:
        if show and not args.json:
            print(piece, end="", flush=True)
    if finished is not None:
        finished(completion.tokens)
    if not show:
        return 0
    if args.json:
        print(json.dumps({
            "text": completion.text, "tokens": completion.tokens, "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": len(completion.tokens), "finish_reason": completion.finish_reason,
            "prefill_seconds": round(completion.prefill_seconds, 4),
            "decode_seconds": round(completion.decode_seconds, 4),
            "decode_tokens_per_second": round(completion.decode_tokens_per_second, 2),
        }))
    else:
        print()
        if not args.quiet:
            print(_speed(completion), file=sys.stderr)
    return 0


def _speed(c) -> str:
    prefill = c.prompt_tokens / c.prefill_seconds if c.prefill_seconds else 0.0
    return (f"[{c.prompt_tokens} prompt tokens at {prefill:.0f} tok/s, {len(c.tokens)} generated at "
            f"{c.decode_tokens_per_second:.1f} tok/s]")


CHAT_HELP = "commands: /image PATH (attach to your next message), /reset, /quit; Ctrl-C stops an answer"


def cmd_chat(args: argparse.Namespace) -> int:
    from llama4.inference.text import ChatSession

    model, tok = _load(args)
    session = ChatSession(model, tok, system=args.system, params=_sampling(args), max_new_tokens=args.max_tokens,
                          kv_cache=args.kv_cache)
    images: list[str] = []
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            session.reset()
            images.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/image"):
            path = text[len("/image"):].strip()
            if not path:
                print("usage: /image PATH", file=sys.stderr)
            else:
                images.append(path)
                print(f"(image {path} will go with your next message)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; " + CHAT_HELP, file=sys.stderr)
            continue
        try:
            for piece in session.send(text, images):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
        except ValueError as e:  # a bad image, a model without vision, ...
            print(f"error: {e}", file=sys.stderr)
            images.clear()
            continue
        images.clear()
        print()
        if session.last is not None and not args.quiet:
            print(_speed(session.last), file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from llama4.train.command import run_recipe, run_train

    if not args.recipe:
        return run_train(args)
    from llama4.evaluation import evaluate_and_card

    final = run_recipe(args)
    report = evaluate_and_card(final, args.data_dir)
    print(f"model written to {final}: held-out perplexity {report['perplexity']['perplexity']:.2f}, "
          + ", ".join(f"{k} questions {v['accuracy']:.1%}" for k, v in report["pictures"].items()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llama4.evaluation import evaluate_model

    model, tok = _load(args)
    report = {"model": str(args.model or "embedded"),
              **evaluate_model(model, tok, args.data_dir, pictures=args.images, window=args.window,
                               max_windows=args.max_windows, with_samples=args.samples, seed=args.seed)}
    ppl = report["perplexity"]
    print(f"held-out TinyStories: perplexity {ppl['perplexity']:.2f} over {ppl['tokens']:,} tokens "
          f"(unigram baseline {ppl['unigram_baseline']:.1f})", file=sys.stderr)
    for kind, r in report.get("pictures", {}).items():
        print(f"picture {kind} questions: {r['accuracy']:.1%} right of {r['questions']} "
              f"(chance {r['chance']:.1%})", file=sys.stderr)
    for s in report.get("samples", []):
        print(f"--- {s['kind']}: {s['prompt']!r} ({s['tokens_per_s']:.0f} tok/s)\n{s['output']}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import random

    from llama4.inference.text import Completion, stream_chat, stream_tokens_as_text
    from llama4.train.shapes import describe, draw_scene

    model, tok = _load(args)

    def show(title: str, stream, completion, prefix: str = "") -> None:
        print(f"\n== {title}\n{prefix}", end="")
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        print(_speed(completion), file=sys.stderr)

    opening = "Once upon a time, there was a little dog named"
    c = Completion()
    show("story continuation", stream_tokens_as_text(model, tok, tok.encode(opening, bos=True),
                                                      max_new_tokens=args.max_tokens, completion=c), c, opening)
    question = "Who are you?"
    c = Completion()
    show(f"chat: {question!r}", stream_chat(model, tok, [{"role": "user", "content": question}],
                                            max_new_tokens=args.max_tokens, completion=c), c)
    if model.config.multimodal:
        image, scene = draw_scene(random.Random(args.seed))
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "What is in the picture?"}]}]
        c = Completion()
        show(f"a freshly drawn picture ({describe(scene)[len('I see '):]}): 'What is in the picture?'",
             stream_chat(model, tok, messages, max_new_tokens=args.max_tokens, completion=c), c)
    return 0


# what `llama4 quantize` copies beside the weights, so that its output is a complete checkpoint
CHECKPOINT_SIDE_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                         "chat_template.jinja", "chat_template.json", "generation_config.json",
                         "preprocessor_config.json", "processor_config.json")


# `llama4 quantize --calibrate gptq`: TinyStories' *train* split (the held-out text is the validation split)
DEFAULT_CALIBRATION = "../shared/data/tinystories/tinystories_train_head.jsonl.gz"
CALIBRATION_TOKENS, CALIBRATION_LENGTH = 32768, 512


def cmd_quantize(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    import llama4
    from llama4.quant import summary_text

    _setup_torch(args)
    source = llama4.build.resolve_model_path(args.model)
    out = Path(args.out)
    if out.exists() and out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the checkpoint being quantized; choose another directory")
    if args.calibrate is None:
        given = [flag for flag, value in (("--calibration-data", args.calibration_data),
                                          ("--calibration-tokens", args.calibration_tokens),
                                          ("--calibration-length", args.calibration_length)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --calibrate gptq")
        model = llama4.load_model(source, dtype=torch_dtype(args.dtype), pack=False, quant=args.recipe)
    else:
        from llama4.quant import QuantRecipe
        from llama4.quant.gptq import calibration_windows, gptq_quantize_model

        recipe = QuantRecipe.parse(args.recipe)  # a bad recipe is refused before anything loads
        tokens = CALIBRATION_TOKENS if args.calibration_tokens is None else args.calibration_tokens
        length = CALIBRATION_LENGTH if args.calibration_length is None else args.calibration_length
        if tokens < 1 or length < 2:
            raise ValueError(f"--calibration-tokens must be >= 1 and --calibration-length >= 2, got {tokens} and "
                             f"{length}")
        tok = llama4.load_tokenizer(source)
        windows = calibration_windows(args.calibration_data or DEFAULT_CALIBRATION, tok, tokens, length,
                                      separator=tok.end_of_text_id)
        model = llama4.load_model(source, dtype=torch_dtype(args.dtype), pack=False)
        if not args.quiet:
            print(f"GPTQ calibration: {windows.shape[0]} windows of {windows.shape[1]} tokens")
        gptq_quantize_model(model, recipe, windows, progress=None if args.quiet else print)
    llama4.save_model(model, out, max_shard_bytes=args.max_shard_bytes)
    copied = [name for name in CHECKPOINT_SIDE_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, out / name)
    if not args.quiet:
        print(summary_text(model))
        print(f"wrote {out} (compressed-tensors layout{', with ' + ', '.join(copied) if copied else ''})")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    p.add_argument("--dtype", choices=sorted(WEIGHT_DTYPES), default="bf16")
    p.add_argument("--quant", help="quantize a float checkpoint as it loads with this recipe, e.g. int8, int4-g32, "
                   "experts=int4-g32,attention=int8 (see llama4 quantize)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or speed line")


KV_CACHE_HELP = ("how the global (NoPE) layers keep keys and values, the part of the cache that grows with the "
                 "context: auto (the model's dtype) or quantized int8 / fp8 with a scale per token and head (about "
                 "half the bytes); chunk-local layers keep one chunk in the model's dtype")


def _add_kv_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache", choices=("auto", "int8", "fp8"), default="auto", help=KV_CACHE_HELP)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--system", help="system prompt")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tensor / expert parallel", "run under torchrun --nproc-per-node N -m llama4 ... "
                             "(docs/DISTRIBUTED.md); only rank 0 prints")
    g.add_argument("--tp", type=int, help="tensor-parallel degree: 1 or the number of ranks (default: the number "
                   "of ranks, or 1 with --ep alone covering every rank)")
    g.add_argument("--ep", type=int, help="expert-parallel degree, dividing the number of ranks (default: the "
                   "number of ranks, or 1 with --tp alone)")
    g.add_argument("--cp", type=int, help="context-parallel degree: the prompt prefilled in slices over this many "
                   "ranks, the global layers' KV cache split over them; the job has cp x max(tp, ep) ranks (--tp / "
                   "--ep default to the ranks of one context group)")
    g.add_argument("--prefill-chunk", type=int, help="with --cp: each rank prefills its slice in pieces of this many "
                   "tokens, layer by layer (default: the model's attention chunk)")
    g.add_argument("--dist-timeout", type=float, default=300.0, help="seconds a collective may wait for the other "
                   "ranks before the run ends with an error (default 300)")
    g.add_argument("--dist-device", choices=("cpu", "cuda"), default="cpu", help="each rank's device: cpu (gloo) "
                   "or cuda (nccl, cuda:LOCAL_RANK)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama4", description="Llama 4 in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="layer schedule, parameter counts and weight memory")
    source = info.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory (Hugging Face layout)")
    source.add_argument("--preset", help="scout, maverick, behemoth, tiny or small (default: the embedded model)")
    info.add_argument("--json", action="store_true", help="print the figures as JSON")
    info.add_argument("--context", type=int, help="memory plan: the KV cache (and total) at this many tokens")
    info.add_argument("--quant", help="memory plan: weights under this quantization recipe, e.g. int8, int4, fp8 "
                      "(an FP8 checkpoint: loaded as int8 per channel), "
                      "int4-g128-asym, experts=int4-g32,attention=int8,shared=int8,head=int8 (add scales=bf16); "
                      "default: bf16 weights")
    info.add_argument("--dtype", choices=("bf16", "fp32", "fp8"), help="memory plan: the checkpoint's dtype (default "
                      "bf16): the float weights and activations in bf16 or fp32; fp8: an FP8 checkpoint (Maverick "
                      "FP8), the same as --quant fp8 with the rest in bf16")
    info.add_argument("--kv", choices=("bf16", "fp32", "int8", "fp8"), help="memory plan: KV cache dtype (default "
                      "bf16; int8 / fp8: the global layers quantized, a bf16 scale per token and head, chunked "
                      "layers bf16)")
    info.add_argument("--memory", help="memory plan: the largest context that fits in this much memory "
                      "(80GiB, 24GB, 512MiB or bytes; per device with --tp / --ep)")
    info.add_argument("--tp", type=int, help="memory plan per device under tensor parallelism over this many "
                      "devices (1 or the number of devices; docs/DISTRIBUTED.md)")
    info.add_argument("--ep", type=int, help="memory plan per device with the routed experts split this many ways")
    info.add_argument("--cp", type=int, help="memory plan per device with context parallelism over this many "
                      "groups: --context is a prompt prefilled in cp slices, the global layers' KV split cp ways")
    info.add_argument("--prefill-chunk", type=int, help="memory plan: prompt tokens per prefill piece (default 256, "
                      "the engine's; with --cp: the attention chunk, as generate --cp)")
    info.add_argument("--finetune", choices=("lora", "qlora"), help="memory plan for fine-tuning on one device "
                      "(batch 1, --context tokens, default 4096): frozen base (bf16; qlora: --quant, default int4), "
                      "adapters, gradients, AdamW, activations with and without gradient checkpointing")
    info.add_argument("--lora-rank", type=int, help="with --finetune: adapter rank (default as llama4 finetune: 8)")
    info.add_argument("--lora-targets", help="with --finetune: comma-separated targets (default as llama4 "
                      "finetune: attention)")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="generate a reply (chat format) or a raw continuation")
    gen.add_argument("prompt", nargs="?", help="the prompt (default: read standard input)")
    gen.add_argument("--image", action="append", default=[], help="image file to include (repeatable)")
    gen.add_argument("--raw", action="store_true", help="continue the text as is, without the chat template")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and timings")
    _add_model_args(gen)
    _add_sampling_args(gen)
    _add_kv_cache_arg(gen)
    _add_parallel_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_model_args(chat)
    _add_sampling_args(chat)
    _add_kv_cache_arg(chat)
    chat.set_defaults(func=cmd_chat)

    ev = sub.add_parser("eval", help="held-out perplexity, picture-question accuracy and samples")
    ev.add_argument("--data-dir", default="../shared/data", help="the shared data folder (held-out text)")
    ev.add_argument("--images", type=int, default=500, help="fresh pictures to ask about (0: skip)")
    ev.add_argument("--window", type=int, default=1024, help="perplexity window in tokens")
    ev.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    ev.add_argument("--samples", action="store_true", help="also print a few unedited greedy samples")
    ev.add_argument("--seed", type=int, default=0, help="picture seed (training never used these pictures)")
    ev.add_argument("--json", action="store_true", help="print the report as JSON")
    ev.add_argument("--out", help="also write the JSON report to this file")
    _add_model_args(ev)
    ev.set_defaults(func=cmd_eval)

    demo = sub.add_parser("demo", help="a story, a chat answer and a picture answer from the model")
    demo.add_argument("--max-tokens", type=int, default=80)
    demo.add_argument("--seed", type=int, help="seed of the picture (default: a new one each run)")
    _add_model_args(demo)
    demo.set_defaults(func=cmd_demo)

    quant = sub.add_parser("quantize", help="write a quantized checkpoint (compressed-tensors layout)")
    quant.add_argument("--model", help="float checkpoint directory (default: the embedded model)")
    quant.add_argument("--out", required=True, help="directory to write the quantized checkpoint to")
    quant.add_argument("--recipe", required=True, help="int8, int4 (= int4-g32), int4-g64, int4-g128-asym, or per "
                       "kind: experts=int4-g32,attention=int8,shared=int8,head=int8 (add scales=bf16)")
    quant.add_argument("--dtype", choices=sorted(WEIGHT_DTYPES), default="bf16",
                       help="dtype of the weights kept float (embeddings, norms, routers, vision) and of the model")
    quant.add_argument("--calibrate", choices=["gptq"],
                       help="choose the codes with GPTQ on calibration text (default: round to nearest); int8 and "
                       "int4 formats (docs/QUANTIZATION.md)")
    quant.add_argument("--calibration-data", metavar="PATH",
                       help=f"calibration text: .txt or .jsonl (a \"text\" per line), optionally .gz (default: "
                       f"{DEFAULT_CALIBRATION})")
    quant.add_argument("--calibration-tokens", type=int, metavar="N",
                       help=f"calibration tokens to read (default {CALIBRATION_TOKENS})")
    quant.add_argument("--calibration-length", type=int, metavar="N",
                       help=f"tokens per calibration window (default {CALIBRATION_LENGTH})")
    quant.add_argument("--max-shard-bytes", type=int, help="split the weights into files of at most this many bytes")
    quant.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    quant.add_argument("--quiet", action="store_true", help="no summary")
    quant.set_defaults(func=cmd_quantize)

    from llama4.train.command import add_train_parser

    add_train_parser(sub).set_defaults(func=cmd_train)
    from llama4.train.finetune import add_finetune_parser

    add_finetune_parser(sub)
    from llama4.serve.command import add_serve_parser
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"llama4: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
