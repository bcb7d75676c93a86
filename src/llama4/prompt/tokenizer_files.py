"""Reading and writing the two on-disk tokenizer formats used by Llama 4 checkpoints.

* Meta's ``tokenizer.model``: a tiktoken rank file, one ``base64(token bytes) SPACE rank`` line per
  base token. Special tokens are not in the file; they follow the base vocabulary (special_tokens.py).
* Hugging Face's ``tokenizer.json`` (plus ``tokenizer_config.json``): a byte-level BPE with a vocab of
  byte-level-encoded strings, a merge list, and the special tokens as "added tokens".

Both describe the same thing for Llama 4: a BPE whose merge priority is the token's rank. Converting
ranks to merges (:func:`merges_from_ranks`) and merges back to ranks (the rank is the token id) is
exact as long as the merge list is ordered by the rank of the merged token, which is checked on load.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from .special_tokens import BEGIN_OF_TEXT, EOT, PAD, special_token_ids

# The o200k-style pre-tokenizer regex of Llama 4 (reference sheet section 8), verbatim.
PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


def byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet of HF's ByteLevel pre-tokenizer: every byte maps to one printable char.

    Bytes that are printable Latin-1 characters keep their own code point; the other 68 bytes
    (controls, space, soft hyphen, ...) are mapped, in byte order, to code points 256, 257, ...
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


# ---------------------------------------------------------------------------------------------
# tiktoken rank file


def read_tiktoken_model(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken rank file into ``{token bytes: rank}``."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected two fields")
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except (ValueError, binascii.Error) as e:
                raise ValueError(
                    f"{path}:{lineno} is not a tiktoken rank line ('<base64 token> <rank>'): "
                    f"{line[:80]!r} ({e})"
                ) from None
    if not ranks:
        raise ValueError(f"{path} holds no tokens; expected tiktoken '<base64 token> <rank>' lines")
    return ranks


def write_tiktoken_model(path: str | os.PathLike, ranks: dict[bytes, int]) -> None:
    """Write ``{token bytes: rank}`` as a tiktoken rank file, ordered by rank."""
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every way to build each multi-byte token from two smaller tokens, in rank order.

    tiktoken merges whichever adjacent pair forms the lowest-ranked token, however that pair was
    formed, so the HF merge list must hold every split of a token into two vocabulary entries, not
    only the one the trainer used. Merges of the same token are ordered by their parts' ranks.
    """
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def _added_token(token_id: int, content: str) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def hf_tokenizer_json(ranks: dict[bytes, int], specials: dict[str, int], pattern: str = PATTERN) -> dict:
    """The ``tokenizer.json`` document for a tiktoken-style BPE (same layout as Llama 4's).

    All special tokens are registered as added tokens, so both formats agree on every id
    (HF's own converter registers only the first 1,134 of the 2,048 slots).
    """
    to_unicode = byte_to_unicode()

    def as_str(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    bos = specials[BEGIN_OF_TEXT]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, s) for s, i in sorted(specials.items(), key=lambda kv: kv[1])],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", **byte_level},
            ],
        },
        "post_processor": {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                {
                    "type": "TemplateProcessing",
                    "single": [
                        {"SpecialToken": {"id": BEGIN_OF_TEXT, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                    ],
                    "pair": [
                        {"SpecialToken": {"id": BEGIN_OF_TEXT, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                        {"SpecialToken": {"id": BEGIN_OF_TEXT, "type_id": 1}},
                        {"Sequence": {"id": "B", "type_id": 1}},
                    ],
                    "special_tokens": {
                        BEGIN_OF_TEXT: {"id": BEGIN_OF_TEXT, "ids": [bos], "tokens": [BEGIN_OF_TEXT]}
                    },
                },
            ],
        },
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {as_str(t): r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])},
            "merges": [[as_str(a), as_str(b)] for a, b in merges_from_ranks(ranks)],
        },
    }


