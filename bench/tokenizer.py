"""Tokenizer encode throughput: llama4.prompt (tiktoken core) vs the Hugging Face `tokenizers` library.

Both sides load the same vocabulary (our tokenizer.json for `tokenizers`) and must produce identical
ids; the script checks that before timing. Vocabularies: Meta's Llama 4 tokenizer.model (if
../shared/data is present or --tokenizer is given) and an 8k vocabulary trained here with our trainer.

    python bench/tokenizer.py [--mb 8] [--tokenizer PATH] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

from llama4.prompt import Tokenizer, load_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def load_corpus(mb: float) -> list[str]:
    """TinyStories train head as documents, repeated until the corpus holds ``mb`` MB of UTF-8."""
    path = DATA / "tinystories" / "tinystories_train_head.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    out, size = [], 0
    while size < mb * 1e6:
        for d in docs:
            out.append(d)
            size += len(d.encode("utf-8"))
            if size >= mb * 1e6:
                break
    return out


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_vocab(label: str, tok: Tokenizer, tok_dir: Path, docs: list[str], repeats: int) -> list[tuple]:
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    text = "".join(docs)
    mb = len(text.encode("utf-8")) / 1e6
    threads = os.cpu_count() or 1
    rows = []

    t_ours, ids_ours = best_of(repeats, lambda: tok.encode(text))
    t_hf, enc_hf = best_of(repeats, lambda: hf.encode(text, add_special_tokens=False))
    assert ids_ours == enc_hf.ids, "ids differ between llama4.prompt and tokenizers"
    rows.append((label, "one string", "llama4.prompt", mb / t_ours, len(ids_ours)))
    rows.append((label, "one string", "tokenizers", mb / t_hf, len(enc_hf.ids)))

    t_ours_b, batch_ours = best_of(repeats, lambda: tok.encode_batch(docs, num_threads=threads))
    t_hf_b, batch_hf = best_of(repeats, lambda: hf.encode_batch(docs, add_special_tokens=False))
    assert batch_ours == [e.ids for e in batch_hf], "batched ids differ"
    n = sum(map(len, batch_ours))
    rows.append((label, f"{len(docs)} docs, {threads} threads", "llama4.prompt", mb / t_ours_b, n))
    rows.append((label, f"{len(docs)} docs, {threads} threads", "tokenizers", mb / t_hf_b, n))

    t_dec, _ = best_of(repeats, lambda: tok.decode(ids_ours))
    t_hf_dec, _ = best_of(repeats, lambda: hf.decode(ids_ours))
    rows.append((label, "decode", "llama4.prompt", mb / t_dec, len(ids_ours)))
    rows.append((label, "decode", "tokenizers", mb / t_hf_dec, len(ids_ours)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=8.0, help="corpus size in MB (TinyStories, repeated)")
    parser.add_argument("--tokenizer", type=Path, default=DATA / "llama4-tokenizer" / "tokenizer.model")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    docs = load_corpus(args.mb)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        small = train_tokenizer(docs[:5061], 8000, out_dir=Path(tmp) / "small")
        train_s = time.perf_counter() - start
        rows += bench_vocab(f"trained {small.num_base_tokens}", small, Path(tmp) / "small", docs, args.repeats)
        if args.tokenizer.exists():
            real = load_tokenizer(args.tokenizer)
            real.save(Path(tmp) / "real")
            rows += bench_vocab("Llama 4 200k", real, Path(tmp) / "real", docs, args.repeats)
        else:
            print(f"(skipping the Llama 4 vocabulary: {args.tokenizer} not found)")

    corpus_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"\ncorpus: TinyStories train head, {corpus_mb:.1f} MB, {len(docs)} documents; best of {args.repeats}")
    print(f"trainer: 8k vocabulary from {sum(len(d) for d in docs[:5061]) / 1e6:.1f}M chars in {train_s:.1f} s\n")
    print(f"| {'vocabulary':<14} | {'mode':<24} | {'implementation':<14} | {'MB/s':>7} | {'tokens':>9} |")
    print(f"|{'-' * 16}|{'-' * 26}|{'-' * 16}|{'-' * 9}|{'-' * 11}|")
    for vocab, mode, impl, mbps, n in rows:
        print(f"| {vocab:<14} | {mode:<24} | {impl:<14} | {mbps:7.2f} | {n:9d} |")


if __name__ == "__main__":
    main()
