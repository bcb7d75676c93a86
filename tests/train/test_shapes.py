import random

import pytest

from llama4.train.shapes import BACKGROUNDS, COLOURS, SHAPES, SIZE, answers, describe, draw_scene, words_in


@pytest.mark.parametrize("seed", range(40))
def test_scene_facts_match_the_pixels(seed):
    image, scene = draw_scene(random.Random(seed))
    assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    assert scene.shape in SHAPES and scene.colour in COLOURS and scene.background in BACKGROUNDS
    colours = dict((rgb, n) for n, rgb in image.getcolors(SIZE * SIZE))
    assert colours.get(COLOURS[scene.colour], 0) > 1500 * scene.count  # the shapes are there, and large
    assert image.getpixel((0, 0)) == BACKGROUNDS[scene.background]
    assert (scene.position is None) == (scene.count > 1)


def test_scenes_are_reproducible_and_varied():
    a, sa = draw_scene(random.Random("x:1"))
    b, sb = draw_scene(random.Random("x:1"))
    assert sa == sb and a.tobytes() == b.tobytes()
    scenes = [draw_scene(random.Random(i))[1] for i in range(200)]
    assert {s.shape for s in scenes} == set(SHAPES)
    assert {s.colour for s in scenes} == set(COLOURS)
    assert {s.count for s in scenes} == {1, 2, 3}


def test_answers_cover_colour_and_shape_and_only_true_words():
    rng = random.Random(3)
    for _ in range(50):
        _, scene = draw_scene(rng)
        pairs = answers(scene, rng)
        text = " ".join(a for _, a in pairs)
        assert scene.colour in words_in(text, COLOURS)
        assert words_in(" ".join(a for _, a in pairs if "background" not in a), COLOURS) == {scene.colour}
        assert words_in(text, SHAPES) == {scene.shape}
        assert words_in(describe(scene), SHAPES) == {scene.shape}


def test_words_in_matches_whole_words_and_plurals():
    assert words_in("They are red circles.", COLOURS) == {"red"}
    assert words_in("They are red circles.", SHAPES) == {"circle"}
    assert words_in("Reddish squares!", COLOURS) == set()
    assert words_in("a star and a square", SHAPES) == {"star", "square"}
