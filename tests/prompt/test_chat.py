"""Chat layout: golden token sequences (real tokenizer) and parity with transformers' 5.23 template."""

import pytest

from llama4.prompt import encode_chat, image_token_layout, render_chat

BOS, HS, HE, EOT, NL2 = 200000, 200005, 200006, 200008, 368
USER, ASSISTANT, SYSTEM, IPYTHON = [1556], [140680], [15651], [607, 6934]
IMG_START, IMG_END, IMAGE, PATCH, TILE_X, TILE_Y = 200080, 200081, 200090, 200092, 200084, 200085
PY_START, PY_END = 200016, 200017


def header(role):
    return [HS, *role, HE, NL2]


GEN = header(ASSISTANT)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


# -- golden sequences ------------------------------------------------------------------------------


def test_golden_system_and_user(real_tok):
    ids = real_tok.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi!"}]
    )
    you_are_a_helpful_assistant = [4662, 583, 262, 19933, 43910, 26]
    hi = [25181, 13]
    assert ids == [BOS, *header(SYSTEM), *you_are_a_helpful_assistant, EOT, *header(USER), *hi, EOT, *GEN]


def test_golden_multi_turn(real_tok):
    ids = real_tok.apply_chat_template(
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ]
    )
    assert ids == [
        BOS, *header(USER), 25181, 13, EOT,
        *header(ASSISTANT), 19873, 13, 2403, 713, 372, 2520, 43, EOT,
        *header(USER), 105161, 768, 262, 74416, 26, EOT,
        *GEN,
    ]


DESCRIBE_THIS = [51212, 544, 26]


def test_golden_image_one_tile(real_tok):
    msg = {"role": "user", "content": [{"type": "image", "grid": (1, 1)}, {"type": "text", "text": "Describe this."}]}
    image = [IMG_START, IMAGE, *[PATCH] * 144, IMG_END]
    assert len(image) == 147
    assert real_tok.apply_chat_template([msg]) == [BOS, *header(USER), *image, *DESCRIBE_THIS, EOT, *GEN]


def test_golden_image_2x2_grid_plus_global_tile(real_tok):
    msg = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this."}]}
    tile = [PATCH] * 144
    image = [IMG_START, *tile, TILE_X, *tile, TILE_Y, *tile, TILE_X, *tile, TILE_Y, IMAGE, *tile, IMG_END]
    assert len(image) == 2 + 1 + 144 * 5 + 2 * 1 + 2
    assert real_tok.apply_chat_template([msg], image_grids=[(2, 2)]) == [BOS, *header(USER), *image, *DESCRIBE_THIS,
                                                                         EOT, *GEN]


def test_image_layout_length_formula():
    for rows, cols in [(1, 1), (1, 2), (2, 1), (2, 3), (4, 4), (1, 16)]:
        n = 2 + 1 + 144 * (rows * cols + (rows * cols > 1)) + (rows * (cols - 1) + rows if rows * cols > 1 else 0)
        assert len(image_token_layout((rows, cols))) == n


