"""`torchrun --nproc-per-node 2 -m llama4 generate`: real torchrun jobs (gloo, the embedded model).

The sharded run prints what the single-process command prints (greedy and sampled, same seed), once. A rank
that exits, raises or stalls mid-run ends the job with one error naming it (or the timeout) within the
collective timeout. The faults are injected by running this file as the torchrun script (see the bottom): it
wraps the rank's model so that its N-th forward exits, raises or sleeps, then runs the ``llama4`` command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROMPT = "Once upon a time"
COMMON = ["generate", PROMPT, "--raw", "--max-tokens", "10", "--dtype", "fp32", "--json", "--quiet"]


def _torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([str(torchrun), "--nproc-per-node", "2", "--monitor-interval", "0.2", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=Path(__file__).parent)


def _single(args: list[str], capsys) -> dict:
    from llama4.cli import main

    capsys.readouterr()
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.9", "--top-k", "40", "--seed", "11"]],
                         ids=["greedy", "sampled"])
def test_two_rank_generate_prints_what_one_process_prints(sampling, capsys):
    want = _single(COMMON + sampling, capsys)
    out = _torchrun(["-m", "llama4", *COMMON, *sampling, "--tp", "2", "--ep", "2", "--dist-timeout", "60"])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = _json_lines(out.stdout)
    assert len(lines) == 1, out.stdout  # only rank 0 prints
    assert lines[0]["tokens"] == want["tokens"] and lines[0]["text"] == want["text"]
    assert len(want["tokens"]) == 10


def test_two_rank_generate_quantizes_its_shards_as_one_process_quantizes(capsys):
    """--quant int8 under torchrun: each rank quantizes its shard (int8 rows split over the ranks take the whole
    rows' scales), so the tokens are the single-process quantized model's."""
    want = _single(COMMON + ["--quant", "int8"], capsys)
    out = _torchrun(["-m", "llama4", *COMMON, "--quant", "int8", "--tp", "2", "--dist-timeout", "60"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert [line["tokens"] for line in _json_lines(out.stdout)] == [want["tokens"]]


# long enough to cross the embedded model's 256-token attention chunk: rank 1's slice starts inside chunk 0 (it
# receives that chunk's earlier part) and both ranks must hold the unfinished last chunk for the decode steps
LONG_PROMPT = " ".join(["Once upon a time, a little dog named Max found a red ball in the park."] * 20)


@pytest.mark.parametrize("mode", [["--raw", "--kv-cache", "int8"], ["--temperature", "0.9", "--top-k", "40",
                                                                     "--seed", "5", "--repetition-penalty", "1.2"]],
                         ids=["greedy-raw-int8-kv", "sampled-chat"])
def test_context_parallel_generate_prints_what_one_process_prints(mode, capsys):
    args = ["generate", LONG_PROMPT, "--max-tokens", "8", "--dtype", "fp32", "--json", "--quiet", *mode]
    want = _single(args, capsys)
    out = _torchrun(["-m", "llama4", *args, "--cp", "2", "--dist-timeout", "60"])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = _json_lines(out.stdout)
    assert len(lines) == 1, out.stdout  # only global rank 0 prints
    got = lines[0]
    assert got["prompt_tokens"] == want["prompt_tokens"] > 256  # the prompt crosses a chunk boundary
    assert got["tokens"] == want["tokens"] and got["text"] == want["text"]
    assert got["finish_reason"] == want["finish_reason"]


@pytest.mark.parametrize("args,message", [
    (["Hi", "--raw", "--cp", "4"], "a 2-token prompt cannot be split over cp=4 ranks"),
    ([PROMPT, "--raw", "--cp", "2"], "--cp 2 needs a multiple of 2 ranks (cp x max(tp, ep) = 2 here), this job has "
                                     "1: use torchrun --nproc-per-node 2"),
    ([PROMPT, "--raw", "--cp", "2", "--tp", "2"], "needs a multiple of 2 ranks (cp x max(tp, ep) = 4 here)"),
    ([PROMPT, "--cp", "2", "--image", "x.png"], "images in the prompt are not supported with context parallelism"),
    ([PROMPT, "--cp", "0"], "--cp must be a positive integer, got 0"),
])
def test_context_parallel_refusals_are_clear_errors(args, message, capsys):
    from llama4.cli import main

    assert main(["generate", *args, "--max-tokens", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_a_plan_for_another_number_of_ranks_is_a_clear_error(capsys):
    from llama4.cli import main

    assert main(COMMON + ["--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert "plan tp=2, ep=1 needs 2 ranks, this job has 1" in err and "torchrun --nproc-per-node 2" in err


def _faulty(fault: str, step: int, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    out = _torchrun([Path(__file__).name, fault, str(step), *COMMON, "--max-tokens", "30",
                     "--dist-timeout", str(timeout)])
    return out, time.monotonic() - start


def test_a_rank_that_exits_mid_run_ends_the_job_with_an_error_naming_it():
    out, _ = _faulty("exit", 4, timeout=60)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("llama4: error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "rank 1 stopped taking part" in errors[0], errors[0]
    assert _json_lines(out.stdout) == []


def test_a_rank_that_raises_mid_run_ends_the_job_with_its_error():
    out, _ = _faulty("raise", 4, timeout=60)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("llama4: error:")]
    assert errors == ["llama4: error: rank 1 failed: ValueError: injected fault at forward 4"], out.stderr[-3000:]


def test_a_stalled_rank_ends_the_job_at_the_timeout():
    out, seconds = _faulty("stall", 4, timeout=4)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("llama4: error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "rank 1 stopped taking part" in errors[0] and "--dist-timeout 4 s" in errors[0], errors[0]
    assert seconds < 150  # the stalled rank sleeps 600 s: the job ended on the timeout, not on the sleep


def inject_fault(fault: str, step: int) -> None:
    """Wrap the rank's model (rank 1 only) so that its ``step``-th forward exits / raises / sleeps."""
    import llama4.distributed.launch as launch

    real = launch.load_sharded
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == step:
            if fault == "exit":
                os._exit(3)
            if fault == "raise":
                raise ValueError(f"injected fault at forward {step}")
            time.sleep(600)

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        if os.environ["RANK"] == "1":
            model.register_forward_pre_hook(hook)
        return model

    launch.load_sharded = load


if __name__ == "__main__":  # torchrun ... test_launch.py FAULT STEP llama4-arguments...
    inject_fault(sys.argv[1], int(sys.argv[2]))
    from llama4.cli import main

    sys.exit(main(sys.argv[3:]))
