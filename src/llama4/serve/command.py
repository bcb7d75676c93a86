"""``llama4 serve``: arguments, model loading and the uvicorn run."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llama4.dtypes import WEIGHT_DTYPES
from llama4.serve.limits import DEFAULT_STALL_TIMEOUT, ServeLimits
from llama4.serve.remote_images import RemoteImagePolicy


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions, web chat page)")
    p.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="the names clients may send as 'model' (responses carry the first; default: the "
                        "checkpoint directory's name, or 'llama4-tiny' and 'llama4' for the embedded model)")
    p.add_argument("--model-id", help="one name clients send (the same as --served-model-name NAME)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (visible to other users in "
                                      "ps: prefer --api-key-file or the LLAMA4_API_KEY environment variable)")
    p.add_argument("--api-key-file", type=Path, help="read the API key from this file (its first line)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-context", type=int, help="tokens per sequence, prompt included (default: the model's)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill piece")
    p.add_argument("--prefix-cache-mb", type=float, default=256,
                   help="memory for finished conversations' caches, reused by their next turns (0: off)")
    limits = ServeLimits()
    p.add_argument("--max-body-mb", type=float, default=limits.max_body_bytes / 2**20,
                   help="request body limit in MiB (default: %(default)g)")
    p.add_argument("--max-images", type=int, default=limits.max_images,
                   help="images per request (default: %(default)s)")
    p.add_argument("--max-image-megapixels", type=float, default=limits.max_image_pixels / 1e6,
                   help="declared size of one image, checked before decoding (default: %(default)g)")
    p.add_argument("--max-schema-kb", type=float, default=limits.max_schema_bytes / 2**10,
                   help="size of a response_format or forced tool call JSON schema as compact JSON, in KiB; compile "
                        "time grows with its square (default: %(default)g, about 2,000 properties)")
    p.add_argument("--max-schema-depth", type=int, default=limits.max_schema_depth,
                   help="nesting of such a schema document (default: %(default)s)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs sent by clients (off: only base64 data: URLs); only from public "
                        "addresses on ports 80 and 443 unless the next two flags say otherwise")
    p.add_argument("--remote-image-ports", type=int, nargs="+", metavar="PORT",
                   help="ports remote images may come from (default: 80 443)")
    p.add_argument("--allow-private-image-addresses", action="store_true",
                   help="let remote image URLs reach loopback, private and link-local addresses (the server's own "
                        "network: only where every client is trusted)")
    p.add_argument("--allowed-hosts", nargs="+", metavar="HOST",
                   help="Host header values to answer (default on a loopback address: localhost, 127.0.0.1 and ::1, "
                        "against DNS rebinding; elsewhere: any)")
    p.add_argument("--allowed-origins", nargs="+", metavar="ORIGIN",
                   help="web origins that may call the API from a browser (CORS; default: none but the server's own "
                        "page; '*' for any)")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM / Ctrl-C, how long replies under way may go on before they are ended with an error "
                        "(a second signal ends them at once; default: %(default)g)")
    p.add_argument("--stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT,
                   help="seconds with work waiting and no engine iteration after which the engine counts as stuck: "
                        "/health answers 503 and an engine process is restarted (0: never; default: %(default)g)")
    p.add_argument("--no-batch-invariant", action="store_true",
                   help="let products pick kernels by row count and prefill attend all of a piece's queries "
                        "in one call (faster decode and prefill; a reply at temperature 0 may then differ from "
                        "the same request sent alone, e.g. after a prefix-cache hit)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default="bf16")
    p.add_argument("--quant", help="quantize a float checkpoint as it loads with this recipe, e.g. int8, int4-g32, "
                   "experts=int4-g32,attention=int8 (quantized checkpoints load as they are; see llama4 quantize)")
    p.add_argument("--kv-cache", choices=("auto", "int8", "fp8"), default="auto",
                   help="how the global (NoPE) layers keep keys and values, the part of the cache that grows with the "
                        "context: auto (the model's dtype) or quantized int8 / fp8 with a scale per token and head "
                        "(about half the bytes: --prefix-cache-mb then keeps about twice the tokens)")
    p.add_argument("--lora", nargs="+", metavar="NAME=PATH", default=[],
                   help="serve these LoRA adapters (PEFT directories, as llama4.lora.save_adapter or peft write) "
                        "beside the base: a request's 'model' picks one by NAME. The model then runs unpacked (the "
                        "CPU kernels take no adapters: slower decode, see docs/FINETUNING.md)")
    p.add_argument("--enable-lora", action="store_true",
                   help="let clients load and unload adapters at run time (POST /v1/load_lora_adapter, "
                        "/v1/unload_lora_adapter); the model runs unpacked, as with --lora")
    p.add_argument("--max-loras", type=int, default=4,
                   help="adapters held at once, with --lora / --enable-lora (default: %(default)s)")
    p.add_argument("--max-lora-rank", type=int, default=16,
                   help="the largest adapter rank taken (memory is reserved for it in every slot; default: "
                        "%(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--engine", choices=("process", "thread"), default="process" if os.name == "posix" else "thread",
                   help="run the model in a process of its own (the default where pipes can be handed to a child, "
                        "i.e. POSIX: decoding never waits for the HTTP side's interpreter lock) or in a thread of "
                        "the server process (under torchrun: always a thread of rank 0's process)")
    g = p.add_argument_group("sharded serving (torchrun --nproc-per-node N -m llama4 serve ...; docs/DISTRIBUTED.md)")
    g.add_argument("--tp", type=int, help="tensor-parallel degree: 1 or the number of ranks (default: the number of "
                   "ranks, or 1 with --ep alone covering every rank)")
    g.add_argument("--ep", type=int, help="expert-parallel degree, dividing the number of ranks (default: the number "
                   "of ranks with --tp unset, else 1)")
    g.add_argument("--cp", type=int, help="context-parallel degree: each prompt prefilled in slices over this many "
                   "ranks, its global layers' KV cache split over them; the job has cp x max(tp, ep) ranks. Text "
                   "prompts of at least cp tokens, each prefilled whole (in pieces of --prefill-chunk tokens per "
                   "rank), no prefix cache")
    g.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds a collective may wait for the other ranks before the job ends with an error "
                        "(default: %(default)g)")
    g.add_argument("--dist-device", choices=("cpu", "cuda"), default="cpu",
                   help="each rank's device: cpu (gloo) or cuda (nccl on cuda:LOCAL_RANK)")
    p.set_defaults(func=cmd_serve)
    return p


def served_names(args: argparse.Namespace) -> list[str]:
    """The model names the server answers to, the first one in its responses."""
    from llama4.build import EMBEDDED_NAME

    names = [*(args.served_model_name or []), *([args.model_id] if args.model_id else [])]
    if not names:
        names = [Path(args.model).resolve().name] if args.model else [EMBEDDED_NAME, "llama4"]
    return list(dict.fromkeys(names))


def build_app(args: argparse.Namespace):
    """The app for parsed ``serve`` arguments. With ``--engine process`` the engine process is started
    (and its model loaded) here, so that a checkpoint that does not load fails before serving."""
    from llama4.build import load_model
    from llama4.dtypes import torch_dtype
    from llama4.inference.engine import Engine
    from llama4.prompt import load_tokenizer
    from llama4.serve.app import create_engine_app
    from llama4.serve.engine_process import EngineProcess

    options = app_options(args)
    adapters = lora_modules_of(args, options["model_id"])
    lora = bool(adapters) or args.enable_lora
    config = engine_config_of(args, lora)
    tokenizer = load_tokenizer(args.model)
    if args.engine == "process":
        engine = EngineProcess(args.model, args.dtype, config, threads=args.threads, quant=args.quant, lora=adapters)
        engine.start()
    else:
        model = load_model(args.model, dtype=torch_dtype(args.dtype), kernels=config.kernels, quant=args.quant,
                           pack=False if lora else None)  # adapters need the plain model
        engine = Engine(model, tokenizer, config)
        for name, path in adapters.items():
            try:
                engine.load_adapter(name, path)
            except ValueError as e:
                raise UsageError(f"--lora {name}={path}: {e}") from None
    return create_engine_app(engine, tokenizer, **options)


def app_options(args: argparse.Namespace) -> dict:
    """create_engine_app's options for parsed ``serve`` arguments (UsageError for values that cannot be used)."""
    from llama4.build import resolve_model_path
    from llama4.checkpoint.generation_config import read_generation_defaults
    from llama4.serve.browser_guard import GuardPolicy

    try:
        defaults = read_generation_defaults(resolve_model_path(args.model))
    except ValueError as e:
        raise UsageError(str(e)) from None
    return {"model_id": served_names(args), "api_key": api_key_of(args), "limits": limits_of(args),
            "generation_defaults": defaults,
            "allow_remote_images": remote_image_policy(args), "metrics_need_key": not is_loopback(args.host),
            "guard": GuardPolicy.for_bind(args.host, args.allowed_hosts, tuple(args.allowed_origins or ())),
            "stall_timeout": args.stall_timeout, "runtime_lora": args.enable_lora}


