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


def test_the_scorers_reinked_marks_change_only_the_mark_and_stay_visible():
    """Scorer training redraws half the marks in other inks (shapes_world.scorer._reinked); a label stays true
    only if nothing but the mark's pixels change and the new ink stands out from what lies under it."""
    from shapes_world.scorer import _reinked

    rng = random.Random(21)
    plain = world.random_scene(rng, mark="none")
    image = world.render(plain)
    assert _reinked(plain, image, rng) is image
    reinked = 0
    for _ in range(60):
        scene = world.random_scene(rng, style=rng.choice(world.STYLES), mark=rng.choice(world.CONCEPT_MARKS),
                                   allow_held_out=True)
        image = world.render(scene)
        out = _reinked(scene, image, rng)
        if out is image:
            continue
        reinked += 1
        before, after = np.asarray(image, dtype=np.int16), np.asarray(out, dtype=np.int16)
        unmarked = np.asarray(world.render(world.Scene(**{**scene.__dict__, "mark": "none"})), dtype=np.int16)
        mark_pixels = np.abs(before - unmarked).sum(-1) > 0
        assert not np.abs(after - before).sum(-1)[~mark_pixels].any()
        core = np.abs(before - unmarked).sum(-1) == np.abs(before - unmarked).sum(-1).max()
        assert np.abs(after - unmarked).sum(-1)[core].mean() >= 0.75 * 200 * 0.9
    assert 10 <= reinked <= 50
