import gzip
import json

import pytest
import torch

from llama4.train.data import (
    IGNORE,
    BatchIterator,
    ChatExample,
    chat_rows,
    pack,
    pack_chats,
    read_records,
    shuffled,
    text_stream,
)


class FakeTok:
    def encode(self, text):
        return [ord(c) for c in text]


def test_pack_loses_no_token_and_rows_overlap_by_one():
    stream = list(range(100))
    x, y = pack(stream, 8)
    assert x.shape == y.shape == (12, 8)  # (100 - 1) // 8
    assert x.flatten().tolist() == stream[:96]  # inputs tile the stream
    assert y.flatten().tolist() == stream[1:97]  # each token a target exactly once
    assert torch.equal(x[1:, 0], y[:-1, -1])


def test_pack_too_short_raises():
    with pytest.raises(ValueError):
        pack([1, 2, 3], 8)


def test_text_stream_puts_eos_between_records_and_documents_span_rows():
    ids = text_stream(FakeTok(), ["ab", "cde", "f"], eos_id=0)
    assert ids == [97, 98, 0, 99, 100, 101, 0, 102, 0]
    x, y = pack(ids, 4)
    assert x.tolist() == [[97, 98, 0, 99], [100, 101, 0, 102]]  # "cde" spans the row boundary


def test_shuffle_and_batches_are_deterministic_by_seed(rows):
    assert shuffled(list(range(50)), 3) == shuffled(list(range(50)), 3) != shuffled(list(range(50)), 4)
    x, y = rows
    a, b = BatchIterator(x, y, 4, seed=1), BatchIterator(x, y, 4, seed=1)
    for _ in range(40):  # crosses epochs (74 rows -> 18 batches per epoch)
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.epoch == 2


def test_epoch_visits_each_row_once(rows):
    x, y = rows
    it = BatchIterator(x, y, 2, seed=0)
    seen = torch.cat([next(it)[0] for _ in range(len(x) // 2)])
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, x.tolist()))


def test_batch_iterator_resumes_from_its_state(rows):
    x, y = rows
    a = BatchIterator(x, y, 4, seed=2)
    for _ in range(23):
        next(a)
    b = BatchIterator(x, y, 4, seed=2)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(10):
        assert torch.equal(next(a)[0], next(b)[0])
    with pytest.raises(ValueError):
        BatchIterator(x, y, 2, seed=2).load_state_dict(a.state_dict())


def test_chat_packing_masks_non_assistant_targets():
    a = ChatExample([1, 10, 11, 12, 13], [False, False, False, True, True])
    b = ChatExample([1, 20, 21, 22, 23], [False, False, True, True, False])
    x, y = pack_chats([a, b], 3)
    assert x.tolist() == [[1, 10, 11], [12, 13, 1], [20, 21, 22]]
    assert y.tolist() == [[IGNORE, IGNORE, 12], [13, IGNORE, IGNORE], [21, 22, IGNORE]]


def test_chat_rows_put_each_chat_alone_at_position_zero():
    a = ChatExample([1, 10, 11, 12, 13], [False, False, False, True, True])
    b = ChatExample([1, 20, 21], [False, False, True])
    x, y = chat_rows([a, b], 4, pad_id=0)
    assert x.tolist() == [[1, 10, 11, 12], [1, 20, 21, 0]]
    assert y.tolist() == [[IGNORE, IGNORE, 12, 13], [IGNORE, 21, IGNORE, IGNORE]]
    with pytest.raises(ValueError, match="1 chats are longer than a row of 3"):
        chat_rows([a, b], 3, pad_id=0)
    with pytest.raises(ValueError, match="no chats"):
        chat_rows([], 3, pad_id=0)


def test_chat_example_uses_tokenizer_mask(tmp_path):
    from llama4.prompt import train_tokenizer
    from llama4.train.data import chat_example

    tok = train_tokenizer(["hello there, how are you today? fine thanks"] * 20, 300)
    ex = chat_example(tok, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine thanks"}])
    assert len(ex.ids) == len(ex.mask) and any(ex.mask) and not all(ex.mask)
    learned = [i for i, m in zip(ex.ids, ex.mask) if m]
    assert tok.decode(learned).startswith("fine thanks") and learned[-1] == tok.eot_id


def test_read_records_jsonl_gz_and_txt(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write('{"text": "one"}\n\n{"text": "two"}\n')
    assert list(read_records(p)) == ["one", "two"]
    t = tmp_path / "b.txt"
    t.write_text("all of it")
    assert list(read_records(t)) == ["all of it"]
