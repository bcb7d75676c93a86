import json
import shutil
from pathlib import Path

import pytest

from llama4.build import EMBEDDED_DIR
from llama4.train.card import render_card


@pytest.fixture
def model_dir(tmp_path) -> Path:
    if not (EMBEDDED_DIR / "recipe.json").is_file():
        pytest.skip("no embedded model in this installation")
    for name in ("config.json", "recipe.json", "eval.json"):
        shutil.copyfile(EMBEDDED_DIR / name, tmp_path / name)
    return tmp_path


def test_card_states_every_stage_and_the_eval_figures(model_dir):
    recipe = json.loads((model_dir / "recipe.json").read_text())
    report = json.loads((model_dir / "eval.json").read_text())
    card = render_card(model_dir, report)
    assert f"{report['perplexity']['perplexity']:.2f}" in card
    for stage in recipe["stages"]:
        if stage in ("pretrain", "vision", "instruct"):
            assert f"{stage}_loss.png" in card
    if "vision" in recipe["stages"]:
        assert "2. Vision:" in card and "3. Instruct" in card


def test_card_of_a_recipe_without_a_vision_stage(model_dir):
    recipe = json.loads((model_dir / "recipe.json").read_text())
    recipe["stages"].pop("vision", None)
    recipe.pop("vision_probe_accuracy", None)
    recipe["stages"]["instruct"].pop("vision_lr_scale", None)
    (model_dir / "recipe.json").write_text(json.dumps(recipe))
    card = render_card(model_dir, json.loads((model_dir / "eval.json").read_text()))
    assert "2. Vision:" not in card and "2. Instruct" in card and "vision_loss.png" not in card


@pytest.mark.parametrize("colour, shape, says", [
    (1.0, 0.95, ["colour and shape questions about them reliably",
                 "colour and shape answers are right on at least 90%"]),
    (1.0, 0.388, ["colour questions reliably, shape questions less so", "; shape answers are not"]),
    (0.2, 0.2, ["only somewhat better than chance", "no kind of question is answered reliably"]),
])
def test_the_card_states_what_the_picture_figures_support(model_dir, colour, shape, says):
    report = json.loads((model_dir / "eval.json").read_text())
    report["pictures"]["colour"]["accuracy"], report["pictures"]["shape"]["accuracy"] = colour, shape
    card = render_card(model_dir, report)
    assert all(phrase in card for phrase in says)


def test_the_card_and_generation_config_recommend_the_same_sampling(model_dir):
    from llama4.checkpoint.generation_config import read_generation_defaults
    from llama4.train.card import RECOMMENDED, write_model_card

    card = write_model_card(model_dir, json.loads((model_dir / "eval.json").read_text())).read_text()
    assert read_generation_defaults(model_dir) == RECOMMENDED
    assert f"temperature {RECOMMENDED.temperature:g} with top_p {RECOMMENDED.top_p:g}" in card
    assert card == (EMBEDDED_DIR / "README.md").read_text()  # the shipped card is the generator's output
