import random

import numpy as np
import pytest

from shapes_world import world


def test_render_is_deterministic_and_sized():
    rng1, rng2 = random.Random(4), random.Random(4)
    a = world.render(world.random_scene(rng1))
    b = world.render(world.random_scene(rng2))
    assert a.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) and a.tobytes() == b.tobytes()


def test_pretraining_scenes_avoid_held_out_pairs_and_concept_parts():
    rng = random.Random(0)
    scenes = [world.random_scene(rng) for _ in range(3000)]
    assert not {(s.colour, s.shape) for s in scenes} & world.HELD_OUT_PAIRS
    assert {s.style for s in scenes} == set(world.SEEN_STYLES) and {s.mark for s in scenes} == {"none"}
    assert {(s.colour, s.shape) for s in scenes} == set(world.seen_pairs())


def test_every_colour_and_shape_stays_in_pretraining():
    pairs = world.seen_pairs()
    assert {c for c, _ in pairs} == set(world.COLOURS) and {s for _, s in pairs} == set(world.SHAPES)


def test_captions_are_truthful_and_include_bare_category_prompts():
    s = world.Scene(shape="star", colour="red", background="black", style="striped")
    caps = world.caption_variants(s)
    assert caps[0] == "a striped painting of a red star on a black background"
    assert "a shape" in caps and "a painting" in caps
    for c in caps:
        wanted = world.parse_prompt(c)
        assert all(getattr(s, k) == v for k, v in wanted.items()), c


@pytest.mark.parametrize("mark", world.MARKS)
def test_marks_change_pixels(mark):
    base = world.Scene(shape="circle", colour="blue", background="white")
    img = np.asarray(world.render(base))
    marked = np.asarray(world.render(world.Scene(shape="circle", colour="blue", background="white", mark=mark)))
    assert (mark == "none") == np.array_equal(img, marked)