def hf_tokenizer_config(model_max_length: int = 1048576) -> dict:
    """``tokenizer_config.json`` as transformers loads it for a Llama 4 instruct checkpoint."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BEGIN_OF_TEXT,
        "eos_token": EOT,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "padding_side": "left",
    }


def write_hf_tokenizer(
    directory: str | os.PathLike, ranks: dict[bytes, int], specials: dict[str, int], pattern: str = PATTERN
) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(hf_tokenizer_json(ranks, specials, pattern), f, ensure_ascii=False)
    with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(hf_tokenizer_config(), f, ensure_ascii=False, indent=2)


def _find_split_pattern(pre_tokenizer: dict | None) -> str | None:
    if not pre_tokenizer:
        return None
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    for step in steps:
        if step.get("type") == "Split" and isinstance(step.get("pattern"), dict):
            return step["pattern"].get("Regex")
    return None


def _is_byte_level(doc: dict) -> bool:
    pre = doc.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    return any(s.get("type") == "ByteLevel" for s in steps) or (doc.get("decoder") or {}).get("type") == "ByteLevel"


def read_hf_tokenizer_json(path: str | os.PathLike) -> tuple[dict[bytes, int], dict[str, int], str]:
    """Read a byte-level BPE ``tokenizer.json`` into ``(ranks, special tokens, pattern)``.

    Only tiktoken-compatible files are accepted: model type BPE, byte-level alphabet, dense ids, a
    Split regex pre-tokenizer, and merges ordered by the id of the token they produce. Special
    tokens follow the Llama 4 layout; added tokens in the file take precedence where they differ.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    model_type = model.get("type") if isinstance(model, dict) else None
    if model_type != "BPE" or not _is_byte_level(doc):
        kind = model_type if model_type != "BPE" else "BPE without a ByteLevel pre-tokenizer/decoder"
        raise ValueError(
            f"{path} holds a {kind!s} tokenizer; only byte-level BPE tokenizers (model type 'BPE' with "
            "ByteLevel pre-tokenizer, as Llama 4 uses) are supported"
        )
    pattern = _find_split_pattern(doc.get("pre_tokenizer"))
    if pattern is None:
        raise ValueError(
            f"{path} has no Split(Regex) pre-tokenizer; expected the Llama 4 (o200k-style) split regex"
        )
    from_unicode = {c: b for b, c in byte_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, token_id in model["vocab"].items():
        try:
            ranks[bytes(from_unicode[c] for c in token)] = token_id
        except KeyError:
            raise ValueError(f"{path}: vocab entry {token!r} is not in the byte-level alphabet") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: vocab ids are not the dense range 0..{len(ranks) - 1}")
    _check_merge_order(path, model.get("merges", []), ranks, from_unicode)

    specials = special_token_ids(len(ranks))
    taken = {i: s for s, i in specials.items()}
    for added in doc.get("added_tokens", []):
        content, token_id = added["content"], added["id"]
        if token_id < len(ranks):
            continue  # an ordinary vocabulary entry re-registered as "added"; the BPE already has it
        if content in specials:
            taken.pop(specials[content], None)
        old = taken.pop(token_id, None)
        if old is not None:
            specials.pop(old)
        specials[content] = token_id
        taken[token_id] = content
    return ranks, specials, pattern


def _check_merge_order(path, merges, ranks, from_unicode) -> None:
    """Reject merge lists whose priority is not the merged token's rank (tiktoken can't express them)."""
    previous = -1
    for k, merge in enumerate(merges):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merged = bytes(from_unicode[c] for c in left + right)
        rank = ranks.get(merged)
        if rank is None or rank < previous:
            raise ValueError(
                f"{path}: merge #{k} {left!r} + {right!r} is out of rank order; only tokenizers whose "
                "merge priority equals the merged token's id (tiktoken-style, like Llama 4) are supported"
            )
        previous = rank
