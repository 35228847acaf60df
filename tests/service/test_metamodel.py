"""The `adapters` metamodel strategy: each concept its own adapter over an unchanged trunk, routed by prompt."""
import json
import os

import pytest

from conftest import instance_images
from big.storage.versions import read_version
from big.training import loop
from big.weights import metamodel
from big.errors import BadRequest


def _bytes(images):
    return [g.image.tobytes() for g in images]


def test_a_new_adapter_changes_no_image_of_an_earlier_concept_or_of_the_base(service):
    a = service.finetune("alice", instance_images(), {"category": "shape", "target_model": "meta"})
    def gen(prompts, **kw):
        return service.generate("carol", prompts, {"target_model": "meta", "seed": 3, **kw})

    first_v1 = gen([f"a {a['identifier']} shape"])
    b = service.finetune("bob", instance_images(style="checker", mark="none", shape="circle"),
                         {"category": "painting", "target_model": "meta"})
    assert (a["model_version"], b["model_version"], a["method"], b["method"]) == (1, 2, "lora", "lora")

    folder = service.registry.version_path("meta", 2)
    assert "pytorch_lora_weights.safetensors" in os.listdir(folder) and not os.path.isdir(f"{folder}/unet")
    with open(f"{folder}/big_version.json") as f:
        stack = metamodel.stack_of(json.load(f), 2)
    assert stack.trunk_version == 0 and [(x.version, x.identifier) for x in stack.adapters] == \
        [(1, a["identifier"]), (2, b["identifier"])]

    # Exactly the same images: the second concept cannot have made the model forget the first ...
    assert _bytes(gen([f"a {a['identifier']} shape"])) == _bytes(first_v1)
    # ... nor the base vocabulary, which the trunk (here the base model) serves unchanged ...
    plain = ["a red star", "a shape"]
    assert _bytes(gen(plain)) == _bytes(service.generate("carol", plain, {"target_model": "pretrained", "seed": 3}))
    # ... while the adapter is really applied to the prompts that name it.
    assert _bytes(first_v1) != _bytes(service.generate("carol", [f"a {a['identifier']} shape"],
                                                       {"target_model": "pretrained", "seed": 3}))
    # One request mixing prompts of different adapter sets gives each prompt the image it gets alone.
    mixed = [f"a {b['identifier']} painting of a {a['identifier']} shape", "a red star", f"a {a['identifier']} shape"]
    together = gen(mixed, num_images=2)
    alone = [im for i, p in enumerate(mixed) for im in gen([p], num_images=2, seed=3 + 2 * i)]
    assert _bytes(together) == _bytes(alone)
    assert {g.parameters["model_version"] for g in together} == {2}


def test_a_dreambooth_step_after_adapters_rewrites_the_trunk_and_keeps_the_adapters(service, monkeypatch):
    a = service.finetune("alice", instance_images(), {"category": "shape", "target_model": "private_meta"})
    seen = []
    real = loop.dreambooth
    monkeypatch.setattr(loop, "dreambooth", lambda **kw: seen.append(kw) or real(**kw))
    b = service.finetune("alice", instance_images(seed=4, shape="star", colour="red", mark="ring"),
                         {"category": "shape", "target_model": "private_meta", "metamodel_strategy": "seed_split",
                          "num_class_images": 8})
    assert b["method"] == "dreambooth" and b["model_version"] == 2
    # The adapter concept is kept by its adapter: nothing of it is replayed into the trunk.
    assert {e.prompt for e in seen[0]["priors"]} == {"a shape"} and seen[0]["lora"] is None
    folder = service.registry.version_path("private_meta:alice", 2)
    assert os.path.isdir(f"{folder}/unet")
    stack = service.models.stack("private_meta:alice", 2)
    assert stack.trunk_version == 2 and [x.identifier for x in stack.adapters] == [a["identifier"]]
    images = service.generate("alice", [f"a {a['identifier']} shape", f"a {b['identifier']} shape"],
                              {"target_model": "private_meta", "seed": 1})
    assert len(images) == 2 and images[0].image.tobytes() != images[1].image.tobytes()


