"""``llama4 serve`` on every rank of a torchrun job: ``torchrun --nproc-per-node N -m llama4 serve --tp T --ep E
[--cp C]`` (with --cp every rank's model calls are llama4.inference.context_runner's: prompts prefilled over the
rank's context group).

Every rank joins the process group and loads its shard (llama4.distributed.launch: a --dist-timeout bound on every
collective, ``load_sharded``). Rank 0 serves: HTTP, and the engine as a thread of its own process (the model's
collectives must come from the process torchrun started as rank 0, so the single-process server's engine child
does not apply), with a :class:`~llama4.inference.sharded.LeaderRunner` that describes each model call to the
other ranks first; those run :func:`~llama4.inference.sharded.follow`.

Stopping. SIGTERM or Ctrl-C on rank 0 drains as a single-process server does (docs/SERVING.md); then rank 0 tells
the followers to stop and every rank exits 0. The followers ignore SIGTERM and SIGINT (Ctrl-C in a terminal
reaches every rank; torchrun passes its own SIGTERM to every rank): they stop when rank 0 says so, or when rank 0
is gone (their wait for its next message fails).

Failures. A follower that dies, raises or stalls makes rank 0's next message fail (a request's model call, or an
idle server's heartbeat), within --dist-timeout: rank 0 stops serving (open replies end with an error) and
``launch.run`` prints one error naming the rank (exit status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
from collections.abc import Callable, Iterator, Mapping


def serve_distributed(args: argparse.Namespace, environ: Mapping[str, str], options, path, config, served: dict,
                      banner: Callable[..., None]) -> int:
    """Serve on this rank of the job ``environ`` describes (every rank runs the same command, checked by the
    caller: llama4.serve.command.serve_sharded): ``options`` (launch.LaunchOptions), the checkpoint ``path``, the
    EngineConfig, rank 0's create_engine_app options ``served``, ``banner(world=, tp=, ep=)`` once it listens."""
    from llama4.distributed import launch
    from llama4.dtypes import torch_dtype

    def body(run: launch.DistributedRun) -> int:
        from llama4.inference.sharded import Channel, ContextSetup, follow

        model = run.load(path, torch_dtype(args.dtype), args.quant)
        channel = Channel(run.device)
        context = None if run.context is None else ContextSetup(run.context, run.context_group)
        if not run.is_main:
            with _signals_ignored():
                follow(model, channel, context)
            return 0
        return _lead(args, run, model, config, served, channel, banner, context)

    return launch.run(options, environ, body)


def _lead(args: argparse.Namespace, run, model, config, served: dict, channel,
          banner: Callable[..., None], context=None) -> int:
    """Rank 0: the server, until it is stopped (0) or a rank fails (the failure is raised for launch.run)."""
    import uvicorn

    from llama4.inference.engine import Engine
    from llama4.inference.sharded import LeaderRunner
    from llama4.prompt import load_tokenizer
    from llama4.serve.app import create_engine_app
    from llama4.serve.shutdown import DrainingServer

    tokenizer = load_tokenizer(args.model)
    # a follower waits for each message at most --dist-timeout: heartbeats well inside it
    runner = LeaderRunner(model, config, channel, heartbeat_s=min(5.0, args.dist_timeout / 4), context=context)
    try:
        engine = Engine(model, tokenizer, config, runner=runner)
        app = create_engine_app(engine, tokenizer, **served)
        server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"),
                                args.drain_seconds, lambda: engine.stop(reason="error"))

        def stop_serving(error: BaseException) -> None:
            server.should_exit = True  # uvicorn's loop notices within a tick; open replies end with an error

        runner.on_failure = stop_serving
        banner(world=run.world_size, tp=run.plan.tp, ep=run.plan.ep, cp=1 if run.context is None else run.context.cp)
        with _signals_ignored():  # uvicorn handles them while it runs, then raises them again: no-ops after it
            server.run()
    finally:
        failure = runner.close()
    if failure is not None:
        raise failure
    return 0


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
