"""The 2,048-slot Llama 4 special-token layout (reference sheet section 7.1)."""

import pytest

from llama4.prompt import NUM_SPECIAL_SLOTS, special_token_ids, special_token_names

# id -> name, spelled out from the sheet's table for Meta's 200,000-token vocabulary.
META_IDS = {
    200000: "<|begin_of_text|>",
    200001: "<|end_of_text|>",
    200002: "<|fim_prefix|>",
    200003: "<|fim_middle|>",
    200004: "<|fim_suffix|>",
    200005: "<|header_start|>",
    200006: "<|header_end|>",
    200007: "<|eom|>",
    200008: "<|eot|>",
    200009: "<|step|>",
    200010: "<|text_post_train_reserved_special_token_0|>",
    200015: "<|text_post_train_reserved_special_token_5|>",
    200016: "<|python_start|>",
    200017: "<|python_end|>",
    200018: "<|finetune_right_pad|>",
    200019: "<|text_post_train_reserved_special_token_8|>",
    200079: "<|text_post_train_reserved_special_token_68|>",
    200080: "<|image_start|>",
    200081: "<|image_end|>",
    200082: "<|vision_reserved_special_token_0|>",
    200083: "<|vision_reserved_special_token_1|>",
    200084: "<|tile_x_separator|>",
    200085: "<|tile_y_separator|>",
    200086: "<|vision_reserved_special_token_2|>",
    200089: "<|vision_reserved_special_token_5|>",
    200090: "<|image|>",
    200091: "<|vision_reserved_special_token_6|>",
    200092: "<|patch|>",
    200093: "<|vision_reserved_special_token_7|>",
    201133: "<|vision_reserved_special_token_1047|>",
    201134: "<|reasoning_reserved_special_token_0|>",
    201141: "<|reasoning_reserved_special_token_7|>",
    201142: "<|reasoning_thinking_start|>",
    201143: "<|reasoning_thinking_end|>",
    201144: "<|reserved_special_token_0|>",
    202047: "<|reserved_special_token_903|>",
}


def test_meta_layout_matches_reference_table():
    ids = special_token_ids(200_000)
    assert len(ids) == NUM_SPECIAL_SLOTS == 2048
    assert sorted(ids.values()) == list(range(200_000, 202_048))
    for token_id, name in META_IDS.items():
        assert ids[name] == token_id, name


def test_layout_follows_any_base_vocabulary():
    ids = special_token_ids(8000)
    assert ids["<|begin_of_text|>"] == 8000
    assert ids["<|header_start|>"] == 8005
    assert ids["<|eot|>"] == 8008
    assert ids["<|patch|>"] == 8092
    assert max(ids.values()) == 8000 + 2047


def test_names_are_unique_and_well_formed():
    names = special_token_names()
    assert len(set(names)) == 2048
    assert all(n.startswith("<|") and n.endswith("|>") for n in names)


def test_too_small_base_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="at least 256"):
        special_token_ids(100)
