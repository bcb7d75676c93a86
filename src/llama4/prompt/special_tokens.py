"""The Llama 4 special-token layout.

Llama 4 reserves 2,048 special-token slots directly after the base BPE vocabulary. With Meta's
200,000-token vocabulary they occupy ids 200000..202047; a vocabulary with ``n`` base tokens puts
the same names, in the same order, at ``n..n+2047``. Every slot has a name (unused slots are
``..._reserved_special_token_K``), so the whole range decodes to text.

Offsets from the first special id (see the reference sheet, section 7.1)::

    0..4        begin_of_text, end_of_text, fim_prefix, fim_middle, fim_suffix
    5..79       header_start, header_end, eom, eot, step, text_post_train_reserved 0..5,
                python_start, python_end, finetune_right_pad, text_post_train_reserved 8..68
    80..1133    vision: image_start, image_end, tile separators, image, patch, reserved
    1134..1143  reasoning: reasoning_reserved 0..7, reasoning_thinking_start/end
    1144..2047  reserved_special_token_0..903
"""

from __future__ import annotations

NUM_SPECIAL_SLOTS = 2048

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
HEADER_START = "<|header_start|>"
HEADER_END = "<|header_end|>"
EOM = "<|eom|>"
EOT = "<|eot|>"
PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"
PAD = "<|finetune_right_pad|>"
IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
IMAGE = "<|image|>"
PATCH = "<|patch|>"
TILE_X_SEPARATOR = "<|tile_x_separator|>"
TILE_Y_SEPARATOR = "<|tile_y_separator|>"


def _reserved(kind: str, start: int, count: int) -> list[str]:
    return [f"<|{kind}_reserved_special_token_{i}|>" for i in range(start, start + count)]


def special_token_names() -> list[str]:
    """All 2,048 special-token strings in slot order (slot ``k`` gets id ``num_base + k``)."""
    basic = [BEGIN_OF_TEXT, END_OF_TEXT, "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text = (
        [HEADER_START, HEADER_END, EOM, EOT, "<|step|>"]
        + _reserved("text_post_train", 0, 6)
        + [PYTHON_START, PYTHON_END, PAD]
        # The names continue at 8: slots 6 and 7 of this family became python_start/python_end.
        + _reserved("text_post_train", 8, 61)
    )
    vision = (
        [IMAGE_START, IMAGE_END]
        + _reserved("vision", 0, 2)
        + [TILE_X_SEPARATOR, TILE_Y_SEPARATOR]
        + _reserved("vision", 2, 4)
        + [IMAGE]
        + _reserved("vision", 6, 1)
        + [PATCH]
        + _reserved("vision", 7, 1041)
    )
    reasoning = (
        _reserved("reasoning", 0, 8) + ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    )
    named = basic + text + vision + reasoning
    names = named + [f"<|reserved_special_token_{i}|>" for i in range(NUM_SPECIAL_SLOTS - len(named))]
    assert len(names) == NUM_SPECIAL_SLOTS and len(set(names)) == NUM_SPECIAL_SLOTS
    return names


def special_token_ids(num_base_tokens: int) -> dict[str, int]:
    """Map every special-token string to its id for a vocabulary of ``num_base_tokens`` base tokens."""
    if num_base_tokens < 256:
        raise ValueError(
            f"a byte-level vocabulary needs at least 256 base tokens, got {num_base_tokens}"
        )
    return {name: num_base_tokens + i for i, name in enumerate(special_token_names())}