def test_golden_tool_definitions(real_tok):
    ids = real_tok.apply_chat_template([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS)
    instructions = [  # "Given the following functions, ... Do not use variables.\n\n"
        21219, 290, 2182, 5592, 24, 7999, 12017, 517, 262, 8899, 393, 262, 1023, 2925, 517, 1492, 9424, 11894,
        511, 2698, 8860, 290, 2617, 18647, 1574, 116137, 310, 290, 6253, 11906, 946, 1217, 1023, 1327, 24, 392,
        16866, 1217, 23884, 323, 9309, 1327, 341, 1492, 1133, 11560, 5109, 702, 1161, 6437, 1574,
    ]
    tool_json = [  # json.dumps(TOOLS[0], indent=4) + "\n\n"
        785, 277, 392, 2584, 1217, 392, 3333, 1236, 277, 392, 3333, 1217, 414, 322, 392, 946, 1217, 392, 555,
        191381, 1236, 322, 392, 9346, 1217, 392, 2205, 290, 15040, 1236, 322, 392, 16866, 1217, 414, 370, 392,
        2584, 1217, 392, 2760, 1236, 370, 392, 34581, 1217, 414, 529, 392, 23496, 1217, 414, 754, 392, 2584,
        1217, 392, 1795, 898, 529, 630, 370, 1976, 370, 392, 13170, 1217, 4417, 529, 392, 23496, 898, 370, 5899,
        322, 630, 277, 630, 986,
    ]
    weather_in_paris = [38137, 310, 13796, 43]
    assert ids == [BOS, *header(USER), *instructions, *tool_json, *weather_in_paris, EOT, *GEN]


def test_golden_assistant_tool_call(real_tok):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ids = real_tok.apply_chat_template(
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [call]}],
        add_generation_prompt=False,
    )
    # {"name": "get_weather", "parameters": {"city": "Paris"}}
    call_json = [7564, 946, 1217, 392, 555, 191381, 706, 392, 16866, 1217, 11906, 23496, 1217, 392, 65811, 52121]
    assert ids == [
        BOS, *header(USER), 38137, 310, 13796, 43, EOT,
        *header(ASSISTANT), PY_START, PY_END, *call_json, EOT,
    ]


