"""Our trainer's vocabularies: Llama 4 layout, both file formats, parity with the tokenizers library."""

import json
import time

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as hst

from llama4.prompt import Tokenizer, load_tokenizer, train_bpe, train_tokenizer
from llama4.prompt.tokenizer_files import merges_from_ranks


def test_special_tokens_follow_the_learned_vocabulary(small_tok):
    n = small_tok.num_base_tokens  # 4000, or fewer with the small fallback corpus
    assert 256 < n <= 4000
    assert small_tok.vocab_size == n + 2048
    assert small_tok.bos_id == n
    assert small_tok.eos_ids == (n + 1, n + 7, n + 8)
    assert small_tok.patch_id == n + 92


def test_both_formats_load_to_the_same_tokenizer(small_tok_dir, small_tok):
    from_json = load_tokenizer(small_tok_dir / "tokenizer.json")
    from_model = load_tokenizer(small_tok_dir / "tokenizer.model")
    assert from_json.special_tokens == from_model.special_tokens == small_tok.special_tokens
    text = "Once upon a time, Lily's dog ran 1234 metres. Ça va? 你好"
    assert from_json.encode(text) == from_model.encode(text)


def test_config_is_what_transformers_expects(small_tok_dir):
    config = json.loads((small_tok_dir / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|begin_of_text|>"
    assert config["eos_token"] == "<|eot|>"
    assert config["pad_token"] == "<|finetune_right_pad|>"


def test_identical_to_tokenizers_on_multilingual_text(small_tok, hf_small_tok, udhr, training_texts):
    for record in udhr:
        assert (small_tok.encode(record["text"])
                == hf_small_tok.encode(record["text"], add_special_tokens=False).ids), record["code"]
    for text in training_texts[-50:]:
        assert small_tok.encode(text) == hf_small_tok.encode(text, add_special_tokens=False).ids


@settings(max_examples=300, deadline=None)
@given(hst.text(max_size=200))
def test_identical_to_tokenizers_on_random_unicode(small_tok, hf_small_tok, text):
    # tokenizers always parses special-token strings in text (the injection hole we avoid on purpose)
    assume(not any(s in text for s in small_tok.special_tokens))
    assert small_tok.encode(text) == hf_small_tok.encode(text, add_special_tokens=False).ids


@settings(max_examples=100, deadline=None)
@given(hst.text(alphabet=hst.sampled_from(list(" \n\t\r'sdtlmvrei.,!?0123456789aAéЖ中\u0300\u200b\xa0")), max_size=80))
def test_identical_to_tokenizers_on_regex_edge_cases(small_tok, hf_small_tok, text):
    """Contractions, digit groups, combining marks, odd whitespace: where two regex engines differ."""
    assert small_tok.encode(text) == hf_small_tok.encode(text, add_special_tokens=False).ids


def test_transformers_loads_our_files(small_tok_dir, small_tok):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(small_tok_dir / "tokenizer.json"))
    text = "Tom and Sue went to the park."
    assert fast(text).input_ids == small_tok.encode(text, bos=True)
    assert fast.convert_tokens_to_ids("<|eot|>") == small_tok.eot_id
    assert len(fast) == small_tok.vocab_size
    auto = transformers.AutoTokenizer.from_pretrained(str(small_tok_dir))
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (
        small_tok.bos_id, small_tok.eot_id, small_tok.pad_id,
    )
    assert auto.decode(small_tok.encode(text)) == text


def test_real_vocabulary_round_trips_through_tokenizer_json(real_tok, real_tokenizer_path, tmp_path, udhr):
    """Writing Meta's ranks as tokenizer.json gives the 439,802 merges HF's converter derives."""
    assert len(merges_from_ranks(real_tok._ranks)) == 439_802
    real_tok.save(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == real_tokenizer_path.read_bytes()
    again = load_tokenizer(tmp_path / "tokenizer.json")
    for record in udhr[::5]:
        assert again.encode(record["text"]) == real_tok.encode(record["text"])


def test_training_is_deterministic_and_learns_frequent_merges():
    texts = ["the cat sat on the mat. " * 20, "the dog sat on the log. " * 20]
    a, b = train_bpe(texts, 300), train_bpe(list(texts), 300)
    assert a == b
    assert b" the" in a and b" sat" in a
    assert sorted(a.values()) == list(range(len(a)))
    assert all(a[bytes([i])] == i for i in range(256))


def test_training_stops_when_pairs_run_out():
    ranks = train_bpe(["abab"], 10_000)
    assert len(ranks) < 10_000
    tok = Tokenizer(ranks)
    assert tok.decode(tok.encode("abab abba")) == "abab abba"
    assert tok.bos_id == len(ranks)


def test_training_8k_vocabulary_is_fast(training_texts):
    start = time.perf_counter()
    tok = train_tokenizer(training_texts, 8000)
    assert time.perf_counter() - start < 60
    assert tok.num_base_tokens <= 8000 and tok.bos_id == tok.num_base_tokens


def test_identical_to_tokenizers_on_a_multi_megabyte_text(small_tok, hf_small_tok, training_texts):
    """Longer than one 400k encode slice: slices must end on pre-token boundaries."""
    text = "".join(training_texts)
    while len(text) < 1_200_000:
        text += text
    assert small_tok.encode(text) == hf_small_tok.encode(text, add_special_tokens=False).ids


def _slow_reference_bpe(texts, num_base_tokens, min_frequency=2):
    """Recount every pair after every merge; same tie-break (count, then lowest ids) and id reuse."""
    from collections import Counter

    from llama4.prompt.bpe_trainer import count_pieces

    pieces = count_pieces(texts)
    words = {tuple(p): n for p, n in pieces.items()}
    vocab = [bytes([b]) for b in range(256)]
    rank = {t: i for i, t in enumerate(vocab)}
    while len(vocab) < num_base_tokens:
        counts = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] += n
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        if counts[pair] < min_frequency:
            break
        merged = vocab[pair[0]] + vocab[pair[1]]
        if merged not in rank:
            rank[merged] = len(vocab)
            vocab.append(merged)
        new_words = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(rank[merged])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += n
        words = new_words
    return rank


@settings(max_examples=60, deadline=None)
@given(hst.lists(hst.text(alphabet="ab c\nxé", max_size=40), min_size=1, max_size=8))
def test_incremental_trainer_matches_slow_reference(texts):
    """Includes repeats like 'abcabc' where one byte string is reachable by two merges (id reuse)."""
    assert train_bpe(texts, 320) == _slow_reference_bpe(texts, 320)


def test_incremental_trainer_matches_slow_reference_on_real_text(training_texts):
    texts = training_texts[:40]
    assert train_bpe(texts, 600) == _slow_reference_bpe(texts, 600)
