"""Sweeps and grids: planning (pure), batching, and that every frame is an ordinary reproducible image."""

import pytest


from big import parsing
from big.generation import studio
from big.errors import BadRequest
from big.generation.sampling import ImageSpec, batches

LIMITS = dict(max_frames=64, max_steps=150, max_guidance=50.0)


def test_default_guidance_sweep_is_0_to_30_in_31_frames():
    assert parsing.sweep_values("guidance_scale", **LIMITS) == [float(v) for v in range(31)]


def test_steps_sweep_rounds_to_whole_steps():
    assert parsing.sweep_values("num_inference_steps", start=5, stop=20, num=4, **LIMITS) == [5, 10, 15, 20]
    assert parsing.sweep_values("num_inference_steps", values=[3, 7.0], **LIMITS) == [3, 7]


@pytest.mark.parametrize("kw", [
    dict(parameter="seed"), dict(parameter="guidance_scale", values=[]),
    dict(parameter="guidance_scale", values=["x"]), dict(parameter="guidance_scale", num=0),
    dict(parameter="guidance_scale", num=100), dict(parameter="guidance_scale", values=[60]),
    dict(parameter="num_inference_steps", values=[0]),
    dict(parameter={"guidance_scale": [2, 4]}), dict(parameter=None), dict(parameter="guidance_scale", start="1"),
    dict(parameter="guidance_scale", stop=[9]), dict(parameter="guidance_scale", start=True),
    dict(parameter="guidance_scale", num=float("nan")), dict(parameter="guidance_scale", num=float("inf")),
    dict(parameter="guidance_scale", num=10**12),  # refused before a list of that length is built
    dict(parameter="guidance_scale", values=list(range(65))),
    dict(parameter="num_inference_steps", values=[float("inf")]),
    dict(parameter="num_inference_steps", values=["1e400"]),
    dict(parameter="num_inference_steps", start=float("inf")), dict(parameter="guidance_scale", values=[True, 2]),
])
def test_bad_sweeps_are_clear_errors(kw):
    with pytest.raises(BadRequest):  # never another exception, which would reach the client as a server error
        parsing.sweep_values(**kw, **LIMITS)


def test_grid_is_every_combination_prompt_major():
    specs = studio.grid_specs(["a", "b"], [2.0, 4.0], [5], [1, 2])
    assert len(specs) == 8
    assert [s.prompt for s in specs] == ["a"] * 4 + ["b"] * 4
    assert specs[:4] == [ImageSpec("a", 1, 2.0, 5), ImageSpec("a", 2, 2.0, 5), ImageSpec("a", 1, 4.0, 5),
                         ImageSpec("a", 2, 4.0, 5)]


def test_random_samples_stay_around_the_setting_and_repeat_with_the_seed():
    a = studio.random_specs(["p"], 50, seed=3, guidance_scale=4.0, num_inference_steps=20, max_steps=150,
                            max_guidance=50.0)
    assert a == studio.random_specs(["p"], 50, seed=3, guidance_scale=4.0, num_inference_steps=20, max_steps=150,
                                    max_guidance=50.0)
    assert all(2.0 <= s.guidance_scale <= 6.0 and 10 <= s.num_inference_steps <= 30 for s in a)
    assert len({s.seed for s in a}) == 50 and len({s.guidance_scale for s in a}) > 10


def test_batches_share_steps_and_mix_guidance_only_when_it_is_on():
    specs = [ImageSpec("p", 0, g, n) for g, n in [(0.0, 5), (1.0, 5), (2.0, 5), (7.0, 5), (3.0, 9), (0.0, 5)]]
    groups = sorted(sorted(b) for b in batches(specs, max_batch=16))
    assert groups == [[0, 5], [1], [2, 3], [4]]
    assert all(len(b) <= 2 for b in batches([ImageSpec("p", i, 3.0, 5) for i in range(5)], max_batch=2))




