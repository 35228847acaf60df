"""The shipped shapes-world model and scorer: load offline, deterministic, and the scorer reads truth."""
import json
import os
import random

import numpy as np
import pytest
import torch

from shapes_world import world
from shapes_world.evaluate import generate, load_pipeline
from shapes_world.model import DEFAULT_MODEL_DIR, DEFAULT_SCORER_DIR, TEXT_MAX_LENGTH
from shapes_world.scorer import HEADS, Scorer, accuracy_on_rendered


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def scorer():
    return Scorer(DEFAULT_SCORER_DIR)


def test_shipped_folder_is_a_small_safetensors_diffusers_pipeline():
    files = [os.path.join(r, f) for r, _, fs in os.walk(DEFAULT_MODEL_DIR) for f in fs]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".ckpt"))]
    assert sum(os.path.getsize(f) for f in files) < 20 * 1024 * 1024
    index = json.load(open(os.path.join(DEFAULT_MODEL_DIR, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionPipeline"


def test_pipeline_loads_offline_with_stock_classes(pipe, monkeypatch):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.tokenizer.model_max_length == TEXT_MAX_LENGTH
    assert pipe.unet.dtype == torch.float32


def test_every_world_word_is_one_token(pipe):
    words = list(world.SHAPES) + list(world.COLOURS) + list(world.BACKGROUNDS) + ["painting", "shape", "background"]
    for w in words:
        assert len(pipe.tokenizer(w, add_special_tokens=False).input_ids) == 1, w


def test_generation_is_deterministic_for_a_seed(pipe):
    a = generate(pipe, ["a red star", "a shape"], seed=3, steps=5)
    b = generate(pipe, ["a red star", "a shape"], seed=3, steps=5)
    c = generate(pipe, ["a red star", "a shape"], seed=4, steps=5)
    assert [np.asarray(x).tobytes() for x in a] == [np.asarray(x).tobytes() for x in b]
    assert np.asarray(a[0]).tobytes() != np.asarray(c[0]).tobytes()
    assert a[0].size == (world.IMAGE_SIZE, world.IMAGE_SIZE)


def test_scorer_reads_rendered_ground_truth(scorer):
    acc = accuracy_on_rendered(scorer, n=400, seed=777)
    for head in HEADS:
        assert acc[head] >= 0.97, (head, acc)


def test_scorer_reads_each_concept_mark_and_style(scorer):
    rng = random.Random(5)
    for mark in world.CONCEPT_MARKS:
        scenes = [world.random_scene(rng, mark=mark, allow_held_out=True) for _ in range(20)]
        assert np.mean([r["mark"] == mark for r in scorer.read([world.render(s) for s in scenes])]) >= 0.95
    for style in world.CONCEPT_STYLES:
        scenes = [world.random_scene(rng, style=style, allow_held_out=True) for _ in range(20)]
        assert np.mean([r["style"] == style for r in scorer.read([world.render(s) for s in scenes])]) >= 0.95


def test_the_second_scorer_reads_rendered_truth_and_dots_in_any_dark_ink(scorer):
    """models/shapes-scorer-inks (trained with --reink-marks) is the cross-check of the mark head: it must read
    rendered truth as the instrument does, and a dot redrawn in navy as a dot, where the instrument reads none."""
    from research.scorer_marks import ink_probe

    inks = Scorer(os.path.join(os.path.dirname(DEFAULT_SCORER_DIR), "shapes-scorer-inks"))
    acc = accuracy_on_rendered(inks, n=400, seed=777)
    for head in HEADS:
        assert acc[head] >= 0.97, (head, acc)
    probe = ink_probe(scorer, inks, n=24)
    for style in ("plain", "hollow"):
        assert probe[f"{style} black"]["scorer"] >= 0.95 and probe[f"{style} black"]["second_scorer"] >= 0.95
        assert probe[f"{style} navy"]["scorer"] <= 0.05 and probe[f"{style} navy"]["second_scorer"] >= 0.95


def test_the_geometric_dot_rule_that_cross_checks_the_scorer_reads_rendered_marks():
    """research/scorer_marks.py trusts this rule where it disagrees with the scorer, so it must be right on
    rendered truth: a dot on any shape, colour and background, and no dot for the other marks or none."""
    from PIL import Image

    from research.scorer_marks import has_centre_dot

    rng = random.Random(9)
    for mark in world.MARKS:
        scenes = [world.random_scene(rng, mark=mark, style="plain", allow_held_out=True) for _ in range(40)]
        found = [has_centre_dot(world.render(s)) for s in scenes]
        assert all(found) if mark == "dot" else not any(found), (mark, found)
    assert not has_centre_dot(Image.new("RGB", (32, 32), (128, 128, 128)))  # nothing drawn


def test_the_model_follows_colour_words(pipe, scorer):
    """A fast sanity check of prompt following (the full bars are in shapes_world.evaluate)."""
    colours = ["red", "green", "blue", "yellow"]
    prompts = [f"a {c} circle" if c != "yellow" else "a yellow square" for c in colours for _ in range(4)]
    reads = scorer.read(generate(pipe, prompts, seed=11, steps=20))
    acc = np.mean([r["colour"] == p.split()[1] for r, p in zip(reads, prompts)])
    assert acc >= 0.75, acc
