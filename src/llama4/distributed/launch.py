"""Running a command on every rank of a ``torchrun`` job (``torchrun --nproc-per-node N -m llama4 generate --tp T
--ep E [--cp C]``): the process group, each rank's shard, shared sampling settings, and one clear error instead of a
hang.

With context parallelism (``cp`` > 1) the N = cp x max(tp, ep) ranks form the grid of
:func:`~llama4.distributed.context.context_mesh`: each rank loads its tp / ep shard over its inner group, the
global layers' attention is swapped for the context-parallel one, and :meth:`DistributedRun.context_tokens`
prefills the prompt in slices over the context group, then decodes on every rank (docs/DISTRIBUTED.md).

Every rank runs the same command and steps together: each forward meets the others in its collectives, and
sampling agrees because every rank samples from the same logits (they are all-gathered) with the same seed
(rank 0's, broadcast when none is given); :meth:`DistributedRun.check_same` then compares the tokens of all
ranks, so a divergence is an error, not a silent difference. Only rank 0 prints.

Failures. A collective waits at most ``timeout_s`` (the process group's timeout), and a peer that exits closes
its connections, so a survivor's next collective raises instead of hanging. Every rank that fails writes what it
saw to the rendezvous store (``failure/<rank>``: its own exception, or the collective that failed under it).
Ranks other than 0 then exit at once (a rank kept alive would hold the others' collectives until the timeout);
rank 0 prints one message: its own error, or, after a failed collective, the first rank that raised and its
error, else the ranks that left no report (exited, killed or stalled), waiting a short grace for the reports.
torchrun stops the remaining workers with SIGTERM once one has exited: that ends rank 0's wait and the message
is printed with what is known. Where rank 0 itself is the one that died, torchrun's own summary names it. The
environment (RANK, WORLD_SIZE, ...) is read by the command and passed in (:class:`LaunchEnv`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

import torch
import torch.distributed as dist

from llama4.checkpoint.io import CheckpointError, read_quantization_config
from llama4.distributed.context import ContextParallelCache, ContextPlan, context_mesh, context_parallel, prefill
from llama4.distributed.plan import ParallelPlan, PlanError
from llama4.distributed.quantize import quantize_sharded
from llama4.distributed.shard import load_sharded

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(ValueError):
    """A distributed run that cannot start as asked (environment, plan, device); the message says what to do."""


class Terminated(BaseException):
    """SIGTERM arrived (torchrun stops the remaining workers this way when one of them has failed)."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as torchrun describes it in the environment."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None  # None: a single process, its own in-memory store
    master_port: int | None = None
    agent_store: bool = False  # torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE): rank 0 is a client
    attempt: int = 0  # TORCHELASTIC_RESTART_COUNT: an earlier attempt's keys in the store are not read

    @staticmethod
    def launched(environ: Mapping[str, str]) -> bool:
        """Whether the environment is a torchrun (or equivalent) worker's."""
        return "RANK" in environ and "WORLD_SIZE" in environ

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> LaunchEnv:
        """The worker's place from torchrun's variables; a single process (rank 0 of 1) where there are none."""
        if not cls.launched(environ):
            return cls()
        missing = [key for key in TORCHRUN_KEYS if key not in environ]
        if missing:
            raise LaunchError(f"the environment has RANK and WORLD_SIZE but not {', '.join(missing)}: launch with "
                              f"torchrun, or set all of {', '.join(TORCHRUN_KEYS)}")

        def number(key: str) -> int:
            try:
                return int(environ[key])
            except ValueError:
                raise LaunchError(f"{key}={environ[key]!r} is not an integer") from None

        env = cls(rank=number("RANK"), world_size=number("WORLD_SIZE"), local_rank=number("LOCAL_RANK"),
                  master_addr=environ["MASTER_ADDR"], master_port=number("MASTER_PORT"),
                  agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
                  attempt=int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0))
        if not 0 <= env.rank < env.world_size:
            raise LaunchError(f"RANK={env.rank} is outside WORLD_SIZE={env.world_size}")
        return env


