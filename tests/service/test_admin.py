"""An admin retires a public metamodel concept and restores it: nothing else any prompt makes changes."""
import numpy as np
import pytest

from conftest import instance_images
from big.errors import BadRequest, Conflict, NotFound

FAST = {"category": "shape", "target_model": "meta", "max_train_steps": 6, "num_class_images": 4}
GEN = {"target_model": "meta", "seed": 3, "num_images": 2, "num_inference_steps": 4}


def pixels(images):
    return [np.asarray(i.image) for i in images]


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def test_retiring_a_concept_changes_no_other_concepts_images_and_no_base_prompts(service):
    a = service.finetune("alice", instance_images(3, seed=1), FAST)
    b = service.finetune("bob", instance_images(3, seed=2, shape="star", colour="red", mark="ring"), FAST)
    prompts = {"a": f"a {a['identifier']} shape", "b": f"a {b['identifier']} shape", "base": "a green circle shape"}
    before = {k: pixels(service.generate("carol", [p], GEN)) for k, p in prompts.items()}

    listed = {c["identifier"]: c for c in service.metamodel_concepts()}
    assert listed[b["identifier"]]["author"] == "bob" and listed[b["identifier"]]["routed"]
    r = service.retire(b["identifier"])
    assert r == {"identifier": b["identifier"], "status": "retired", "model_version": 3}

    after = {k: pixels(service.generate("carol", [p], GEN)) for k, p in prompts.items()}
    assert same(after["a"], before["a"]) and same(after["base"], before["base"])
    # The retired word is an ordinary word again: the trunk alone, as the pretrained model draws it.
    plain = pixels(service.generate("carol", [prompts["b"]], {**GEN, "target_model": "pretrained"}))
    assert same(after["b"], plain) and not same(after["b"], before["b"])
    # Its history is kept: the version before reproduces its images.
    assert same(pixels(service.generate("carol", [prompts["b"]], {**GEN, "model_version": 2})), before["b"])
    assert b["identifier"] not in {c["identifier"] for c in service.concepts("carol")}
    listed = {c["identifier"]: c for c in service.metamodel_concepts()}
    assert listed[b["identifier"]]["status"] == "retired" and not listed[b["identifier"]]["routed"]

    with pytest.raises(Conflict):
        service.retire(b["identifier"])
    assert service.restore(b["identifier"])["model_version"] == 4
    restored = {k: pixels(service.generate("carol", [p], GEN)) for k, p in prompts.items()}
    assert all(same(restored[k], before[k]) for k in prompts)
    with pytest.raises(NotFound):
        service.retire("nosuchword")


def test_a_concept_in_the_trunk_cannot_be_retired(service):
    r = service.finetune("alice", instance_images(3), {**FAST, "metamodel_strategy": "naive"})
    with pytest.raises(BadRequest, match="DreamBooth"):
        service.retire(r["identifier"])
