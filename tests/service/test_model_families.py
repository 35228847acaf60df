"""Real architectures at tiny sizes, as diffusers' own tests build them, served as a user's model folder: SD 1.x
(epsilon), SD 2.x (v-prediction, linear projections, per-block head dims) and SDXL (two text encoders, pooled
embeddings, time ids) through every method, generation, reproduction from the PNG text, the metamodel's routing,
and export -> plain diffusers -> the same pixels. Random weights from `benchmarks/configs/*-tiny.json`: nothing is
downloaded."""
import numpy as np
import pytest
import torch

from conftest import assert_same_but_rounding, instance_images
from benchmarks.gpu import build
from big.service import BIGService, ServiceConfig

FAST = {"category": "dog", "max_train_steps": 4, "num_class_images": 2}
GEN = {"seed": 5, "num_inference_steps": 4}


@pytest.fixture(scope="module", params=["sd15-tiny", "sd2-tiny", "sdxl-tiny"])
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    pipe, cfg, _ = build(request.param, torch.device("cpu"), torch.float32)
    pipe.save_pretrained(str(folder / "model"), safe_serialization=True)
    svc = BIGService(ServiceConfig(workspace=str(folder / "ws"), base_model=str(folder / "model"),
                                   auth={"mode": "disabled"}))
    yield svc, cfg
    svc.close()


def pixels(images):
    return np.asarray(images[0].image, dtype=np.int16)


def test_every_method_trains_serves_and_reproduces(family):
    svc, cfg = family
    assert svc.models.noise_scheduler().config.prediction_type == cfg["scheduler"]["prediction_type"]
    for method in ("lora", "textual_inversion", "dreambooth"):
        r = svc.finetune("alice", instance_images(3), {**FAST, "method": method})
        assert r["method"] == method
        image = svc.generate("alice", [f"a {r['identifier']} dog"], {**GEN, "target_model": "private"})
        assert image[0].image.size == (cfg["resolution"], cfg["resolution"])
        again = svc.generate("alice", [], {"parameters": image[0].parameters_text(), "target_model": "private",
                                           "identifier": r["identifier"]})
        assert np.array_equal(pixels(image), pixels(again)), method
    meta = svc.finetune("bob", instance_images(3, colour="blue"), {**FAST, "target_model": "meta"})
    routed = svc.generate("carol", [f"a {meta['identifier']} dog"], {**GEN, "target_model": "meta"})
    plain = svc.generate("carol", [f"a {meta['identifier']} dog"], {**GEN, "target_model": "pretrained"})
    assert not np.array_equal(pixels(routed), pixels(plain))  # the concept's adapter serves its word
    # A user's own metamodel rewritten by DreamBooth twice (its float32 trunk trained again), then an adapter over it.
    for step, (colour, strategy) in enumerate((("green", "balanced"), ("yellow", "balanced"), ("red", "adapters"))):
        r = svc.finetune("bob", instance_images(3, colour=colour), {**FAST, "target_model": "private_meta",
                                                                     "metamodel_strategy": strategy})
        assert r["model_version"] == step + 1
        image = svc.generate("bob", [f"a {r['identifier']} dog"], {**GEN, "target_model": "private_meta"})
        again = svc.generate("bob", [], {"parameters": image[0].parameters_text(), "target_model": "private_meta"})
        assert np.array_equal(pixels(image), pixels(again)), strategy


def plain_pipeline(svc):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if svc.models.text_side.xl:
        return StableDiffusionXLPipeline.from_pretrained(svc.config.base_model, add_watermarker=False)
    return StableDiffusionPipeline.from_pretrained(svc.config.base_model, safety_checker=None,
                                                   requires_safety_checker=False)


def load_exported_embedding(plain, folder, token):
    """The exported embedding into plain diffusers, as its docs load one (SDXL: each encoder's file)."""
    plain.load_textual_inversion(str(folder / "learned_embeds.safetensors"), token=token)
    if hasattr(plain, "text_encoder_2"):
        plain.load_textual_inversion(str(folder / "learned_embeds_2.safetensors"), token=token,
                                     text_encoder=plain.text_encoder_2, tokenizer=plain.tokenizer_2)


