"""The continual-learning benchmark's smoke preset, run as the benchmark runs (strategies side by side in
processes of their own): the service's default metamodel strategy keeps a first concept that naive
sequential DreamBooth forgets (the full bars are printed by benchmarks/continual.py). The composition
benchmark samples through the service's `AND` prompts, tested in tests/test_composable.py."""



def test_composition_prompts_weight_the_words_and_still_route_both_adapters():
    from research.composition_guidance import composed_prompt
    from big.generation import prompting
    from big.weights import metamodel

    adapters = (metamodel.Adapter(1, "a", "bnp"), metamodel.Adapter(2, "b", "ssh"))
    assert composed_prompt("ssh", "bnp", 0) == "a ssh painting of a bnp shape"
    prompt = composed_prompt("ssh", "bnp", 2, (0.6, 1.3))
    (first, w1), (second, w2) = prompting.composable_parts(prompt)
    assert (w1, w2) == (1.0, 2.0) and second == "a bnp shape"
    assert ("ssh", 0.6) in prompting.parse_emphasis(first) and ("bnp", 1.3) in prompting.parse_emphasis(first)
    assert metamodel.route(first, adapters) == adapters and metamodel.route(second, adapters) == adapters[:1]


def test_described_composition_routes_each_part_to_one_adapter():
    from research.composition_guidance import described_prompt
    from big.generation import prompting
    from big.weights import metamodel

    adapters = (metamodel.Adapter(1, "a", "bnp"), metamodel.Adapter(2, "b", "ssh"))
    prompt = described_prompt("ssh", "bnp", "orange heart", 0.7, "white")
    assert prompt == ("a ssh painting of a orange heart on a white background AND a bnp shape on a white "
                      "background :0.7")
    (first, w1), (second, w2) = prompting.composable_parts(prompt)
    assert (w1, w2) == (1.0, 0.7)
    assert metamodel.route(first, adapters) == adapters[1:] and metamodel.route(second, adapters) == adapters[:1]
    assert described_prompt("ssh", "bnp", "red star", 1) == "a ssh painting of a red star AND a bnp shape :1"


def test_more_images_of_a_style_start_with_the_same_five():
    """composition_guidance --style-images N compares N images per style with five: the first five must be
    the very images (and captions) the benchmarks teach by default."""
    import numpy as np

    from benchmarks.continual import SEQUENCE
    from benchmarks.harness import concept_images

    style = next(attrs for _, _, attrs in SEQUENCE if "style" in attrs)
    five, five_captions = concept_images(style, 5, 100)
    fifteen, fifteen_captions = concept_images(style, 15, 100)
    assert len(fifteen) == 15 and fifteen_captions[:5] == five_captions
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(five, fifteen))
    assert len(set(fifteen_captions)) > 5  # the ten more are other subjects, not copies


def test_style_parameters_reach_the_styles_only():
    """The composition benchmarks vary how the styles are taught (--style-images, --style-lora-rank,
    --style-hue-copies, --style-param) while the objects stay as the continual benchmark teaches them."""
    from benchmarks.continual import SEQUENCE, teach_as_adapters

    calls = []

    class Registry:
        def get_concept(self, concept_id):
            return {"concept_id": concept_id}

    class RecordingService:
        registry = Registry()

        def finetune(self, user, images, params):
            calls.append((len(images), params))
            return {"concept_id": len(calls), "identifier": f"w{len(calls)}"}

    teach_as_adapters(RecordingService(), 0, style_images=7,
                      style_params={"lora_rank": 1, "hue_copies": 2, "metamodel_strategy": "seed_split"})
    assert len(calls) == len(SEQUENCE)
    for (count, params), (_, category, attrs) in zip(calls, SEQUENCE):
        assert params["category"] == category
        if "style" in attrs:
            assert count == 7 and len(params["captions"]) == 7
            assert params["lora_rank"] == 1 and params["hue_copies"] == 2
            assert params["metamodel_strategy"] == "seed_split"  # styles into the trunk, by DreamBooth
        else:
            assert count == 5 and "lora_rank" not in params and "hue_copies" not in params
            assert params["metamodel_strategy"] == "adapters"


def test_style_param_values_are_read_as_json_or_text():
    import argparse

    import pytest

    from research.composition_guidance import _style_param

    assert _style_param("max_train_steps=300") == ("max_train_steps", 300)
    assert _style_param("metamodel_strategy=seed_split") == ("metamodel_strategy", "seed_split")
    assert _style_param("flip=true") == ("flip", True)
    assert _style_param("init_text=a=b") == ("init_text", "a=b")
    for bad in ("max_train_steps", "=300"):
        with pytest.raises(argparse.ArgumentTypeError):
            _style_param(bad)