@dataclass(frozen=True)
class LaunchOptions:
    """What the command asked for: ``tp`` / ``ep`` (None: chosen from the number of ranks, see
    :func:`resolve_plan`), the collective timeout in seconds, and each rank's device (``cpu``: gloo;
    ``cuda``: nccl on ``cuda:LOCAL_RANK``)."""

    tp: int | None = None
    ep: int | None = None
    cp: int = 1  # context-parallel degree: the job's ranks are cp x max(tp, ep)
    timeout_s: float = 300.0
    device: str = "cpu"
    grace_s: float = 5.0  # how long the reporting rank waits for the others' failure reports

    def __post_init__(self) -> None:
        if self.device not in BACKENDS:
            raise LaunchError(f"device must be one of {', '.join(BACKENDS)}, got {self.device!r}")
        if not self.timeout_s > 0:
            raise LaunchError(f"the collective timeout must be > 0 seconds, got {self.timeout_s}")
        if isinstance(self.cp, bool) or not isinstance(self.cp, int) or self.cp < 1:
            raise LaunchError(f"--cp must be a positive integer, got {self.cp!r}")


def resolve_plan(tp: int | None, ep: int | None, world: int, cp: int = 1) -> ParallelPlan:
    """The tp / ep plan of each inner group when ``world`` ranks run context groups of ``cp`` (the plan covers
    world / cp ranks). Both given as asked; neither: ``tp = ep = world / cp`` (attention, shared expert and head
    split, whole experts per rank); ``ep`` alone: ``tp = 1`` if it covers the inner ranks, else all of them;
    ``tp`` alone: ``ep = 1``. Raises LaunchError when the plan needs another number of ranks."""
    if world % cp:
        need = max(tp or 1, ep or 1) * cp
        raise LaunchError(f"--cp {cp} needs a multiple of {cp} ranks (cp x max(tp, ep) = {need} here), this job "
                          f"has {world}: use torchrun --nproc-per-node {need} -m llama4 ...")
    inner = world // cp
    if tp is None and ep is None:
        tp = ep = inner
    elif tp is None:
        tp = 1 if ep == inner else inner
    elif ep is None:
        ep = 1
    plan = ParallelPlan(tp, ep)
    if plan.world_size * cp != world:
        need = plan.world_size * cp
        grid = f" x cp={cp}" if cp > 1 else ""
        how = (f"torchrun --nproc-per-node {need} -m llama4 ..." if world == 1 else
               f"--nproc-per-node {need}, or a plan for {world} ranks")
        raise LaunchError(f"plan tp={plan.tp}, ep={plan.ep}{grid} needs {need} ranks, this job has {world}: "
                          f"use {how}")
    return plan


