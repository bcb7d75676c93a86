"""llama.cpp as a benchmark-only reference: its converter, llama-quantize and GGUF files, for bench/llamacpp.py
and bench/quant_quality.py.

llama.cpp is never a runtime or test dependency of llama4: nothing here imports it or installs it. Every function
takes the llama.cpp folder the caller names (``--llamacpp DIR``) and runs its programs as subprocesses; the GGUF
reader below is a few lines of struct (header, metadata, tensor table), not llama.cpp's gguf-py.

DIR's layout (bench/llamacpp.py's docstring builds it):

- ``DIR/src``: the llama.cpp source tree (``convert_hf_to_gguf.py``, ``gguf-py``);
- ``DIR/build/bin``: its CMake build (``llama-quantize``, ``llama-perplexity``, ``llama-bench``,
  ``llama-batched-bench``); ``DIR/build/CMakeCache.txt`` gives the build flags;
- ``DIR/venv``: a virtual environment with the converter's requirements (torch, transformers, numpy,
  sentencepiece, safetensors, gguf-py from ``DIR/src/gguf-py``), apart from llama4's.

Two things the converter cannot do on its own with llama4's checkpoints, worked around here and only here:

- the pre-tokenizer check: ``convert_hf_to_gguf.py`` recognises a BPE tokenizer by the hash of a test string's
  tokens, and knows no tokenizer trained by this project (the embedded model's) or made up for a benchmark
  shape; :func:`convert` runs the converter with that check pinned to a named pre-tokenizer (``llama4``: the
  embedded tokenizer's split regex is Llama 4's, character for character);
- a benchmark shape's checkpoint has no tokenizer: :func:`stage_checkpoint` links the checkpoint into a folder
  of its own and writes a byte-level BPE tokenizer of the config's vocabulary size there (only speed is measured
  with it). The checkpoint itself is never written to.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# ggml's tensor types by number (ggml.h), for the names only: sizes come from the offsets in the file.
GGML_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 9: "q8_1", 10: "q2_K",
              11: "q3_K", 12: "q4_K", 13: "q5_K", 14: "q6_K", 15: "q8_K", 16: "iq2_xxs", 17: "iq2_xs", 18: "iq3_xxs",
              19: "iq1_s", 20: "iq4_nl", 21: "iq3_s", 22: "iq2_s", 23: "iq4_xs", 24: "i8", 25: "i16", 26: "i32",
              27: "i64", 28: "f64", 29: "iq1_m", 30: "bf16", 34: "tq1_0", 35: "tq2_0", 39: "mxfp4"}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

# Run in llama.cpp's venv: its converter with the BPE pre-tokenizer pinned (argv: source dir, pre name, then the
# converter's own arguments).
_CONVERT = """
import runpy, sys
root, pre = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [root + "/convert_hf_to_gguf.py", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp folder laid out as in the module docstring."""

    root: Path

    def binary(self, name: str) -> Path:
        for folder in (self.root / "build" / "bin", self.root / "bin", self.root):
            if (folder / name).is_file():
                return folder / name
        raise SystemExit(f"{name} not found under {self.root}/build/bin (build it: see bench/llamacpp.py)")

    @property
    def source(self) -> Path:
        for folder in (self.root / "src", self.root):
            if (folder / "convert_hf_to_gguf.py").is_file():
                return folder
        raise SystemExit(f"convert_hf_to_gguf.py not found in {self.root}/src (llama.cpp's source tree)")

    @property
    def python(self) -> Path:
        path = self.root / "venv" / "bin" / "python"
        if not path.is_file():
            raise SystemExit(f"{path} not found: a venv with llama.cpp's converter requirements "
                             "(see bench/llamacpp.py)")
        return path

    def version(self) -> str:
        """``build N, commit C, compiler`` as the binaries report it (``--version``)."""
        for name in ("llama-perplexity", "llama-batched-bench", "llama-bench"):
            try:
                out = subprocess.run([str(self.binary(name)), "--version"], capture_output=True, text=True, timeout=60)
            except SystemExit:
                continue
            text = out.stdout + out.stderr
            match = re.search(r"version: (\S+) \((\w+)\)", text)
            if match:
                built = re.search(r"built with (.*)", text)
                return f"build {match[1]}, commit {match[2]}" + (f", {built[1].strip()}" if built else "")
        return "version unknown"

    def build_flags(self) -> str:
        return build_flags(self.binary("llama-quantize"))


def build_flags(binary: str | Path) -> str:
    """The GGML_* instruction-set options of the build folder the binary came from (its CMakeCache.txt); a
    native build (GGML_NATIVE, -march=native) lists no instruction set there: see the binary's system_info."""
    for folder in Path(binary).resolve().parents:
        cache = folder / "CMakeCache.txt"
        if cache.is_file():
            text = cache.read_text()
            opts = dict(re.findall(r"^(GGML_(?:NATIVE|AVX\w*|AMX\w*|FMA|F16C|OPENMP)):BOOL=(\w+)$", text, re.M))
            on = [k[5:] for k, v in opts.items() if v.upper() in ("ON", "1", "TRUE")]
            off = [k[5:] for k, v in opts.items() if v.upper() not in ("ON", "1", "TRUE")]
            build_type = re.search(r"^CMAKE_BUILD_TYPE:STRING=(\w*)$", text, re.M)
            if "NATIVE" in on:
                rest = " ".join(o for o in on if o != "NATIVE")
                return f"build: {build_type[1] if build_type else '?'}, NATIVE (-march=native), {rest} on"
            return f"build: {' '.join(on)} on; {' '.join(off)} off"
    return "build flags unknown (no CMakeCache.txt above the binary)"


def system_info(output: str) -> str:
    """The CPU features a llama.cpp program reports it was compiled with (its ``system_info`` line)."""
    match = re.search(r"CPU : ([^\n]*)", output)
    if not match:
        return "?"
    return " ".join(k.strip() for k, _, v in (f.partition("=") for f in match[1].split("|")) if v.strip() == "1")


# -- GGUF ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type: str
    shape: tuple[int, ...]  # ggml order: the row length first
    nbytes: int


def read_gguf(path: str | Path) -> tuple[dict, list[GGUFTensor]]:
    """A GGUF file's metadata (key -> value; arrays as lists) and tensors (name, type, shape, bytes)."""
    with open(path, "rb") as f:
        def read(fmt: str):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8", "replace")

        def value(kind: int):
            if kind == 8:
                return string()
            if kind == 9:
                item, count = read("<I"), read("<Q")
                return [value(item) for _ in range(count)]
            return read(_SCALARS[kind])

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version, n_tensors, n_kv = read("<I"), read("<Q"), read("<Q")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        kv = {}
        for _ in range(n_kv):
            key = string()
            kv[key] = value(read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            shape = tuple(read("<Q") for _ in range(read("<I")))
            infos.append((name, read("<I"), shape, read("<Q")))
        alignment = int(kv.get("general.alignment", 32))
        data_start = -(-f.tell() // alignment) * alignment
    end = Path(path).stat().st_size - data_start
    offsets = sorted({info[3] for info in infos}) + [end]
    following = {offset: offsets[i + 1] for i, offset in enumerate(offsets[:-1])}
    tensors = [GGUFTensor(name, GGML_TYPES.get(kind, f"type{kind}"), shape, following[offset] - offset)
               for name, kind, shape, offset in infos]
    return kv, tensors


def tensor_kind(name: str) -> str:
    """The llama4.quant kind a GGUF tensor of a Llama 4 text model belongs to (``other``: router, norms)."""
    if name.startswith("token_embd."):
        return "embeddings"
    if name.startswith("output."):
        return "head"
    if re.search(r"\.attn_(q|k|v|output)\.", name):
        return "attention"
    if re.search(r"\.ffn_(gate|up|down)_exps\.", name):
        return "experts"
    if re.search(r"\.ffn_(gate|up|down)(_shexp)?\.", name):
        return "shared"
    return "other"


def types_by_kind(tensors: list[GGUFTensor]) -> dict[str, Counter]:
    """kind -> Counter of tensor types (how llama-quantize mixed them)."""
    out: dict[str, Counter] = {}
    for t in tensors:
        out.setdefault(tensor_kind(t.name), Counter())[t.type] += 1
    return out


def describe_types(tensors: list[GGUFTensor]) -> str:
    """``attention q8_0 x16; experts q4_K x8, q5_0 x4; ...`` for the kinds a recipe may quantize."""
    kinds = types_by_kind(tensors)
    return "; ".join(f"{kind} " + ", ".join(f"{t} x{n}" for t, n in kinds[kind].most_common())
                     for kind in ("attention", "experts", "shared", "head", "embeddings") if kind in kinds)


def bytes_of(tensors: list[GGUFTensor], kinds: tuple[str, ...]) -> int:
    return sum(t.nbytes for t in tensors if tensor_kind(t.name) in kinds)


def active_bytes(tensors: list[GGUFTensor], experts_used: int, experts: int) -> float:
    """Bytes one batch-1 decoded token reads: every tensor but the embedding table, the routed experts' at
    ``experts_used / experts`` (the roofline's numerator, as bench/generate.py counts ours)."""
    total = 0.0
    for t in tensors:
        kind = tensor_kind(t.name)
        if kind != "embeddings":
            total += t.nbytes * (experts_used / experts if kind == "experts" else 1)
    return total


def check_hparams(kv: dict, text: dict) -> list[str]:
    """Where the GGUF's hyper-parameters differ from the checkpoint's text config (an empty list: none do)."""
    arch = kv.get("general.architecture", "?")
    rope = text.get("rope_parameters") or {}
    expected = {
        "block_count": text.get("num_hidden_layers"),
        "embedding_length": text.get("hidden_size"),
        "attention.head_count": text.get("num_attention_heads"),
        "attention.head_count_kv": text.get("num_key_value_heads"),
        "expert_count": text.get("num_local_experts"),
        "expert_used_count": text.get("num_experts_per_tok"),
        "expert_feed_forward_length": text.get("intermediate_size"),
        "rope.freq_base": rope.get("rope_theta", text.get("rope_theta")),
        "attention.layer_norm_rms_epsilon": text.get("rms_norm_eps"),
        "vocab_size": text.get("vocab_size"),
    }
    problems = []
    for key, want in expected.items():
        have = kv.get(f"{arch}.{key}")
        if key == "vocab_size" and have is None:
            have = len(kv.get("tokenizer.ggml.tokens", []))
        if want is not None and (have is None or abs(float(have) - float(want)) > 1e-6 * abs(float(want))):
            problems.append(f"{arch}.{key} = {have}, config says {want}")
    return problems


# -- preparing GGUFs -------------------------------------------------------------------------------------------


def synthetic_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens (256 bytes, merges of byte pairs, then
    ``<|begin_of_text|>`` and ``<|end_of_text|>``), for a benchmark shape that has none: llama.cpp needs a
    vocabulary to load a model; what the tokens mean does not matter to a speed measurement."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    for b in range(256):  # GPT-2's bytes_to_unicode
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # 188 printable bytes map to themselves, the rest to 256, 257, ...
    chars = [chr(c) for _, c in sorted(zip(bs, cs))]
    vocab = {c: i for i, c in enumerate(chars)}
    merges = []
    for a in chars:
        for b in chars:
            if len(vocab) >= vocab_size - 2:
                break
            vocab[a + b] = len(vocab)
            merges.append(f"{a} {b}")
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    added = [{"id": len(vocab) + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(specials)]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": specials[1],
        "add_bos_token": True, "add_eos_token": False}))


def stage_checkpoint(checkpoint: Path, folder: Path) -> Path:
    """``folder`` with a link to each of the checkpoint's files (the checkpoint is never written to), and a
    synthetic tokenizer where the checkpoint has none."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in Path(checkpoint).resolve().iterdir():
        link = folder / item.name
        if item.is_file() and not link.exists():
            link.symlink_to(item)
    if not (folder / "tokenizer.json").exists():
        config = json.loads((folder / "config.json").read_text())
        vocab = config.get("text_config", config)["vocab_size"]
        synthetic_tokenizer(folder, vocab)
    return folder


def _fresh(out: Path, *sources: Path) -> bool:
    """``out`` exists and is newer than every source (then it is reused)."""
    if not out.is_file():
        return False
    newest = max(p.stat().st_mtime for s in sources for p in ([s] if s.is_file() else s.iterdir()) if p.exists())
    return out.stat().st_mtime > newest


def convert(llamacpp: LlamaCpp, checkpoint: Path, out: Path, outtype: str, pre: str) -> Path:
    """``convert_hf_to_gguf.py CHECKPOINT --outtype OUTTYPE --outfile OUT`` with the pre-tokenizer pinned to
    ``pre`` (reused while newer than the checkpoint; its log beside it)."""
    if _fresh(out, Path(checkpoint)):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(llamacpp.python), "-c", _CONVERT, str(llamacpp.source), pre, str(checkpoint), "--outtype", outtype,
           "--outfile", str(out)]
    log = out.with_suffix(".convert.log")
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=3600,
                              env={**os.environ, "PYTHONPATH": str(llamacpp.source / "gguf-py")})
    if done.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed ({done.returncode}), see {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-15:]))
    return out


def quantize(llamacpp: LlamaCpp, source: Path, out: Path, qtype: str, extra: list[str] = (), threads: int = 2) -> Path:
    """``llama-quantize [EXTRA] SOURCE OUT QTYPE THREADS`` (reused while newer than the source; log beside it)."""
    if _fresh(out, source):
        return out
    cmd = [str(llamacpp.binary("llama-quantize")), *extra, str(source), str(out), qtype, str(threads)]
    log = out.with_suffix(".quantize.log")
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=3600)
    if done.returncode != 0:
        out.unlink(missing_ok=True)
        raise SystemExit(f"llama-quantize failed ({done.returncode}), see {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-15:]))
    return out


# llama-quantize variants: a type, optionally keeping the output head and the token embeddings in the base
# type, as llama4.quant's recipes do (they quantize attention, shared and experts only).
FLOAT_ENDS = "float-ends"


def parse_variant(text: str) -> tuple[str, bool]:
    """``Q4_K_M`` or ``Q4_K_M:float-ends`` -> (type, keep head and embeddings float)."""
    qtype, _, option = text.strip().partition(":")
    if option not in ("", FLOAT_ENDS):
        raise SystemExit(f"unknown llama-quantize variant option {option!r} in {text!r}: only :{FLOAT_ENDS}")
    return qtype, bool(option)


def quantize_variant(llamacpp: LlamaCpp, base: Path, variant: str, base_type: str, threads: int = 2) -> Path:
    """The GGUF of one variant (``Q8_0``, ``Q4_K_M:float-ends``) quantized from ``base`` (of ``base_type``)."""
    qtype, float_ends = parse_variant(variant)
    extra = ["--output-tensor-type", base_type, "--token-embedding-type", base_type] if float_ends else []
    name = base.name.replace(f"-{base_type}.gguf", "") + f"-{qtype}{'-' + FLOAT_ENDS if float_ends else ''}.gguf"
    return quantize(llamacpp, base, base.parent / name, qtype, extra, threads)