def test_a_lora_export_loads_in_plain_diffusers_and_makes_the_same_image(family, tmp_path):
    svc, cfg = family
    r = svc.finetune("dave", instance_images(3, shape="star"), {**FAST, "method": "lora"})
    for name, data in svc.export("dave", r["identifier"]):
        (tmp_path / name).write_bytes(data)
    ours = svc.generate("dave", [f"a {r['identifier']} dog"], {**GEN, "target_model": "private"})
    plain = plain_pipeline(svc)
    plain.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    load_exported_embedding(plain, tmp_path, "<dave-concept>")
    theirs = plain("a <dave-concept> dog", num_inference_steps=4, guidance_scale=svc.generate_defaults["guidance_scale"],
                   generator=torch.Generator().manual_seed(5)).images[0]
    assert np.abs(np.asarray(theirs, dtype=np.int16) - pixels(ours)).mean() < 1.0


def test_prompt_syntax_on_every_family(family):
    """Emphasis, `AND` and a prompt past the encoder's window change the image and reproduce from the PNG text."""
    svc, _ = family
    plain = svc.generate("erin", ["a red star dog"], GEN)
    for prompt in ("a (red:1.6) star dog", "a red star dog AND a blue circle :0.5",
                   "a red star dog, " + "very " * 90 + "detailed"):
        image = svc.generate("erin", [prompt], GEN)
        assert not np.array_equal(pixels(image), pixels(plain)), prompt
        again = svc.generate("erin", [], {"parameters": image[0].parameters_text()})
        assert np.array_equal(pixels(image), pixels(again)), prompt


def test_sweeps_grids_and_batched_requests_on_every_family(family):
    """A guidance sweep (one call, a guidance scale per image), a grid and two users' requests served in shared
    calls: each image is the one its own request makes."""
    svc, _ = family
    frames, gif = svc.sweep("kim", ["a blue star dog"], {**GEN, "values": [1, 3, 9]})
    assert len(frames) == 3 and gif[:6] == b"GIF89a"
    assert_same_but_rounding(frames[2:], svc.generate("kim", [], {"parameters": frames[2].parameters_text()}), "cpu")
    images, sheet = svc.grid("kim", ["a red dog"], {**GEN, "guidance_scales": [2, 5], "num_seeds": 2})
    assert len(images) == 4 and sheet
    calls = [("kim", ["a red dog"], GEN), ("lou", ["a blue dog"], GEN)]
    together = svc.generate_many(calls)
    assert_same_but_rounding([i for r in together for i in r], [i for c in calls for i in svc.generate(*c)], "cpu")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    pipe, cfg, _ = build("sdxl-tiny", torch.device("cpu"), torch.float32)
    pipe.save_pretrained(str(folder / "model"), safe_serialization=True)
    svc = BIGService(ServiceConfig(workspace=str(folder / "ws"), base_model=str(folder / "model"),
                                   auth={"mode": "disabled"}))
    yield svc
    svc.close()


def test_sdxl_generates_what_the_plain_sdxl_pipeline_generates(sdxl):
    """The same image as diffusers' own call, to float rounding (BIG encodes prompts and negative prompts in one
    batch)."""
    ours = sdxl.generate("frank", ["a red star dog"], GEN)
    theirs = plain_pipeline(sdxl)("a red star dog", num_inference_steps=4,
                                  guidance_scale=sdxl.generate_defaults["guidance_scale"],
                                  generator=torch.Generator().manual_seed(5)).images[0]
    assert_same_but_rounding([theirs], ours, "cpu")