def test_a_strategy_decides_how_a_metamodel_learns(service):
    with pytest.raises(BadRequest, match="learns by method 'lora'"):
        service.finetune("alice", instance_images(), {"category": "shape", "target_model": "meta",
                                                      "method": "dreambooth"})
    with pytest.raises(BadRequest, match="learns by method 'dreambooth'"):
        service.finetune("alice", instance_images(), {"category": "shape", "target_model": "meta",
                                                      "metamodel_strategy": "seed_split", "method": "lora"})
    assert service.concepts("alice") == []


def test_a_route_is_served_by_a_cached_unet_with_its_adapters_merged(service):
    import numpy as np
    import torch

    from big.weights import lora

    a = service.finetune("alice", instance_images(), {"category": "shape", "target_model": "meta"})
    prompts, params = [f"a {a['identifier']} shape"], {"target_model": "meta", "seed": 3}
    fused_images = service.generate("carol", prompts, params)
    name = lora.LoraRuntime.adapter_name(service.registry.find_concept(
        owner="alice", target="meta", identifier=a["identifier"])["concept_id"])
    assert [k for k in service.cache.keys() if "+" in k] == [f"meta@0+{name}*1.0"]
    assert _bytes(service.generate("carol", prompts, params)) == _bytes(fused_images)  # merged once, reused

    # The merged UNet computes what peft's unmerged layers compute, and the adapter really changes it.
    fused = service.cache.get(f"meta@0+{name}*1.0", lambda: pytest.fail("not cached")).unet
    lora_unet = service.loras.activate([(name, read_version(service.registry.version_path("meta", 1)).lora_file, 1.0)]).unet
    g = torch.Generator().manual_seed(0)
    dtype = service.base_pipe.unet.dtype  # fp16 on a GPU
    x, states = (torch.randn(*shape, generator=g).to(service.device, dtype) for shape in ((2, 4, 16, 16), (2, 6, 128)))
    with torch.no_grad():
        out = {k: u(x, torch.tensor([500, 900], device=service.device), states).sample.float() for k, u in
               (("fused", fused), ("peft", lora_unet), ("base", service.base_pipe.unet))}
    effect, error = (out["peft"] - out["base"]).abs().max(), (out["fused"] - out["peft"]).abs().max()
    # Merging moves the rounding: a few units of the dtype's last place on the output's scale.
    rounding = 8 * torch.finfo(dtype).eps * out["base"].abs().max()
    assert effect > 1e-4 and error < 0.01 * effect + rounding, (effect, error, rounding)

    service.config.fuse_adapters = False  # the unmerged path paints the same images within rounding
    unmerged = np.asarray(service.generate("carol", prompts, params)[0].image, dtype=int)
    assert np.abs(unmerged - np.asarray(fused_images[0].image, dtype=int)).max() <= 2


def test_adapters_with_different_lora_targets_merge_into_one_route(service):
    import numpy as np

    # One concept adapts attention only, the next every layer: a prompt naming both merges both, each
    # into the modules it has (this crashed with a KeyError before).
    a = service.finetune("alice", instance_images(), {"category": "shape", "target_model": "meta",
                                                      "lora_targets": "attention"})
    b = service.finetune("bob", instance_images(seed=9, shape="star", colour="red", mark="ring"),
                         {"category": "shape", "target_model": "meta", "lora_targets": "all"})
    prompts = [f"a {a['identifier']} shape next to a {b['identifier']} shape"]
    params = {"target_model": "meta", "seed": 3}
    fused = np.asarray(service.generate("carol", prompts, params)[0].image, dtype=int)
    assert len([k for k in service.cache.keys() if "+" in k]) == 1
    service.config.fuse_adapters = False
    unmerged = np.asarray(service.generate("carol", prompts, params)[0].image, dtype=int)
    assert np.abs(unmerged - fused).max() <= 2
    only_a = np.asarray(service.generate("carol", [f"a {a['identifier']} shape next to a shape"], params)[0].image,
                        dtype=int)
    assert np.abs(only_a - fused).max() > 2  # the second adapter really is in the merged route


def test_a_route_whose_adapter_also_adapts_the_text_encoder_is_not_merged(service):
    a = service.finetune("alice", instance_images(), {"category": "shape", "target_model": "meta",
                                                      "lora_text_encoder": True})
    images = service.generate("carol", [f"a {a['identifier']} shape"], {"target_model": "meta", "seed": 3})
    assert len(images) == 1
    assert [v for k, v in service.cache.entries().items() if "+" in k] == [None]  # known unmergeable: unmerged