def engine_config_of(args: argparse.Namespace, lora: bool):
    from llama4.inference.engine import EngineConfig

    try:
        return EngineConfig(max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
                            prefill_chunk=args.prefill_chunk, batch_invariant=not args.no_batch_invariant,
                            prefix_cache_bytes=int(args.prefix_cache_mb * 2**20), kv_cache=args.kv_cache,
                            max_loras=args.max_loras if lora else 0, max_lora_rank=args.max_lora_rank)
    except ValueError as e:
        raise UsageError(str(e)) from None


def lora_modules_of(args: argparse.Namespace, served: list[str]) -> dict[str, str]:
    """--lora NAME=PATH ... as {name: path}, checked against the other flags."""
    adapters: dict[str, str] = {}
    for item in args.lora:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--lora takes NAME=PATH (an adapter directory), got {item!r}")
        if name in adapters or name in served:
            raise UsageError(f"--lora {item}: the name {name!r} is taken (by another adapter or the base model)")
        adapters[name] = path
    if (adapters or args.enable_lora) and args.max_loras < 1:
        raise UsageError(f"--max-loras must be >= 1, got {args.max_loras}")
    if len(adapters) > args.max_loras:
        raise UsageError(f"{len(adapters)} adapters given with --lora but --max-loras is {args.max_loras}")
    return adapters


