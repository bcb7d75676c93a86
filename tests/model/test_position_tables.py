"""TextModel.position_tables looks rotations and query temperatures up in precomputed tables (IndexedTables): the
values must be exactly the formulas' (rope_table, temperature_scale) at every index, inside the tables and past
them, and follow a model whose inv_freq buffer was cast."""

from __future__ import annotations

import torch

from llama4.model.ops import rope_table, temperature_scale
from llama4.model.transformer import IndexedTables, TextModel
from llama4.presets import text_config

CONFIG = text_config(num_layers=4, vocab_size=64, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16,
                     intermediate_size=32, intermediate_size_mlp=64, num_experts=2, num_experts_per_tok=1,
                     attention_chunk_size=8, floor_scale=4, attn_scale=0.5, bos_token_id=1, eos_token_ids=(2,),
                     pad_token_id=0)


def _temperatures(starts: list[int], t: int) -> torch.Tensor:
    return temperature_scale(torch.tensor(starts)[:, None] + torch.arange(t), CONFIG.floor_scale, CONFIG.attn_scale)


def test_lookups_equal_the_formulas_inside_and_past_the_tables():
    model = TextModel(CONFIG)
    model.indexed_tables = IndexedTables(CONFIG.floor_scale, CONFIG.attn_scale, limit=3000)
    h = torch.zeros(2, 3, CONFIG.hidden_size)
    for starts in ([0, 5], [700, 1021], [2990, 3], [2997, 2996], [5000, 12]):
        positions = torch.tensor(starts)[:, None] + torch.arange(3)
        tables = model.position_tables(h, positions, None)
        assert torch.equal(tables.rope, rope_table(positions, model.inv_freq)), starts
        assert torch.equal(tables.q_scale, _temperatures([0, 0], 3)[:, :, None, None])
        q_scale = model.indexed_tables.temperatures(starts, 3, model.inv_freq, h.device)
        assert torch.equal(q_scale, _temperatures(starts, 3)), starts
        assert model.indexed_tables.size in (1024, 2048, 3000)
    assert model.indexed_tables.size == 3000  # grown by doubling, then held at the limit


def test_decode_steps_read_their_cache_index_temperature():
    model = TextModel(CONFIG)
    for start in (0, 2, 3, 7, 15, 100, 1023, 1024, 40000):
        q_scale = model.indexed_tables.temperatures([start], 1, model.inv_freq, torch.device("cpu"))
        assert torch.equal(q_scale, _temperatures([start], 1)), start


def test_negative_positions_and_a_cast_inv_freq_take_the_formula():
    model = TextModel(CONFIG)
    h = torch.zeros(1, 2, CONFIG.hidden_size)
    positions = torch.tensor([[-3, 4]])
    assert torch.equal(model.position_tables(h, positions, None).rope, rope_table(positions, model.inv_freq))
    before = model.position_tables(h, torch.tensor([[5, 6]]), None).rope
    model.bfloat16()  # casts the inv_freq buffer: the tables follow the buffer the model now holds
    after = model.position_tables(h, torch.tensor([[5, 6]]), None).rope
    assert torch.equal(after, rope_table(torch.tensor([[5, 6]]), model.inv_freq))
    assert not torch.equal(before, after)
