"""Composable prompts (`a qzq painting of a sks dog AND a sks dog :2`): the sampler, and each part routed to
the metamodel adapters it names."""
import numpy as np
import pytest

from conftest import assert_same_but_rounding, assert_same_image, instance_images
from big.generation import sampling
from big.weights import lora


def _pixels(images):
    return [np.asarray(g.image, dtype=int) for g in images]


def _bytes(images):
    return [g.image.tobytes() for g in images]


@pytest.mark.parametrize("sampler", [None, "euler_a", "dpmpp_2m"])
def test_one_part_of_weight_one_is_the_pipeline_s_classifier_free_guidance(service, sampler):
    """The composed loop is diffusers' loop: same latents from the same seeds, same scheduler steps
    (an ancestral sampler's noise too), same guidance; only the batching of the UNet calls differs."""
    from big.generation import schedulers

    pipe = service.base_pipe
    specs = [sampling.ImageSpec("a red star", seed, 4.0, 6) for seed in (7, 8)]
    scheduler = schedulers.make(schedulers.SAMPLERS[sampler], pipe.scheduler.config) if sampler else None
    common = dict(negative_prompt="a blue circle", height=service.size, width=service.size, model_label="x",
                  model_version=0)
    ours = sampling.render_composed([sampling.PromptPart(pipe, "a red star", 1.0)], specs,
                                      scheduler=scheduler, **common)
    from big.weights import pipelines
    theirs = sampling.render(pipelines.compose(pipe, scheduler=scheduler), specs, **common)
    for a, b in zip(_pixels(ours), _pixels(theirs)):
        assert np.abs(a - b).max() <= 1
    assert ours[0].parameters == theirs[0].parameters  # the PNG text says the same


def test_and_prompts_through_the_service_follow_the_composable_rule(service):
    params = {"target_model": "pretrained", "seed": 3, "num_images": 2, "guidance_scale": 4.0}
    # Twice the same part: its guidance adds up, as one part at twice the scale (same UNet, same uncond) ...
    twice = service.generate("carol", ["a red star AND a red star"], params)
    single = service.generate("carol", ["a red star"], {**params, "guidance_scale": 8.0})
    assert_same_but_rounding(twice, single, service.device)
    euler_a = {**params, "scheduler": "euler_a"}  # the request's sampler drives the composed loop too
    twice_euler_a = service.generate("carol", ["a red star AND a red star"], euler_a)
    single_euler_a = service.generate("carol", ["a red star"], {**euler_a, "guidance_scale": 8.0})
    assert_same_but_rounding(twice_euler_a, single_euler_a, service.device)
    # A different sampler is not within rounding of it: the check above can fail.
    assert np.abs(_pixels(twice_euler_a)[0] - _pixels(twice)[0]).max() > 8
    # ... and a part of weight 0 only adds its unconditional prediction, here the same as the first part's.
    for x, y in zip(service.generate("carol", ["a red star AND a blue circle :0"], params),
                    service.generate("carol", ["a red star"], params)):
        assert_same_image(x, y, service.device)
    mixed = service.generate("carol", ["a red star AND a blue circle :0.5", "a red star"], params)
    for x, y in zip(mixed[2:], service.generate("carol", ["a red star"], {**params, "seed": 5})):
        assert_same_image(x, y, service.device)
    assert _bytes(mixed[:2]) != _bytes(mixed[2:])
    # The PNG text reproduces the composed image from the text alone.
    again = service.generate("carol", [], {"parameters": mixed[0].parameters_text()})
    assert again[0].prompt == "a red star AND a blue circle :0.5"
    assert_same_but_rounding(again, mixed[:1], service.device)  # made alone now, in a batch of four then


def test_each_and_part_is_served_by_the_adapters_it_names(service, monkeypatch):
    a = service.finetune("alice", instance_images(), {"category": "shape", "target_model": "meta"})
    b = service.finetune("bob", instance_images(style="checker", mark="none", shape="circle"),
                         {"category": "painting", "target_model": "meta"})
    obj, style = a["identifier"], b["identifier"]
    names = {k: lora.LoraRuntime.adapter_name(service.registry.find_concept(
        owner=o, target="meta", identifier=k)["concept_id"]) for k, o in ((obj, "alice"), (style, "bob"))}
    params = {"target_model": "meta", "seed": 3, "num_images": 2, "guidance_scale": 4.0}
    seen = []
    real = sampling.render_composed
    monkeypatch.setattr(sampling, "render_composed", lambda parts, specs, **kw: seen.append(parts) or
                        real(parts, specs, **kw))
    composed = service.generate("carol", [f"a {style} painting of a {obj} shape AND a {obj} shape :2"], params)

    both = service.cache.get(f"meta@0+{'+'.join(sorted(f'{names[k]}*1.0' for k in (obj, style)))}",
                             lambda: pytest.fail("the composition's route is not cached"))
    alone = service.cache.get(f"meta@0+{names[obj]}*1.0", lambda: pytest.fail("the object's route is not cached"))
    [parts] = seen
    assert [(p.pipe, p.text, p.weight) for p in parts] == \
        [(both, f"a {style} painting of a {obj} shape", 1.0), (alone, f"a {obj} shape", 2.0)]
    assert [len(p.embeddings) for p in parts] == [2, 1]  # each part has its own concepts' identifiers

    # A part that names no concept is the trunk's; the object's part alone twice is its route at 2x guidance.
    assert _bytes(service.generate("carol", [f"a {obj} shape AND a {obj} shape"], params)) == \
        _bytes(service.generate("carol", [f"a {obj} shape"], {**params, "guidance_scale": 8.0}))
    service.generate("carol", [f"a {obj} shape AND a shape :-0.5"], params)
    assert seen[-1][1].pipe.unet is service.models.pipeline_for("meta", 2).unet
    # Parts need their UNets side by side, so they are merged even where routes are otherwise not.
    service.config.fuse_adapters = False
    service.cache.drop(lambda key: "+" in key)
    assert _bytes(service.generate("carol", [f"a {style} painting of a {obj} shape AND a {obj} shape :2"],
                                   params)) == _bytes(composed)