class DistributedRun:
    """One rank's side of a run: its plan, device and the helpers every rank calls at the same point."""

    def __init__(self, env: LaunchEnv, plan: ParallelPlan, device: torch.device, context: ContextPlan | None = None,
                 inner_group: dist.ProcessGroup | None = None, context_group: dist.ProcessGroup | None = None):
        self.env, self.plan, self.device = env, plan, device
        self.context = context  # None: no context parallelism (the plan covers every rank)
        self.inner_group, self.context_group = inner_group, context_group

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints."""
        return self.env.rank == 0

    def load(self, path, dtype: torch.dtype, quant: str | None = None):
        """This rank's shard of the checkpoint at ``path`` (:func:`load_sharded` over the inner group: only its
        slices are read; a quantized checkpoint's codes as they are), quantized with the recipe ``quant`` if given
        (:func:`quantize_sharded`: a float checkpoint only); with context parallelism, the global layers'
        attention swapped (:func:`context_parallel`)."""
        if quant is not None:
            stored = read_quantization_config(path)
            if stored is not None:
                raise CheckpointError(f"{path} is already quantized ({stored.get('quant_method')}): load it without "
                                      f"--quant, or quantize its float original")
        model = load_sharded(path, self.plan, group=self.inner_group, dtype=dtype, device=self.device)
        if quant is not None:
            model = quantize_sharded(model, quant, self.plan, group=self.inner_group)
        return context_parallel(model) if self.context is not None else model

    def context_tokens(self, model, prompt: Sequence[int], choose: Callable[[torch.Tensor], int],
                       max_new_tokens: int, stop_tokens: Sequence[int], piece: int | None = None,
                       kv_cache: str = "auto") -> Iterator[int]:
        """The tokens of one reply with a context-parallel prefill: ``prompt`` (the same on every rank) prefilled
        in slices over the context group, each in pieces of ``piece`` tokens (default: the attention chunk), then
        one decode pass per token on every rank; the global layers' shards stored as ``kv_cache`` says (auto, bf16,
        int8, fp8: llama4.quant.kv_storage). ``choose(logits [V]
        float32 on the CPU)`` picks each token (the same sampler state on every rank: the logits are identical
        everywhere). Yields every chosen token, a stop token included, and ends after it or ``max_new_tokens``."""
        if self.context is None:
            raise LaunchError("context_tokens needs a run with --cp > 1")
        if max_new_tokens <= 0:
            return
        self.context.slices(len(prompt))  # a prompt shorter than cp: the plan's error, before any collective
        stops = set(stop_tokens)
        from llama4.quant.kv_cache import kv_storage

        text = model.config.text
        storage = kv_storage(text, kv_cache, model.text.embed.weight.dtype)
        cache = ContextParallelCache(text, self.context, self.context_group, storage=storage)
        ids = torch.tensor([list(prompt)], device=self.device)
        with torch.inference_mode():
            logits = prefill(model, ids, cache, piece or model.config.text.attention_chunk_size)
            for step in range(max_new_tokens):
                token = choose(logits[0].float().cpu())
                yield token
                if token in stops or step == max_new_tokens - 1:
                    return
                logits = model(torch.tensor([[token]], device=self.device), cache=cache)[:, -1]

    def shared_seed(self, seed: int | None) -> int:
        """The sampling seed of every rank: ``seed`` where given (every rank was given the same command), else one
        rank 0 draws, broadcast, so that sampled runs agree too."""
        value = torch.tensor([seed if seed is not None else random.SystemRandom().randrange(2**62)],
                             dtype=torch.int64, device=self.device)
        dist.broadcast(value, src=0)
        return int(value.item())

    def check_same(self, tokens: Sequence[int], capacity: int) -> None:
        """Raises RuntimeError unless every rank generated exactly ``tokens`` (at most ``capacity`` of them)."""
        row = torch.full((capacity + 1,), -1, dtype=torch.int64, device=self.device)
        row[0] = len(tokens)
        row[1:1 + len(tokens)] = torch.tensor(list(tokens), dtype=torch.int64)
        rows = [torch.empty_like(row) for _ in range(self.world_size)]
        dist.all_gather(rows, row)
        differ = [r for r, other in enumerate(rows) if not torch.equal(other, rows[0])]
        if differ:
            raise RuntimeError(f"ranks {differ} generated other tokens than rank 0: the ranks diverged")


def _store(env: LaunchEnv, timeout: datetime.timedelta) -> dist.Store:
    if env.master_addr is None:
        return dist.HashStore()
    return dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                         is_master=env.rank == 0 and not env.agent_store, timeout=timeout)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the main thread while inside (elsewhere the handler stays)."""
    received = []

    def handler(signum, frame):
        if not received:  # the first one interrupts; later ones must not cut the error report short
            received.append(signum)
            raise Terminated("stopped by SIGTERM (torchrun ends the job when a worker has failed)")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_collective_error(error: BaseException) -> bool:
    """A failed collective (a peer gone, a timeout) rather than an error of this rank's own work."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        mark in text for mark in ("gloo", "nccl", "connection closed", "connection reset", "timed out"))


def _describe(error: BaseException, timeout_s: float) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > 400:
        text = text[:400] + "..."
    if isinstance(error, Terminated):
        return text
    if "timed out" in text.lower() or "timeout" in text.lower():
        return f"a collective got no answer within --dist-timeout {timeout_s:g} s ({type(error).__name__}: {text})"
    return f"{type(error).__name__}: {text}"


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def failure_message(reports: Mapping[int, dict], world: int, reporter: int, timeout_s: float) -> str:
    """The one message of a failed run, from the reports the ranks left (rank -> {"kind", "message"})."""
    raised = sorted(r for r, report in reports.items() if report["kind"] == "error")
    silent = [r for r in range(world) if r not in reports]
    if raised:
        first = raised[0]
        message = f"rank {first} failed: {reports[first]['message']}"
        if len(raised) > 1:
            message += f" (also failed: {_ranks(raised[1:])})"
        return message
    own = reports[reporter]["message"]
    if silent:
        return (f"{_ranks(silent)} stopped taking part (exited, was killed or stalled past --dist-timeout "
                f"{timeout_s:g} s) and left no report; rank {reporter} saw: {own}")
    return f"a collective failed on every rank; rank {reporter} saw: {own}"


class _Reports:
    """The failure reports in the rendezvous store, under this attempt's prefix."""

    def __init__(self, store: dist.Store, env: LaunchEnv):
        self.store = dist.PrefixStore(f"llama4/{env.attempt}/failure", store)
        self.world = env.world_size

    def put(self, rank: int, kind: str, message: str) -> None:
        self.store.set(str(rank), json.dumps({"kind": kind, "message": message}))

    def collect(self, deadline: float) -> dict[int, dict]:
        """Reports present now, waiting until every rank has reported or ``deadline`` (time.monotonic()) passes;
        a SIGTERM ends the wait early."""
        found: dict[int, dict] = {}
        try:
            while True:
                for r in range(self.world):
                    if r not in found and self.store.check([str(r)]):
                        found[r] = json.loads(self.store.get(str(r)))
                if len(found) == self.world or time.monotonic() >= deadline:
                    return found
                time.sleep(0.05)
        except Terminated:
            return found


