"""Private concepts in megabytes: LoRA and textual inversion, hot-swapped on the loaded base, exported in the
formats other tools read, imported back; and training images prepared as people prepare them."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from big.training import preprocess
from big.weights import embeddings
from big.errors import BadRequest


# ---------------------------------------------------------------------------------------------- preparing images
def _scene(w, h, at):
    img = Image.new("RGB", (w, h), (20, 20, 20))
    ImageDraw.Draw(img).ellipse((at[0] - 10, at[1] - 10, at[0] + 10, at[1] + 10), fill=(240, 120, 0))
    return img


def test_focal_crop_keeps_an_off_centre_subject_that_a_centre_crop_cuts_off():
    img = _scene(160, 64, at=(140, 32))
    fx, fy = preprocess.focal_point(img)
    assert fx > 0.75 and 0.35 < fy < 0.65
    orange = lambda im: int((np.asarray(im)[..., 0] > 200).sum())  # noqa: E731
    assert orange(preprocess.crop_square(img, "focal")) > 0.9 * orange(img)
    assert orange(preprocess.crop_square(img, "center")) == 0


def test_oversized_images_split_into_overlapping_square_tiles():
    tiles = preprocess.split_tiles(_scene(200, 64, at=(30, 30)))
    assert len(tiles) == 4 and all(t.size == (64, 64) for t in tiles)
    lefts = np.linspace(0, 200 - 64, 4).round()
    assert (lefts[1] - lefts[0]) <= 64 * (1 - preprocess.TILE_OVERLAP)  # neighbours overlap by >= 25%
    assert preprocess.split_tiles(_scene(90, 64, at=(30, 30)))[0].size == (90, 64)  # not oversized: as is
    tall = preprocess.split_tiles(_scene(50, 120, at=(25, 25)))
    assert len(tall) == 3 and all(t.size == (50, 50) for t in tall)


def test_prepare_tiles_then_mirrors_and_keeps_captions():
    out = preprocess.prepare([_scene(200, 64, at=(30, 30)), _scene(64, 64, at=(20, 32))], ["wide", None],
                             split_oversized=True, flip=True)
    assert len(out.images) == 2 * (4 + 1) and out.captions == ["wide"] * 4 + [None] + ["wide"] * 4 + [None]
    assert np.array_equal(np.asarray(out.images[5]), np.asarray(out.images[0])[:, ::-1])


def test_hue_copies_turn_colours_keep_greys_and_drop_hue_words_from_captions():
    img = Image.new("RGB", (8, 8), (245, 245, 245))
    img.paste((220, 30, 30), (2, 2, 6, 6))  # a red square on white
    out = preprocess.prepare([img], ["an orange heart on a white background"], hue_copy_count=3, flip=True)
    assert len(out.images) == 2 * 4
    assert out.captions[:4] == ["an orange heart on a white background"] + ["a heart on a white background"] * 3
    hues = []
    for copy in out.images[1:4]:
        px = np.asarray(copy)
        assert tuple(px[0, 0]) == (245, 245, 245)  # grey stays grey
        hues.append(int(np.asarray(copy.convert("HSV"))[3, 3, 0]))
        assert np.abs(px[3, 3].astype(int) - [220, 30, 30]).sum() > 100  # the red is another colour now
    red_hue = int(np.asarray(img.convert("HSV"))[3, 3, 0])
    turns = [(h - red_hue) % 256 for h in hues]  # a quarter, a half, three quarters round (8-bit HSV rounds)
    assert all(abs(t - want) <= 2 for t, want in zip(turns, [64, 128, 192])), turns
    assert np.array_equal(np.asarray(out.images[5]), np.asarray(out.images[1])[:, ::-1])  # then mirrored


@pytest.mark.parametrize("caption,expected", [
    ("a purple heart", "a heart"),
    ("An orange cat, on a green rug.", "A cat, on a rug."),
    ("a red apple and a black hat", "an apple and a black hat"),
    ("two dogs", "two dogs"),
])
def test_a_hue_rotated_copy_names_no_hue(caption, expected):
    assert preprocess.without_hue_words(caption) == expected


@pytest.mark.parametrize("template,filewords,expected", [
    ("a painting of [filewords] by [name]", "a red boat", "a painting of a red boat by qzq"),
    ("a painting of [filewords] by [name]", None, "a painting of by qzq"),
    ("[name] [category], [filewords]", None, "qzq shape"),
    ("[filewords], a [name] [category]", "two cats", "two cats, a qzq shape"),
])
def test_prompt_templates(template, filewords, expected):
    assert preprocess.fill_template(template, name="qzq", category="shape", filewords=filewords) == expected


# ---------------------------------------------------------------------------------------------- embeddings
def test_embedding_files_round_trip_in_both_formats():
    vec = torch.randn(3, 128)
    word, back = embeddings.read_embedding_file(embeddings.to_diffusers_bytes("qzq", vec), "x.safetensors", (128,))
    assert word == "qzq" and torch.equal(back[0], vec)
    word, back = embeddings.read_embedding_file(embeddings.to_a1111_bytes("qzq", vec, 7, 10, "m"), "qzq.pt", (128,))
    assert word == "qzq" and torch.equal(back[0], vec)
    with pytest.raises(BadRequest, match="do not fit"):
        embeddings.read_embedding_file(embeddings.to_diffusers_bytes("qzq", torch.randn(2, 64)), "x.safetensors",
                                       (128,))
    with pytest.raises(BadRequest, match="not an embedding"):
        embeddings.read_embedding_file(b"\x80\x04garbage", "x.pt", (128,))
    with pytest.raises(BadRequest, match="non-finite"):
        embeddings.read_embedding_file(embeddings.to_diffusers_bytes("q", torch.full((1, 128), float("nan"))),
                                       "x.safetensors", (128,))


def test_sdxl_embedding_files_carry_both_encoders_vectors():
    clip_l, clip_g = torch.randn(2, 32), torch.randn(2, 48)
    word, back = embeddings.read_embedding_file(embeddings.to_a1111_xl_bytes(clip_l, clip_g), "qzq.safetensors",
                                                (32, 48))
    assert word == "qzq" and torch.equal(back[0], clip_l) and torch.equal(back[1], clip_g)
    with pytest.raises(BadRequest, match="clip_l` and `clip_g"):  # a one-encoder file on an SDXL model
        embeddings.read_embedding_file(embeddings.to_diffusers_bytes("qzq", clip_l), "x.safetensors", (32, 48))
    with pytest.raises(BadRequest, match="do not fit"):
        embeddings.read_embedding_file(embeddings.to_a1111_xl_bytes(clip_g, clip_l), "x.safetensors", (32, 48))


# ---------------------------------------------------------------------------------------------- LoRA concepts


# ---------------------------------------------------------------------------------------------- textual inversion


def test_sd15_byte_ratio_is_counted_on_its_real_architecture():
    from benchmarks.personal_bench import sd15_ratios

    r = sd15_ratios(4, "attention", 4)
    assert r["unet_params"] == 859_520_964  # Stable Diffusion 1.5's UNet
    assert r["lora_params"] == 797_184 and r["lora_vs_unet"] < 0.02


