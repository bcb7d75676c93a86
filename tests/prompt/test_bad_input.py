"""Bad input fails with a ValueError / FileNotFoundError that says what was wrong and what is allowed."""

import json

import pytest

from llama4.prompt import Tokenizer, load_tokenizer, render_chat


def test_unknown_role(small_tok):
    with pytest.raises(ValueError, match=r"messages\[1\] has unknown role 'bot'; "
                                         r"allowed roles: system, user, assistant, tool, ipython"):
        small_tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}])


@pytest.mark.parametrize(
    "part, message",
    [
        ({"type": "video"}, "allowed part types: text, image, image_url"),
        ("just a string", "must be a dict with a 'type' key"),
        ({"type": "text"}, "needs a string 'text' field"),
        ({"type": "text", "text": 3}, "needs a string 'text' field"),
    ],
)
def test_malformed_content_part(small_tok, part, message):
    with pytest.raises(ValueError, match=message):
        small_tok.apply_chat_template([{"role": "user", "content": [part]}])


def test_message_shape_errors(small_tok):
    with pytest.raises(ValueError, match="must be a dict with a 'role'"):
        small_tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ValueError, match="messages must be a list"):
        small_tok.apply_chat_template("hello")
    with pytest.raises(ValueError, match="content must be a string, a list of parts or None"):
        small_tok.apply_chat_template([{"role": "user", "content": 42}])
    with pytest.raises(ValueError, match="images are not allowed here"):
        small_tok.apply_chat_template([{"role": "system", "content": [{"type": "image"}]}])


def test_image_grid_errors(small_tok):
    msg = [{"role": "user", "content": [{"type": "image"}]}]
    with pytest.raises(ValueError, match=r"needs its tile grid.*image_grids"):
        small_tok.apply_chat_template(msg)
    with pytest.raises(ValueError, match="image_grids has 2 entries but the messages hold 1 images"):
        small_tok.apply_chat_template(msg, image_grids=[(1, 1), (2, 2)])
    with pytest.raises(ValueError, match=r"\(rows, cols\) with both >= 1"):
        small_tok.apply_chat_template(msg, image_grids=[(0, 2)])


def test_tool_errors(small_tok):
    with pytest.raises(ValueError, match="tools are placed in the first user message"):
        small_tok.apply_chat_template([{"role": "assistant", "content": "x"}], tools=[{"name": "f"}])
    with pytest.raises(ValueError, match="tools_in_user_message=False puts the tools in the system message"):
        render_chat([{"role": "user", "content": "x"}], tools=[{"name": "f"}], tools_in_user_message=False)
    with pytest.raises(ValueError, match="each tool must be a JSON-schema dict"):
        render_chat([{"role": "user", "content": "x"}], tools=["get_weather"])
    bad_call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}
    with pytest.raises(ValueError, match=r"tool_calls\[0\] must look like"):
        render_chat([bad_call])
    bad_args = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}
    with pytest.raises(ValueError, match=r"tool_calls\[0\] \(f\): arguments is not valid JSON"):
        render_chat([bad_args])
    with pytest.raises(ValueError, match="only assistant messages may carry tool_calls"):
        render_chat([{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}])


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer path not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="contains neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(tmp_path)


def test_no_embedded_tokenizer_yet_is_a_clear_error():
    try:
        tok = load_tokenizer()
    except FileNotFoundError as e:
        assert "pass the path" in str(e)
    else:  # once the embedded model ships, loading it must work
        assert isinstance(tok, Tokenizer)


@pytest.mark.parametrize(
    "model, message",
    [
        ({"type": "Unigram", "vocab": [["a", 0.0]]}, "holds a Unigram tokenizer; only byte-level BPE"),
        ({"type": "WordPiece", "vocab": {"a": 0}}, "holds a WordPiece tokenizer; only byte-level BPE"),
    ],
)
def test_tokenizer_json_of_the_wrong_model_type(tmp_path, model, message):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": model, "pre_tokenizer": None, "decoder": None}))
    with pytest.raises(ValueError, match=message):
        load_tokenizer(path)


def test_tokenizer_json_bpe_but_not_tiktoken_style(tmp_path, small_tok_dir):
    doc = json.loads((small_tok_dir / "tokenizer.json").read_text())
    doc["model"]["merges"] = list(reversed(doc["model"]["merges"]))
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="out of rank order"):
        load_tokenizer(tmp_path)
    doc = json.loads((small_tok_dir / "tokenizer.json").read_text())
    doc["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True, "trim_offsets": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="no Split\\(Regex\\) pre-tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_model(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"tokenizer.model:2 is not a tiktoken rank line"):
        load_tokenizer(path)


def test_unknown_token_ids_on_decode(small_tok):
    with pytest.raises(ValueError, match=r"token id 999999 is not in the vocabulary"):
        small_tok.decode([1, 999999])
    with pytest.raises(ValueError, match="is not a special token"):
        small_tok.special_id("<|nope|>")