def test_golden_tool_result(real_tok):
    ids = real_tok.apply_chat_template([{"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    quoted_sunny = [14, 47754, 1589, 14]  # the template JSON-quotes string results
    assert ids == [BOS, *header(IPYTHON), *quoted_sunny, EOT, *GEN]


# -- parity with the transformers 5.23 template ----------------------------------------------------

CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
PARITY_CASES = {
    "user only": ([{"role": "user", "content": "What is 2+2?"}], None, {}),
    "system trimmed": ([{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": " hi "}], None, {}),
    "multi turn": (
        [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Arr!"},
            {"role": "user", "content": "Where is the treasure?\n"},
        ],
        None,
        {},
    ),
    "content parts with image": (
        [{"role": "user",
          "content": [{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": " ok?"}]}],
        None,
        {},
    ),
    "tools in user message": ([{"role": "user", "content": "  Weather in Paris?  "}], TOOLS, {}),
    "tools with system": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
        TOOLS,
        {},
    ),
    "tools in system message": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
        TOOLS,
        {"tools_in_user_message": False},
    ),
    "tool call and results": (
        [
            {"role": "user", "content": "Weather in Paris and Köln?"},
            {"role": "assistant", "content": "", "tool_calls": [
                CALL,
                {**CALL, "function": {"name": "get_weather",
                                      "arguments": {"city": "Köln", "days": [1, 2], "unit": None}}},
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "ipython", "content": {"temp": 21.5, "sky": "clear"}},
            {"role": "tool", "content": ["a", 1]},
            {"role": "assistant", "content": "Sunny in both."},
        ],
        TOOLS,
        {},
    ),
    "tool call with content": (
        [{"role": "user", "content": "Go"}, {"role": "assistant", "content": "Checking.", "tool_calls": [CALL]}],
        None,
        {},
    ),
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_matches_transformers_template(real_tok, hf_chat_template, case, add_generation_prompt):
    render_jinja_template = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    messages, tools, extra = PARITY_CASES[case]
    (expected,), _ = render_jinja_template(
        [messages], tools=tools, chat_template=hf_chat_template, add_generation_prompt=add_generation_prompt,
        bos_token="<|begin_of_text|>", **extra,
    )
    assert render_chat(messages, tools=tools, add_generation_prompt=add_generation_prompt, **extra) == expected
    if "image" not in case:
        ours = real_tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, **extra)
        assert ours == real_tok.encode(expected, allow_special=True)
        assert real_tok.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **extra
        ) == expected


def test_expanded_image_string_matches_hf_processor_expansion():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    text = render_chat(messages, image_grids=[(1, 2)], expand_images=True, patches_per_tile=2)
    assert text.endswith(
        "<|image_start|><|patch|><|patch|><|tile_x_separator|><|patch|><|patch|><|tile_y_separator|>"
        "<|image|><|patch|><|patch|><|image_end|>x<|eot|><|header_start|>assistant<|header_end|>\n\n"
    )


# -- training variant --------------------------------------------------------------------------------


def test_assistant_mask_marks_replies_and_their_end_tokens(real_tok):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "A2"},
    ]
    enc = real_tok.encode_chat(messages)
    assert enc.ids == real_tok.apply_chat_template(messages, add_generation_prompt=False)
    assert len(enc.ids) == len(enc.assistant_mask)
    trained = [i for i, m in zip(enc.ids, enc.assistant_mask) if m]
    assert real_tok.decode(trained) == (
        'A1<|eot|><|python_start|><|python_end|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot|>'
        'A2<|eot|>'
    )


def test_assistant_mask_when_reply_shares_a_token_with_the_header(real_tok):
    # "\n\n" + "\nX" pre-tokenizes as "\n\n\n" + "X": the straddling token counts as assistant output.
    enc = encode_chat(real_tok, [{"role": "assistant", "content": "\nX"}], add_generation_prompt=False)
    trained = [i for i, m in zip(enc.ids, enc.assistant_mask) if m]
    assert real_tok.decode(trained) == "\n\n\nX<|eot|>"


def test_generation_prompt_is_not_trained(small_tok):
    enc = small_tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert not any(enc.assistant_mask)


def test_list_contents_where_the_hf_template_misbehaves(real_tok):
    """System lists: every text part (HF keeps only the first); first user message with tools: its parts."""
    messages = [
        {"role": "system", "content": [{"type": "text", "text": " Be "}, {"type": "text", "text": "brief. "}]},
        {"role": "user", "content": [{"type": "text", "text": " Look: "}, {"type": "image", "grid": (1, 1)}]},
    ]
    text = render_chat(messages, tools=TOOLS)
    assert "<|header_start|>system<|header_end|>\n\nEnvironment: ipython\nBe brief.<|eot|>" in text
    assert text.endswith('\n\nLook: <|image|><|eot|><|header_start|>assistant<|header_end|>\n\n')
    ids = real_tok.apply_chat_template(messages, tools=TOOLS)
    assert ids.count(real_tok.patch_id) == 144


def test_tool_call_message_with_null_content_and_string_arguments():
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    text = render_chat([{"role": "assistant", "content": None, "tool_calls": [call]}], add_generation_prompt=False)
    assert text.endswith('<|python_start|><|python_end|>{"name": "f", "parameters": {"a": 1}}<|eot|>')
    # an empty tool_calls list is an ordinary assistant message (HF would drop the message)
    text = render_chat([{"role": "assistant", "content": "hi", "tool_calls": []}], add_generation_prompt=False)
    assert text.endswith("<|header_start|>assistant<|header_end|>\n\nhi<|eot|>")


CONTINUE_CASES = {
    "assistant prefill": [{"role": "user", "content": "Name a colour."},
                          {"role": "assistant", "content": "The colour"}],
    "assistant prefill, text parts": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": [{"type": "text", "text": "Hello, "}]}],
    "an open user message": [{"role": "user", "content": "Complete this sentence: the sky is"}],
}


@pytest.mark.parametrize("case", list(CONTINUE_CASES))
def test_continue_final_message_matches_transformers(real_tok, hf_chat_template, case):
    render_jinja_template = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    messages = CONTINUE_CASES[case]
    (expected,), _ = render_jinja_template([messages], chat_template=hf_chat_template, add_generation_prompt=False,
                                           continue_final_message=True, bos_token="<|begin_of_text|>")
    assert render_chat(messages, add_generation_prompt=False, continue_final_message=True) == expected
    ids = real_tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert ids == real_tok.encode(expected, allow_special=True)


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "user", "content": "Hi"}], "cannot go with add_generation_prompt"),
    ([{"role": "tool", "content": "sunny"}], "cannot be continued"),
    ([{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image"}]}], "end with text"),
])
def test_what_cannot_be_continued_says_why(small_tok, messages, problem):
    add = problem == "cannot go with add_generation_prompt"
    with pytest.raises(ValueError, match=problem):
        small_tok.apply_chat_template(messages, add_generation_prompt=add, continue_final_message=True)
