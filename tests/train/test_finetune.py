"""``llama4 finetune``: chat JSONL -> masked examples -> rows -> LoRA training, resume, run directory, CLI."""

import base64
import io
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llama4
from llama4.build import EMBEDDED_DIR
from llama4.config import ModelConfig
from llama4.lora import load_adapter, lora_state_dict
from llama4.presets import LLAMA4_VISION, text_config
from llama4.prompt import load_tokenizer, preprocess_image
from llama4.train.data import IGNORE
from llama4.train.finetune import FinetuneSettings, finetune, load_adapted
from llama4.train.finetune_data import (
    Example,
    RowBatches,
    layout_rows,
    parse_line,
    read_chat_jsonl,
    split_eval,
)
from llama4.train.recipe import file_sha256
from llama4.train.shapes import draw_scene


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(EMBEDDED_DIR)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Count to {i}."},
                         {"role": "assistant", "content": " ".join(str(k) for k in range(1, i + 2))}]}


def picture_chat(image: str | dict, answer: str = "It is a circle.") -> dict:
    part = {"type": "image_url", "image_url": {"url": image}} if isinstance(image, str) else image
    return {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "What shape is it?"}]},
                         {"role": "assistant", "content": answer}]}


def spans(mask: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs of True as (start, end)."""
    out, start = [], None
    for i, m in enumerate(mask + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


# -- examples and their loss masks ----------------------------------------------------------------------------


def test_mask_covers_exactly_the_assistant_turns(tok):
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "system", "content": "You help."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "assistant", "content": [{"type": "text", "text": "It is sunny."}]},
                {"role": "user", "content": "Thanks!"},
                {"role": "assistant", "content": "You are welcome."}]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    ex = parse_line(tok, json.dumps({"messages": messages, "tools": tools}), Path("."), "f.jsonl:1")
    rendered = tok.encode_chat(messages, tools=tools)
    assert ex.ids == rendered.ids and ex.pixels is None
    eot = tok.special_id("<|eot|>")
    runs = spans(ex.mask)
    assert len(runs) == 3  # one per assistant turn, nothing else
    call_run, *text_runs = [ex.ids[a:b] for a, b in runs]
    assert call_run[-1] == eot and '"name": "weather"' in tok.decode(call_run) and "Paris" in tok.decode(call_run)
    assert text_runs == [tok.encode("It is sunny.") + [eot], tok.encode("You are welcome.") + [eot]]
    header = ([tok.special_id("<|header_start|>")] + tok.encode("assistant") + [tok.special_id("<|header_end|>")]
              + tok.encode("\n\n"))
    for a, _ in runs:  # each run starts right after an assistant header, which is not learned
        assert ex.ids[a - len(header):a] == header
    assert sum(ex.mask) == sum(b - a for a, b in runs)


def test_image_parts_from_a_path_and_a_data_url(tok, tmp_path):
    image, _ = draw_scene(random.Random(3))
    (tmp_path / "pics").mkdir()
    image.save(tmp_path / "pics" / "a.png")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    path = write_jsonl(tmp_path / "data.jsonl", [picture_chat("pics/a.png"), picture_chat(url),
                                                 picture_chat({"type": "image", "image": "pics/a.png"})])
    examples = read_chat_jsonl(tok, path)
    expected, grid = preprocess_image(tmp_path / "pics" / "a.png")
    patch = tok.special_id("<|patch|>")
    for ex in examples:
        assert torch.equal(ex.pixels, expected) and grid == (1, 1)
        assert ex.ids.count(patch) == 144 and not any(m for i, m in zip(ex.ids, ex.mask) if i == patch)
        assert ex.ids == tok.encode_chat([{"role": "user", "content": [
            {"type": "image", "grid": grid}, {"type": "text", "text": "What shape is it?"}]},
            {"role": "assistant", "content": "It is a circle."}]).ids
    rows = layout_rows(examples, 256, tok.pad_id)
    inputs, targets, pixels = rows.batch([0, 2])
    assert pixels.shape == (2, 3, 336, 336) and int((inputs == patch).sum()) == 288


# -- rows, packing, batches, split ----------------------------------------------------------------------------


def toy(n: int, source: str, learn_from: int = 2) -> Example:
    ids = [1] + [10 + (k % 50) for k in range(n - 1)]
    return Example(ids, [k >= learn_from for k in range(n)], None, source)


def test_one_example_per_row_by_default_and_packed_whole_on_request():
    examples = [toy(n, f"x:{i}") for i, n in enumerate([5, 7, 4, 9, 3])]
    rows = layout_rows(examples, 12, pad_id=0)
    assert len(rows) == 5 and rows.examples == [1] * 5 and rows.lengths == [4, 6, 3, 8, 2]
    assert rows.inputs[0, :5].tolist() == examples[0].ids and rows.inputs[0, 5:].eq(0).all()
    assert rows.targets[0, :4].tolist() == [IGNORE, 10 + 1, 10 + 2, 10 + 3] and rows.targets[0, 4:].eq(IGNORE).all()
    packed = layout_rows(examples, 12, pad_id=0, pack=True)
    assert packed.examples == [2, 2, 1]  # 5+7 = 12 <= 13, 4+9 = 13 <= 13, then 3
    assert packed.lengths == [11, 12, 2]
    first = examples[0].ids + examples[1].ids
    assert packed.inputs[0, :11].tolist() == first[:-1]
    learn = examples[0].mask + examples[1].mask
    assert packed.targets[0, :11].tolist() == [t if m else IGNORE for t, m in zip(first[1:], learn[1:])]
    # the second example's first token (its BOS) is never a target: examples do not learn each other's starts
    assert packed.targets[0, 4].item() == IGNORE
    inputs, targets = packed.batch([2, 0])
    assert inputs.shape == (2, 11) and inputs[0, :2].tolist() == examples[4].ids[:2]


def test_an_example_longer_than_a_row_is_refused_by_name():
    with pytest.raises(ValueError, match=r"data.jsonl:7: 20 tokens.*--seq-len to at least 19"):
        layout_rows([toy(5, "data.jsonl:3"), toy(20, "data.jsonl:7")], 12, pad_id=0)


def test_batches_cover_every_row_once_per_epoch_and_resume_with_the_rng():
    examples = [Example([1, 100 + i] + [10] * (i % 5), [False, False] + [True] * (i % 5), None, f"x:{i}")
                for i in range(10)]
    rows = layout_rows(examples, 8, pad_id=0)
    batches = RowBatches(rows, 3, seed=5)
    assert batches.steps_per_epoch == 3
    epoch = [next(batches)[0] for _ in range(3)]
    assert len({int(t) for b in epoch for t in b[:, 1]}) == 9  # 9 distinct rows; the 10th waits for no batch
    assert all(b.shape[1] == max(len(examples[int(t) - 100].ids) - 1 for t in b[:, 1]) for b in epoch)
    state = batches.state_dict()
    draws = torch.rand(3)  # what dropout would draw next
    after = [next(batches)[0].clone() for _ in range(4)]
    again = RowBatches(rows, 3, seed=5)
    torch.manual_seed(123)
    again.load_state_dict(state)
    assert torch.equal(torch.rand(3), draws)
    assert all(torch.equal(a, next(again)[0]) for a in after)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        RowBatches(rows, 11, seed=0)


def test_eval_split_is_deterministic_and_disjoint():
    examples = [toy(4, f"x:{i}") for i in range(20)]
    train_a, held_a = split_eval(examples, 0.25, seed=1)
    train_b, held_b = split_eval(examples, 0.25, seed=1)
    assert [e.source for e in held_a] == [e.source for e in held_b] and len(held_a) == 5
    assert {e.source for e in train_a} | {e.source for e in held_a} == {e.source for e in examples}
    assert not {e.source for e in train_a} & {e.source for e in held_a}
    assert [e.source for e in split_eval(examples, 0.25, seed=2)[1]] != [e.source for e in held_a]
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_eval(examples, 1.5, seed=0)
    with pytest.raises(ValueError, match="leaves none to train on"):
        split_eval(examples[:1], 0.5, seed=0)


# -- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', r"data.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"data.jsonl:2: the chat has no assistant message"),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
     r"data.jsonl:2: messages\[0\] has unknown role 'robot'; allowed roles: system, user, assistant, tool"),
    (json.dumps(picture_chat("missing.png")),
     r"data.jsonl:2: messages\[0\].content\[0\]: image file .*missing.png not found"),
    (json.dumps(picture_chat("data:image/png;base64,@@@")), r"data.jsonl:2: .*not valid base64"),
    ('[1, 2]', r"data.jsonl:2: each line must be an object"),
    ('{"messages": [], "weight": 1}', r"data.jsonl:2: unknown keys \['weight'\]"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
     r"data.jsonl:2: messages\[0\]: content must be a string"),
])
def test_bad_lines_name_the_file_and_line(tok, tmp_path, line, message):
    path = write_jsonl(tmp_path / "data.jsonl", [chat(1), line])
    with pytest.raises(ValueError, match=message):
        read_chat_jsonl(tok, path)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        FinetuneSettings(data=("a.jsonl",), batch_size=0)
    with pytest.raises(ValueError, match="either --eval-file or --eval-fraction"):
        FinetuneSettings(data=("a.jsonl",), eval_file="b.jsonl", eval_fraction=0.1)
    with pytest.raises(ValueError, match="unknown target 'qkv'"):
        FinetuneSettings(data=("a.jsonl",), targets=("qkv",))


# -- training: resume, run directory, QLoRA -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tok, tmp_path_factory) -> Path:
    """A tiny random multimodal model on the embedded tokenizer (saved: --model PATH)."""
    text = text_config(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=32,
                       intermediate_size_mlp=64, num_experts=2, vocab_size=tok.vocab_size, attention_chunk_size=256,
                       floor_scale=256, max_position_embeddings=1024, bos_token_id=tok.bos_id,
                       eos_token_ids=tok.eos_ids, pad_token_id=tok.pad_id)
    vision = replace(LLAMA4_VISION, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=128,
                     vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    config = ModelConfig(text=text, vision=vision, image_token_id=tok.patch_id, boi_token_id=tok.image_start_id,
                         eoi_token_id=tok.image_end_id)
    path = tmp_path_factory.mktemp("tiny")
    llama4.save_model(llama4.random_model(config, seed=0), path)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    records = [chat(i) for i in range(10)]
    for i in range(4):
        image, scene = draw_scene(random.Random(i))
        image.save(folder / f"p{i}.png")
        records.append(picture_chat(f"p{i}.png", f"It is a {scene.shape}."))
    return write_jsonl(folder / "train.jsonl", records)


def settings_for(model_dir: Path, data: Path, **overrides) -> FinetuneSettings:
    base = dict(data=(str(data),), model=str(model_dir), max_steps=6, batch_size=2, seq_len=200, lr=1e-2,
                dropout=0.1, rank=4, targets=("attention", "shared"), checkpoint_every=2, eval_every=3,
                eval_fraction=0.2, seed=3)
    return FinetuneSettings(**{**base, **overrides})


def test_resumed_run_equals_the_uninterrupted_one_bit_for_bit(tiny_model_dir, data_file, tmp_path):
    settings = settings_for(tiny_model_dir, data_file)
    full = finetune(settings, tmp_path / "full")
    part = finetune(settings, tmp_path / "split", stop_at=3)
    assert part == {"step": 3, "steps": 6, "finished": False, "adapter": None}
    torch.rand(5)  # the caller's RNG state is not the run's
    resumed = finetune(None, tmp_path / "split", resume=True)
    assert resumed["train_loss"] == full["train_loss"] and resumed["eval_loss"] == full["eval_loss"]
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    losses = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("full", "split")]
    strip = [[{k: v for k, v in r.items() if k != "tokens_per_s"} for r in run] for run in losses]
    assert strip[0] == strip[1]
    # without the RNG restored, dropout draws differ and so do the adapters
    other = finetune(replace(settings, seed=4), tmp_path / "other")
    assert other["train_loss"] != full["train_loss"]


def test_run_directory_holds_the_recipe_the_adapter_and_the_merged_model(tiny_model_dir, data_file, tmp_path):
    settings = settings_for(tiny_model_dir, data_file, max_steps=4, merge=True, dropout=0.0)
    out = tmp_path / "run"
    record = finetune(settings, out)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["settings"]["max_steps"] == 4 and recipe["settings"]["targets"] == ["attention", "shared"]
    assert recipe["settings"]["warmup"] == 1 and recipe["settings"]["min_lr"] == pytest.approx(1e-3)
    assert recipe["data_sha256"] == {str(data_file.resolve()): file_sha256(data_file)}
    assert len(recipe["image_sha256"]) == 4 and recipe["code_version"] and recipe["torch"] == torch.__version__
    assert recipe["base_model"]["path"] == str(tiny_model_dir.resolve()) and recipe["rows"]["eval"] == 3
    assert {p.name for p in out.iterdir()} >= {"recipe.json", "metrics.jsonl", "loss.png", "checkpoint", "adapter",
                                                "merged", "result.json"}
    assert record["eval_loss"] < record["eval_loss_before"]
    # the PEFT adapter on a fresh base and the merged checkpoint both give the trained model's logits
    trained = load_adapted(settings)
    weights = load_file(str(out / "checkpoint" / "model" / "weights.safetensors"))
    from llama4.lora import load_lora_state_dict

    load_lora_state_dict(trained, weights)
    ids = torch.arange(1, 40)[None]
    expected = trained(ids)
    reloaded = load_adapter(llama4.load_model(tiny_model_dir, pack=False), out / "adapter")
    torch.testing.assert_close(reloaded(ids), expected, rtol=1e-5, atol=1e-5)
    merged = llama4.load_model(out / "merged", pack=False)
    torch.testing.assert_close(merged(ids), expected, rtol=1e-5, atol=1e-5)
    assert load_tokenizer(out / "merged").vocab_size == 8192
    with pytest.raises(ValueError, match="already holds a run: continue it with --resume"):
        finetune(settings, out)


def test_qlora_trains_adapters_over_a_quantized_base(tiny_model_dir, data_file, tmp_path):
    from llama4.quant.modules import QuantizedLinear

    settings = settings_for(tiny_model_dir, data_file, max_steps=3, quant="int8", dropout=0.0)
    model = load_adapted(settings)
    assert isinstance(model.text.layers[0].attn.qkv.wq.base, QuantizedLinear)
    assert all(n.split(".")[-2] in ("lora_A", "lora_B") or n.endswith(("_A", "_B"))
               for n, p in model.named_parameters() if p.requires_grad)
    record = finetune(settings, tmp_path / "q")
    assert record["finished"] and record["eval_loss"] < record["eval_loss_before"]
    assert lora_state_dict(model).keys() == {
        k.removeprefix("model.") for k in load_file(str(tmp_path / "q" / "checkpoint" / "model" /
                                                         "weights.safetensors"))}


def test_data_changed_since_the_run_started_is_refused_on_resume(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(8)])
    settings = settings_for(tiny_model_dir, data, max_steps=4)
    finetune(settings, tmp_path / "run", stop_at=1)
    write_jsonl(data, [chat(i) for i in range(1, 9)])
    with pytest.raises(ValueError, match=r"d.jsonl changed since the run in .* started"):
        finetune(None, tmp_path / "run", resume=True)


# -- the command line -------------------------------------------------------------------------------------


def test_cli_finetunes_the_embedded_model(data_file, tmp_path, capsys):
    from llama4.cli import main

    out = tmp_path / "run"
    argv = ["finetune", "--data", str(data_file), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
            "--rank", "4", "--targets", "wq,wv", "--eval-fraction", "0.2", "--quiet"]
    assert main(argv) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["base_model"]["embedded"] and recipe["settings"]["targets"] == ["wq", "wv"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"])[0].endswith("q_proj")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert main(["finetune", "--resume", str(out), "--lr", "1"]) == 2
    assert "--resume continues a run with its recorded settings; drop --lr" in capsys.readouterr().err
    assert main(["finetune", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "none.jsonl not found" in capsys.readouterr().err


def test_cli_reports_a_bad_line(tmp_path, capsys):
    from llama4.cli import main

    data = write_jsonl(tmp_path / "bad.jsonl", [chat(1), chat(2), '{"messages": [}'])
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "run")]) == 2
    assert f"{data}:3: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_pictures_for_a_text_only_model_are_refused(tok, tiny_model_dir, data_file, tmp_path):
    config = replace(llama4.load_model(tiny_model_dir, pack=False).config, vision=None)
    llama4.save_model(llama4.random_model(config, seed=0), tmp_path / "text")
    tok.save(tmp_path / "text")
    with pytest.raises(ValueError, match="the data holds pictures but the base model .* is text-only"):
        finetune(settings_for(tmp_path / "text", data_file), tmp_path / "run")