def _leave_group() -> None:
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


def _fail(env: LaunchEnv, reports: _Reports, error: BaseException, options: LaunchOptions) -> str | None:
    """Report this rank's failure to the store; on rank 0, returns the job's message.

    A rank other than 0 returns at once, so that its process exits and its connections close: a rank still
    alive keeps the others' collectives waiting until the timeout. Rank 0 prints its own error at once; after a
    failed collective it first waits (at most ``grace_s``) for every rank's report, those of ranks that raised
    (written before they exit) included."""
    kind = "collective" if _is_collective_error(error) or isinstance(error, Terminated) else "error"
    message = _describe(error, options.timeout_s)
    try:
        reports.put(env.rank, kind, message)
        if env.rank != 0:
            return None
        found = {0: {"kind": kind, "message": message}}
        if kind == "collective":
            found = reports.collect(time.monotonic() + options.grace_s)
        return failure_message(found, env.world_size, 0, options.timeout_s)
    except Terminated:
        return f"rank {env.rank}: {message}" if env.rank == 0 else None
    except Exception as store_error:  # the store's host is gone: say what this rank knows
        return (f"rank {env.rank}: {message} (the failure reports of the other ranks could not be read: "
                f"{store_error})") if env.rank == 0 else None


def _distributed_run(env: LaunchEnv, plan: ParallelPlan, device: torch.device, cp: int) -> DistributedRun:
    if cp == 1:
        return DistributedRun(env, plan, device)
    inner, context = context_mesh(plan.world_size, cp)  # every rank creates every group, in the same order
    return DistributedRun(env, plan, device, ContextPlan(cp), inner, context)


def run(options: LaunchOptions, environ: Mapping[str, str], body: Callable[[DistributedRun], int],
        err: TextIO | None = None) -> int:
    """Run ``body`` on this rank of the job ``environ`` describes (torchrun's variables; none: a single-rank
    group): process group with ``options.timeout_s`` on every collective, then ``body(run)``, which every rank
    calls with the same arguments. Returns body's status, or 1 after a failure anywhere, which rank 0 prints once
    to ``err`` (:func:`_fail`)."""
    err = err if err is not None else sys.stderr
    env = LaunchEnv.from_environ(environ)
    try:
        plan = resolve_plan(options.tp, options.ep, env.world_size, options.cp)
        if options.device == "cuda" and not torch.cuda.is_available():
            raise LaunchError("--dist-device cuda: no CUDA device is available here")
    except (PlanError, LaunchError) as e:
        if env.rank != 0:  # every rank finds the same problem: rank 0 says it
            return 2
        raise LaunchError(str(e)) from None
    if options.device == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=options.timeout_s)
    store = _store(env, timeout)
    dist.init_process_group(BACKENDS[options.device], store=dist.PrefixStore(f"llama4/{env.attempt}/pg", store),
                            rank=env.rank, world_size=env.world_size, timeout=timeout)
    reports = _Reports(store, env)
    try:
        with _sigterm_raises():
            try:
                return body(_distributed_run(env, plan, device, options.cp))
            except BaseException as error:  # noqa: BLE001 - every failure ends the job with its report
                message = _fail(env, reports, error, options)
            if message is not None:
                print(f"llama4: error: {message}", file=err, flush=True)
        return 1
    finally:
        _leave_group()
