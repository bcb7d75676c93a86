"""``llama4 serve``: arguments, model loading and the uvicorn run."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llama4.dtypes import WEIGHT_DTYPES


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions, web chat page)")
    p.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="the names clients may send as 'model' (responses carry the first; default: the "
                        "checkpoint directory's name, or 'llama4-tiny' and 'llama4' for the embedded model)")
    p.add_argument("--model-id", help="one name clients send (the same as --served-model-name NAME)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-context", type=int, help="tokens per sequence, prompt included (default: the model's)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill piece")
    p.add_argument("--prefix-cache-mb", type=float, default=256,
                   help="memory for finished conversations' caches, reused by their next turns (0: off)")
    p.add_argument("--max-body-mb", type=float, help="request body limit in MiB (default: 32)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs sent by clients (off: only base64 data: URLs)")
    p.add_argument("--no-batch-invariant", action="store_true",
                   help="let products pick kernels by row count and prefill attend all of a piece's queries "
                        "in one call (faster decode and prefill; a reply at temperature 0 may then differ from "
                        "the same request sent alone, e.g. after a prefix-cache hit)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default="bf16")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--engine", choices=("process", "thread"), default="process" if os.name == "posix" else "thread",
                   help="run the model in a process of its own (the default where pipes can be handed to a child, "
                        "i.e. POSIX: decoding never waits for the HTTP side's interpreter lock) or in a thread of "
                        "the server process")
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
    from llama4.inference.engine import Engine, EngineConfig
    from llama4.prompt import load_tokenizer
    from llama4.serve.app import create_engine_app
    from llama4.serve.engine_process import EngineProcess

    config = EngineConfig(max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
                          prefill_chunk=args.prefill_chunk, batch_invariant=not args.no_batch_invariant,
                          prefix_cache_bytes=int(args.prefix_cache_mb * 2**20))
    tokenizer = load_tokenizer(args.model)
    if args.engine == "process":
        engine = EngineProcess(args.model, args.dtype, config, threads=args.threads)
        engine.start()
    else:
        engine = Engine(load_model(args.model, dtype=torch_dtype(args.dtype), kernels=config.kernels),
                        tokenizer, config)
    model_ids = served_names(args)
    limits = {} if args.max_body_mb is None else {"max_body_bytes": int(args.max_body_mb * 2**20)}
    return create_engine_app(engine, tokenizer, model_id=model_ids, api_key=args.api_key,
                             allow_remote_images=args.allow_remote_images, **limits)


SERVE_EXTRA = ("fastapi", "uvicorn", "pydantic")


def missing_serve_packages() -> list[str]:
    import importlib.util

    return [name for name in SERVE_EXTRA if importlib.util.find_spec(name) is None]


def cmd_serve(args: argparse.Namespace) -> int:
    missing = missing_serve_packages()
    if missing:
        print(f"llama4: error: llama4 serve needs the serve extra ({', '.join(missing)} not installed): "
              "pip install 'llama4[serve]', or in a checkout: .venv/bin/pip install -e '.[serve]'", file=sys.stderr)
        return 2
    import socket

    import torch
    import uvicorn

    try:  # a busy port or a bad address fails here, before the banner and before the model loads
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        print(f"llama4: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from llama4.serve.engine_process import EngineStartError

    try:
        app = build_app(args)
    except EngineStartError as e:
        print(f"llama4: error: {e}", file=sys.stderr)
        return 2
    where = "all interfaces" if args.host in ("0.0.0.0", "::") else args.host
    print(f"llama4 serve: http://{args.host}:{args.port}/ ({where}); OpenAI base URL "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