def limits_of(args: argparse.Namespace) -> ServeLimits:
    try:
        return ServeLimits(max_body_bytes=int(args.max_body_mb * 2**20), max_images=args.max_images,
                           max_image_pixels=int(args.max_image_megapixels * 1e6),
                           max_schema_bytes=int(args.max_schema_kb * 2**10), max_schema_depth=args.max_schema_depth)
    except ValueError as e:
        raise UsageError(str(e)) from None


def remote_image_policy(args: argparse.Namespace) -> RemoteImagePolicy | None:
    if not args.allow_remote_images:
        if args.remote_image_ports or args.allow_private_image_addresses:
            raise UsageError("--remote-image-ports and --allow-private-image-addresses need --allow-remote-images")
        return None
    ports = tuple(args.remote_image_ports) if args.remote_image_ports else RemoteImagePolicy().allowed_ports
    try:
        return RemoteImagePolicy(allowed_ports=ports, allow_private=args.allow_private_image_addresses)
    except ValueError as e:
        raise UsageError(str(e)) from None


def api_key_of(args: argparse.Namespace, environ=os.environ) -> str | None:
    """The API key: --api-key, else the first line of --api-key-file, else LLAMA4_API_KEY, else None."""
    if args.api_key is not None and args.api_key_file is not None:
        raise UsageError("give --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        try:
            lines = args.api_key_file.read_text().splitlines()
        except OSError as e:
            raise UsageError(f"cannot read --api-key-file {args.api_key_file}: {e.strerror or e}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise UsageError(f"--api-key-file {args.api_key_file} is empty")
        return key
    key = args.api_key if args.api_key is not None else environ.get("LLAMA4_API_KEY") or None
    if key is not None and not key.strip():
        raise UsageError("the API key is empty")
    return key


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


class UsageError(ValueError):
    """A flag value that cannot be used (reported in one line, exit code 2)."""


SERVE_EXTRA = ("fastapi", "uvicorn", "pydantic")


def missing_serve_packages() -> list[str]:
    import importlib.util

    return [name for name in SERVE_EXTRA if importlib.util.find_spec(name) is None]


def serve_sharded(args: argparse.Namespace, rank: int) -> int:
    """``serve`` on this rank of a torchrun job (llama4.serve.distributed). What cannot be served raises UsageError
    or LaunchError on rank 0; the other ranks find the same and return 2 (rank 0 says it)."""
    from llama4.build import resolve_model_path
    from llama4.distributed.launch import LaunchError, LaunchOptions
    from llama4.quant import QuantRecipe
    from llama4.serve.distributed import serve_distributed

    try:
        if args.lora or args.enable_lora:
            raise UsageError("--lora / --enable-lora cannot be combined with --tp / --ep or torchrun yet: adapters are "
                             "not applied to sharded models")
        if args.quant:
            QuantRecipe.parse(args.quant)  # a bad recipe stops every rank before any loads
        config = engine_config_of(args, lora=False)
        options = LaunchOptions(tp=args.tp, ep=args.ep, cp=1 if args.cp is None else args.cp,
                                timeout_s=args.dist_timeout, device=args.dist_device)
        path = resolve_model_path(args.model)
        served = app_options(args) if rank == 0 else {}  # the API key file, the generation defaults: rank 0's
    except (UsageError, LaunchError, ValueError) as e:
        if rank != 0:
            return 2
        raise UsageError(str(e)) from None
    note = "; rank 0 of {world}, tp={tp} ep={ep} cp={cp}"
    return serve_distributed(args, os.environ, options, path, config, served,
                             lambda **job: print_banner(args, note.format(**job)))


def print_banner(args: argparse.Namespace, note: str = "") -> None:
    where = "all interfaces" if args.host in ("0.0.0.0", "::") else args.host
    print(f"llama4 serve: http://{args.host}:{args.port}/ ({where}{note}); OpenAI base URL "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    missing = missing_serve_packages()
    if missing:
        print(f"llama4: error: llama4 serve needs the serve extra ({', '.join(missing)} not installed): "
              "pip install 'llama4[serve]', or in a checkout: .venv/bin/pip install -e '.[serve]'", file=sys.stderr)
        return 2
    import socket

    import torch
    import uvicorn

    from llama4.distributed.launch import LaunchEnv, LaunchError
    from llama4.serve.shutdown import DrainingServer

    try:
        rank = LaunchEnv.from_environ(os.environ).rank  # under torchrun only rank 0 listens
    except LaunchError as e:
        print(f"llama4: error: {e}", file=sys.stderr)
        return 2
    try:  # a busy port or a bad address fails here, before the banner and before the model loads
        if rank == 0:
            with socket.create_server((args.host, args.port)):
                pass
    except OSError as e:
        print(f"llama4: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tp is not None or args.ep is not None or args.cp is not None or LaunchEnv.launched(os.environ):
        try:
            return serve_sharded(args, rank)
        except (UsageError, LaunchError) as e:
            print(f"llama4: error: {e}", file=sys.stderr)
            return 2
    from llama4.serve.engine_process import EngineStartError

    try:
        app = build_app(args)
    except (EngineStartError, UsageError) as e:
        print(f"llama4: error: {e}", file=sys.stderr)
        return 2
    print_banner(args)
    engine = app.state.engine
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"),
                            args.drain_seconds, lambda: engine.stop(reason="error"))
    server.run()
    return 0