def test_sdxl_textual_inversion_learns_both_encoders_and_exports_their_files(sdxl, tmp_path):
    from safetensors.torch import load_file

    r = sdxl.finetune("gina", instance_images(3, shape="star"), {**FAST, "method": "textual_inversion",
                                                                  "num_vectors": 2})
    files = dict(sdxl.export("gina", r["identifier"]))
    assert set(files) == {"learned_embeds.safetensors", "learned_embeds_2.safetensors",
                          f"{r['identifier']}.safetensors"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    a1111 = load_file(str(tmp_path / f"{r['identifier']}.safetensors"))
    widths = [sdxl.base_pipe.text_encoder.config.hidden_size, sdxl.base_pipe.text_encoder_2.config.hidden_size]
    assert [tuple(a1111[k].shape) for k in ("clip_l", "clip_g")] == [(2, widths[0]), (2, widths[1])]
    assert dict(sdxl.export("gina", r["identifier"], "a1111")).keys() == {f"{r['identifier']}.safetensors"}
    # The AUTOMATIC1111 file imports as a concept that draws what the trained one draws.
    back = sdxl.import_concept("gina", [(f"{r['identifier']}.safetensors", files[f"{r['identifier']}.safetensors"])],
                               {"category": "dog"})
    trained = sdxl.generate("gina", [f"a {r['identifier']} dog"], {**GEN, "target_model": "private",
                                                                  "identifier": r["identifier"]})
    imported = sdxl.generate("gina", [f"a {back['identifier']} dog"], {**GEN, "target_model": "private",
                                                                      "identifier": back["identifier"]})
    assert np.array_equal(pixels(trained), pixels(imported))
    # ... and the diffusers files load in plain diffusers and make the same image.
    plain = plain_pipeline(sdxl)
    load_exported_embedding(plain, tmp_path, "<gina-concept>")
    theirs = plain("a <gina-concept> dog", num_inference_steps=4,
                   guidance_scale=sdxl.generate_defaults["guidance_scale"],
                   generator=torch.Generator().manual_seed(5)).images[0]
    assert np.abs(np.asarray(theirs, dtype=np.int16) - pixels(trained)).mean() < 1.0


def test_a_kohya_lora_imports_on_sdxl(sdxl):
    """A LoRA in kohya's key format (what kohya's sd-scripts and diffusers' `--output_kohya_format` write) imports
    and draws as the LoRA it was converted from."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load, save

    r = sdxl.finetune("hank", instance_images(3, shape="star"), {**FAST, "method": "lora",
                                                                  "train_identifier_embedding": False})
    files = dict(sdxl.export("hank", r["identifier"], "diffusers"))
    kohya = convert_state_dict_to_kohya(load(files["pytorch_lora_weights.safetensors"]))
    assert all(k.startswith("lora_unet_") for k in kohya)
    back = sdxl.import_concept("hank", [("kohya.safetensors", save(kohya))], {"category": "dog"})
    assert back["method"] == "lora"
    ours = sdxl.generate("hank", ["a star dog"], {**GEN, "target_model": "private", "identifier": r["identifier"]})
    theirs = sdxl.generate("hank", ["a star dog"], {**GEN, "target_model": "private",
                                                    "identifier": back["identifier"]})
    assert np.abs(pixels(ours) - pixels(theirs)).mean() < 1.0


def test_sdxl_lora_of_both_text_encoders_trains_exports_and_loads_in_plain_diffusers(sdxl, tmp_path):
    from safetensors.torch import load

    r = sdxl.finetune("jill", instance_images(3, shape="star"), {**FAST, "method": "lora", "lora_text_encoder": True})
    files = dict(sdxl.export("jill", r["identifier"], "diffusers"))
    keys = load(files["pytorch_lora_weights.safetensors"]).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    ours = sdxl.generate("jill", [f"a {r['identifier']} dog"], {**GEN, "target_model": "private",
                                                               "identifier": r["identifier"]})
    plain = plain_pipeline(sdxl)
    plain.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    load_exported_embedding(plain, tmp_path, "<jill-concept>")
    theirs = plain("a <jill-concept> dog", num_inference_steps=4,
                   guidance_scale=sdxl.generate_defaults["guidance_scale"],
                   generator=torch.Generator().manual_seed(5)).images[0]
    assert np.abs(np.asarray(theirs, dtype=np.int16) - pixels(ours)).mean() < 1.0
    again = sdxl.generate("jill", [], {"parameters": ours[0].parameters_text(), "target_model": "private",
                                       "identifier": r["identifier"]})
    assert np.array_equal(pixels(ours), pixels(again))


def test_sdxl_refuses_training_its_text_encoders(sdxl):
    from big.errors import BadRequest

    for params in ({"method": "dreambooth", "train_text_encoder": True},
                   {"method": "dreambooth", "train_identifier_embedding": True}):
        with pytest.raises(BadRequest, match="text encoders' own weights stay frozen"):
            sdxl.finetune("ivan", instance_images(3), {**FAST, **params})
