"""Structured output: JSON-schema compile time and per-token mask time over the real Llama 4 vocabulary,
llama4.inference.constrained (llguidance) against the hand-written engine it replaced, in one run.

    python bench/structured.py [--tokens 64] [--baseline-ref d40477c] [--schemas bench/structured_schemas.json]

The baseline is ``src/llama4/inference/constrained.py`` (and the ``regex_dfa.py`` it imports) as of
``--baseline-ref`` (default d40477c, the last commit that has it), written to a temporary directory and loaded
as a throwaway module; if that ref has no such engine (or it fails to load) the script says so and measures
the current one alone.
For each schema of the corpus (realistic schemas: objects with required and optional properties, enums, nested arrays,
patterns, formats, anyOf/oneOf, $ref/$defs, numeric bounds, tool calls, Kubernetes and GitHub-like
configurations) each implementation compiles the schema (or refuses it), then writes up to ``--tokens``
tokens by sampling uniformly among the allowed ones (seeded; after half the budget it prefers
end-of-sequence, then tokens made of closing characters), timing ``allowed_mask`` at every step. A
finished text must parse as JSON and validate against the schema (``jsonschema``, formats checked).
``--time-budget`` caps the mask time spent on one schema (the old engine can take a second a token).
Torch runs on ``--threads`` threads (default 1: element-wise ops on 200k-entry masks gain nothing from
more, and on a busy machine each parallel region can cost milliseconds, which swamps the measurement).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_name, markdown_table, write_section  # noqa: E402
from llama4.inference import constrained  # noqa: E402
from llama4.prompt import Tokenizer, load_tokenizer  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
ENGINE = "src/llama4/inference/constrained.py"
REGEX_DFA = "src/llama4/inference/regex_dfa.py"
REGEX_DFA_IMPORT = re.compile(r"^from llama4\.inference\.regex_dfa import", re.M)


@dataclass
class Result:
    name: str
    error: str | None = None
    compile_s: float = 0.0
    mask_s: list[float] = field(default_factory=list)
    finished: bool = False
    valid: bool | None = None


def git_show(ref: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def load_baseline(ref: str, tmp: Path):
    """The engine as of ``ref`` as a throwaway module (its regex_dfa import pointed at a copy), or None."""
    try:
        source = git_show(ref, ENGINE)
        if REGEX_DFA_IMPORT.search(source):
            (tmp / "baseline_regex_dfa.py").write_text(git_show(ref, REGEX_DFA))
            source = REGEX_DFA_IMPORT.sub("from baseline_regex_dfa import", source)
        (tmp / "baseline_constrained.py").write_text(source)
        sys.path.insert(0, str(tmp))
        spec = importlib.util.spec_from_file_location("baseline_constrained", tmp / "baseline_constrained.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["baseline_constrained"] = module
        spec.loader.exec_module(module)
        return module
    except (subprocess.CalledProcessError, ImportError, SyntaxError) as e:
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else e
        print(f"(no baseline: the engine at {ref} cannot be loaded: {detail}; measuring the current one alone)")
        return None


def validator(schema):
    try:
        import jsonschema
    except ImportError:
        return None
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


class Walker:
    """Seeded walks through a constraint, the same ending preferences for every implementation."""

    def __init__(self, tok: Tokenizer) -> None:
        n = tok.vocab_size
        self.eos = torch.zeros(n, dtype=torch.bool)
        self.eos[list(tok.eos_ids)] = True
        self.closing = torch.zeros(n, dtype=torch.bool)
        ends = set(b'"]}')
        self.closing[[t for t in range(tok.num_base_tokens) if set(tok.token_bytes(t)) <= ends]] = True
        self.vocab_size = n

    def run(self, constraint, tokens: int, seed: int, budget_s: float, result: Result) -> None:
        g = torch.Generator().manual_seed(seed)
        for step in range(tokens):
            start = time.perf_counter()
            mask = constraint.allowed_mask(self.vocab_size)
            result.mask_s.append(time.perf_counter() - start)
            if step >= tokens // 2:
                for tier in (mask & self.eos, mask & self.closing):
                    if tier.any():
                        mask = tier
                        break
            allowed = mask.nonzero().flatten()
            token = int(allowed[torch.randint(len(allowed), (1,), generator=g)])
            constraint.advance(token)
            if constraint.ended or sum(result.mask_s) > budget_s:
                break
        result.finished = constraint.ended


def bench(impl, tok: Tokenizer, schemas: list[dict], walker: Walker, args) -> tuple[float, list[Result]]:
    """Vocabulary setup time, then one Result per schema."""
    start = time.perf_counter()
    impl.JsonConstraint(tok, {"type": "object"})
    setup_s = time.perf_counter() - start
    results = []
    for i, entry in enumerate(schemas):
        result = Result(entry["name"])
        start = time.perf_counter()
        try:
            constraint = impl.JsonConstraint(tok, entry["schema"])
        except ValueError as e:
            result.error = str(e).splitlines()[0][:100]
            results.append(result)
            continue
        result.compile_s = time.perf_counter() - start
        walker.run(constraint, args.tokens, args.seed + i, args.time_budget, result)
        check = validator(entry["schema"])
        if result.finished and check is not None:
            try:
                result.valid = check.is_valid(json.loads(constraint.text))
            except ValueError:
                result.valid = False
        results.append(result)
        print(f"  {entry['name']:<22} compile {result.compile_s * 1e3:8.1f} ms, {len(result.mask_s):3d} masks, "
              f"max {max(result.mask_s) * 1e3:8.1f} ms{'' if result.finished else ', unfinished'}", flush=True)
    return setup_s, results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary_row(label: str, setup_s: float, results: list[Result]) -> list:
    compiled = [r for r in results if r.error is None]
    masks = [t * 1e3 for r in compiled for t in r.mask_s]
    finished = [r for r in compiled if r.finished]
    valid = sum(r.valid is True for r in finished)
    checked = sum(r.valid is not None for r in finished)
    return [label, f"{len(compiled)}/{len(results)}", f"{len(finished)}", f"{valid}/{checked}" if checked else "n/a",
            f"{setup_s:.2f}", f"{statistics.median(r.compile_s for r in compiled) * 1e3:.1f}" if compiled else "-",
            f"{statistics.median(masks):.2f}" if masks else "-", f"{percentile(masks, 0.99):.2f}" if masks else "-",
            f"{max(masks):.1f}" if masks else "-", len(masks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="most tokens written per schema")
    parser.add_argument("--baseline-ref", default="d40477c", help="git ref of the engine to compare against")
    parser.add_argument("--schemas", type=Path, default=Path(__file__).with_name("structured_schemas.json"))
    parser.add_argument("--tokenizer", type=Path, default=DATA / "llama4-tokenizer" / "tokenizer.model")
    parser.add_argument("--time-budget", type=float, default=8.0, help="most seconds of mask time per schema")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/PERFORMANCE.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if not args.tokenizer.exists():
        raise SystemExit(f"the Llama 4 tokenizer is needed: {args.tokenizer} not found")
    tok = load_tokenizer(args.tokenizer)
    schemas = json.loads(args.schemas.read_text())
    walker = Walker(tok)
    if validator({}) is None:
        print("(jsonschema is not installed: finished texts are parsed, not validated)")
    rows, refusals = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        impls = [(f"hand-written ({args.baseline_ref})", load_baseline(args.baseline_ref, Path(tmp))),
                 ("llguidance (working tree)", constrained)]
        for label, impl in impls:
            if impl is None:
                continue
            print(f"{label}:", flush=True)
            setup_s, results = bench(impl, tok, schemas, walker, args)
            rows.append(summary_row(label, setup_s, results))
            refusals[label] = [(r.name, r.error) for r in results if r.error is not None]

    table = markdown_table(["implementation", "compiled", "finished", "valid", "vocab setup s", "compile median ms",
                            "mask median ms", "mask p99 ms", "mask max ms", "masks"], rows)
    note = (f"{len(schemas)} schemas from bench/{args.schemas.name}, Llama 4 vocabulary ({tok.vocab_size:,} ids), up "
            f"to {args.tokens} tokens each (uniform among the allowed tokens, seed {args.seed}); a finished text "
            f"parsed and validated with jsonschema. {cpu_name()}, {args.threads} torch thread(s), torch "
            f"{torch.__version__}, {time.strftime('%Y-%m-%d')}.")
    print(f"\n{note}\n\n{table}")
    if not args.no_write:
        write_section(ROOT / "docs" / "PERFORMANCE.md", "structured",
                      f"## Structured output (`python bench/structured.py`)\n\n{table}\n\n{note}")
    for label, refused in refusals.items():
        print(f"\nrefused by {label}:")
        for name, error in refused:
            print(f"  {name}: {error}")


if __name__ == "__main__":
    main()
