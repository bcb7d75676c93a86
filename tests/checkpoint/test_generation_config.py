"""generation_config.json -> the sampling defaults of requests that set none."""

from __future__ import annotations

import json

import pytest

from llama4.build import EMBEDDED_DIR
from llama4.checkpoint.generation_config import GenerationDefaults, read_generation_defaults, write_generation_defaults


def test_the_sampling_fields_are_read_and_do_sample_false_is_greedy(tmp_path):
    assert read_generation_defaults(tmp_path) == GenerationDefaults()
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": 100}))
    assert read_generation_defaults(tmp_path) == GenerationDefaults(temperature=0.6, top_p=0.9)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert read_generation_defaults(tmp_path) == GenerationDefaults(temperature=0.0)


@pytest.mark.parametrize("text, problem", [("{", "not readable JSON"), ("[1]", "JSON object"),
                                           ('{"temperature": "hot"}', "temperature must be a number"),
                                           ('{"top_p": 2}', r"top_p must be in \(0, 1\]")])
def test_a_bad_file_names_itself_and_the_problem(tmp_path, text, problem):
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=problem) as raised:
        read_generation_defaults(tmp_path)
    assert "generation_config.json" in str(raised.value)


def test_written_defaults_read_back_and_transformers_reads_them(tmp_path):
    defaults = GenerationDefaults(temperature=0.6, top_p=0.9)
    write_generation_defaults(tmp_path, defaults, bos_token_id=1, eos_token_id=[2, 3])
    assert read_generation_defaults(tmp_path) == defaults
    transformers = pytest.importorskip("transformers")
    hf = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (hf.temperature, hf.top_p, hf.do_sample, hf.eos_token_id) == (0.6, 0.9, True, [2, 3])


def test_the_embedded_model_recommends_its_sampling():
    if not (EMBEDDED_DIR / "config.json").is_file():
        pytest.skip("no embedded model in this installation")
    assert read_generation_defaults(EMBEDDED_DIR) == GenerationDefaults(temperature=0.6, top_p=0.9)
