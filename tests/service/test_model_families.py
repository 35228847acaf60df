"""Real architectures at tiny sizes, as diffusers' own tests build them, served as a user's model folder: SD 1.x
(epsilon) and SD 2.x (v-prediction, linear projections, per-block head dims) through every method, generation,
reproduction from the PNG text, the metamodel's routing, and export -> plain diffusers -> the same pixels. Random
weights from `benchmarks/configs/*-tiny.json`: nothing is downloaded."""
import numpy as np
import pytest
import torch

from conftest import instance_images
from benchmarks.gpu import build
from big.service import BIGService, ServiceConfig

FAST = {"category": "dog", "max_train_steps": 4, "num_class_images": 2}
GEN = {"seed": 5, "num_inference_steps": 4}


@pytest.fixture(scope="module", params=["sd15-tiny", "sd2-tiny"])
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


def test_a_lora_export_loads_in_plain_diffusers_and_makes_the_same_image(family, tmp_path):
    from diffusers import StableDiffusionPipeline

    svc, cfg = family
    r = svc.finetune("dave", instance_images(3, shape="star"), {**FAST, "method": "lora"})
    for name, data in svc.export("dave", r["identifier"]):
        (tmp_path / name).write_bytes(data)
    ours = svc.generate("dave", [f"a {r['identifier']} dog"], {**GEN, "target_model": "private"})
    plain = StableDiffusionPipeline.from_pretrained(svc.config.base_model, safety_checker=None,
                                                    requires_safety_checker=False)
    plain.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    plain.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"), token="<dave-concept>")
    theirs = plain("a <dave-concept> dog", num_inference_steps=4, guidance_scale=svc.generate_defaults["guidance_scale"],
                   generator=torch.Generator().manual_seed(5)).images[0]
    assert np.abs(np.asarray(theirs, dtype=np.int16) - pixels(ours)).mean() < 1.0
