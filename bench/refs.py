"""Before / after a change: our generation speed at another git ref against this checkout, in one run.

    python bench/refs.py d40477c                     # every case, 3 rounds
    python bench/refs.py d40477c --rounds 5 --cases decode-b8 steps-b8

The other ref is checked out into a temporary git worktree (removed afterwards) and each measurement runs
that tree's own ``bench/generate.py --worker`` in a fresh process with its own ``src`` first on the path, so
each side is measured by its own code on the same weights (the ``small`` shape, bf16, as bench/generate.py).
The sides run in turn, round after round (order alternating); the table gives each side's median over the
rounds and the range, because a shared machine's speed drifts within minutes and a median of alternating
rounds samples the drift alike. Nothing is written to docs: a change's before/after belongs in its notes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_name, ensure_checkpoint, markdown_table  # noqa: E402

# name: (worker kind, implementation, a, b) as bench/generate.py's worker takes them
CASES = {
    "decode-b1": ("decode", "llama4", 1, 64),
    "decode-b8": ("decode", "llama4", 8, 32),
    "steps-b1": ("steps", "llama4", 1, 64),
    "steps-b8": ("steps", "llama4", 8, 32),
    "decode-b1-invariant": ("decode", "llama4-invariant", 1, 64),
    "decode-b1-layers": ("decode", "llama4-layers", 1, 64),
    "prefill-2048": ("prefill", "llama4", 2048, 0),
    "prefill-2048-invariant": ("prefill", "llama4-invariant", 2048, 0),
}


def measure(tree: Path, case: tuple, checkpoint: Path, threads: int) -> float | None:
    kind, impl, a, b = case
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    done = subprocess.run([sys.executable, str(tree / "bench" / "generate.py"), "--worker", kind, impl,
                           str(checkpoint), "bfloat16", str(a), str(b), str(threads)],
                          capture_output=True, text=True, env=env, cwd=tree, timeout=1800)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])["tok_s"]
    except (IndexError, ValueError, KeyError):
        print(f"  {tree.name} {case} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref", help="the git ref to compare this checkout against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    checkpoint = ensure_checkpoint("small", Path(tempfile.gettempdir()) / "llama4-bench")
    with tempfile.TemporaryDirectory() as scratch:
        other = Path(scratch) / "ref"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), args.ref], check=True,
                       capture_output=True)
        try:
            sides = {args.ref: other, "this checkout": ROOT}
            rates: dict[tuple[str, str], list[float]] = {(c, s): [] for c in args.cases for s in sides}
            for r in range(args.rounds):
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                for case in args.cases:
                    for side in order:
                        rate = measure(sides[side], CASES[case], checkpoint, args.threads)
                        if rate is not None:
                            rates[(case, side)].append(rate)
                            print(f"round {r + 1} {case} {side}: {rate:.1f} tok/s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False)

    def cell(values: list[float]) -> str:
        if not values:
            return "failed"
        return f"{statistics.median(values):.1f} ({min(values):.0f}-{max(values):.0f}), n={len(values)}"

    rows = []
    for case in args.cases:
        before, after = rates[(case, args.ref)], rates[(case, "this checkout")]
        ratio = f"{statistics.median(after) / statistics.median(before):.2f}" if before and after else "-"
        rows.append([case, cell(before), cell(after), ratio])
    print("\n" + markdown_table(["case", f"{args.ref} tok/s", "this checkout tok/s", "ratio"], rows))
    print(f"\n`small` shape, bf16, {args.threads} threads, median (range) over {args.rounds} alternating rounds, "
          f"each figure from a fresh process; {cpu_name()}.")


if __name__ == "__main__":
    main()
