"""The service in-process on the embedded model: behaviour that must hold whatever the transport."""
import io
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from big.training import loop
from big.errors import BadRequest, Conflict, NotFound

from conftest import instance_images


def test_private_finetune_then_generate_reproducibly(service):
    r = service.finetune("alice", instance_images(), {"category": "shape"})
    assert r["status"] == "succeeded" and r["target"] == "private" and r["model_version"] == 1
    seconds = r["seconds"]  # where the job's time went, from its row (what /jobs and the CLI show)
    assert all(seconds[stage] > 0 for stage in ("load", "train", "commit")) and seconds["class_images"] >= 0
    assert seconds["total"] >= seconds["train"] + seconds["commit"]
    ident = r["identifier"]
    params = {"target_model": "private", "identifier": ident, "num_images": 2, "seed": 11}
    a = service.generate("alice", [f"a {ident} shape"], params)
    b = service.generate("alice", [f"a {ident} shape"], params)
    assert [g.seed for g in a] == [11, 12]
    assert [g.image.tobytes() for g in a] == [g.image.tobytes() for g in b]
    assert f"Seed: 11" in a[0].parameters_text() and f"private:{ident}" in a[0].parameters_text()


def test_a_finetune_sent_again_with_its_idempotency_key_gets_the_first_ones_job(service):
    params = {"category": "shape", "wait": False, "idempotency_key": "alice-first-heart"}
    first, _ = service.submit_finetune("alice", instance_images(), params)
    again, wait = service.submit_finetune("alice", instance_images(), {**params, "wait": True})  # a retry may wait
    assert again == first and wait
    jobs_dir = os.path.dirname(service.ws.job_dir(first))
    assert len(service.list_jobs("alice")) == 1 and len(os.listdir(jobs_dir)) <= 1  # no second copy of its images
    with pytest.raises(Conflict, match="idempotency_key 'alice-first-heart' was already used for another"):
        service.submit_finetune("alice", instance_images(seed=9), params)
    service.jobs.wait(first, timeout=120)
    assert [c["identifier"] for c in service.concepts("alice")] == [service.job("alice", first)["identifier"]]
    # Without a key each call is a request of its own; and a key is each user's own.
    assert service.submit_finetune("bob", instance_images(), params)[0] != first
    with pytest.raises(BadRequest, match="idempotency_key must be"):
        service.submit_finetune("alice", instance_images(), {**params, "idempotency_key": ""})


def test_private_concepts_are_invisible_to_other_users(service):
    ident = service.finetune("alice", instance_images(), {"category": "shape"})["identifier"]
    with pytest.raises(NotFound):
        service.generate("bob", ["a x shape"], {"target_model": "private", "identifier": ident})
    with pytest.raises(NotFound):
        service.delete("bob", ident)
    assert service.concepts("bob") == []
    assert [c["identifier"] for c in service.concepts("alice")] == [ident]


def test_meta_concepts_accumulate_and_are_visible_to_all(service):
    a = service.finetune("alice", instance_images(), {"category": "shape", "target_model": "meta"})
    b = service.finetune("bob", instance_images(style="checker", mark="none", shape="circle"),
                         {"category": "painting", "target_model": "meta"})
    assert (a["model_version"], b["model_version"]) == (1, 2)
    assert a["identifier"] != b["identifier"]
    seen_by_carol = {c["identifier"] for c in service.concepts("carol")}
    assert seen_by_carol == {a["identifier"], b["identifier"]}
    imgs = service.generate("carol", [f"a {b['identifier']} painting of a {a['identifier']} shape"],
                            {"target_model": "meta", "seed": 1})
    assert imgs[0].parameters["model_version"] == 2


def test_class_images_are_cached_across_users(service):
    cache_dir = service.ws.class_image_dir(service.base_key, "shape", service.size)
    shutil.rmtree(os.path.dirname(cache_dir))  # start from no cache: the fixture shares the session's
    service.finetune("alice", instance_images(), {"category": "shape", "num_class_images": 4})
    assert len([f for f in os.listdir(cache_dir) if f.endswith(".png")]) == 4
    before = sorted(os.listdir(cache_dir))
    mtimes = {f: os.path.getmtime(os.path.join(cache_dir, f)) for f in before}
    service.finetune("bob", instance_images(seed=3), {"category": "shape", "num_class_images": 4})
    after = sorted(os.listdir(cache_dir))
    assert after == before and all(os.path.getmtime(os.path.join(cache_dir, f)) == mtimes[f] for f in before)


def test_crash_mid_training_leaves_the_served_metamodel_intact(service, monkeypatch):
    first = service.finetune("alice", instance_images(), {"category": "shape", "target_model": "meta"})
    before = service.generate("alice", [f"a {first['identifier']} shape"], {"target_model": "meta", "seed": 5})
    real = loop.dreambooth

    def crashing(**kw):
        kw["progress"](1, 0.5)
        raise RuntimeError("simulated crash (out of memory) in training step 2")

    monkeypatch.setattr(loop, "dreambooth", crashing)
    with pytest.raises(Exception, match="simulated crash"):
        service.finetune("bob", instance_images(seed=9), {"category": "painting", "target_model": "meta"})
    monkeypatch.setattr(loop, "dreambooth", real)

    assert service.registry.get_model("meta")["current_version"] == 1
    assert [c["identifier"] for c in service.concepts("bob")] == [first["identifier"]]
    assert os.listdir(os.path.join(service.ws.root, "tmp")) == []
    assert sorted(os.listdir(service.ws.model_dir("meta"))) == [os.path.basename(service.registry.version_path("meta", 1))]
    assert os.listdir(os.path.join(service.ws.root, "jobs")) == []  # the failed job's stored images went with it
    after = service.generate("alice", [f"a {first['identifier']} shape"], {"target_model": "meta", "seed": 5})
    assert after[0].image.tobytes() == before[0].image.tobytes()
    jobs = service.list_jobs("bob")
    assert jobs[0]["status"] == "failed" and "simulated crash" in jobs[0]["error"]


def test_async_job_progress_and_cancel_leave_nothing_behind(service):
    r = service.finetune("alice", instance_images(), {"category": "shape", "target_model": "private_meta",
                                                      "max_train_steps": 3000, "wait": False})
    job_id = r["job_id"]
    deadline = time.time() + 60
    while service.job("alice", job_id)["step"] < 3 and time.time() < deadline:
        time.sleep(0.1)
    # Generation is served while the job trains.
    t0 = time.time()
    service.generate("alice", ["a red star"], {"seed": 1})
    assert service.job("alice", job_id)["status"] == "running", "the job finished before generate returned"
    view = service.job("alice", job_id)
    assert view["eta_s"] is not None and view["loss"] is not None
    with pytest.raises(NotFound):
        service.job("bob", job_id)
    service.job("alice", job_id, cancel=True)
    final = service.jobs.wait(job_id, timeout=60)
    assert final["status"] == "cancelled"
    ended = service.job("alice", job_id)
    assert ended["eta_s"] == 0.0  # ended: nothing left to wait for
    assert ended["seconds"]["train"] > 0 and ended["seconds"]["commit"] == 0.0  # where its time went, to the cancel
    assert service.registry.get_model("private_meta:alice")["current_version"] == 0
    assert service.concepts("alice") == []


def test_delete_removes_a_private_concept(service):
    ident = service.finetune("alice", instance_images(), {"category": "shape"})["identifier"]
    service.delete("alice", ident)
    assert service.concepts("alice") == []
    with pytest.raises(NotFound):
        service.generate("alice", ["x"], {"target_model": "private", "identifier": ident})


def test_bad_requests_change_nothing(service):
    with pytest.raises(BadRequest):
        service.finetune("alice", instance_images(), {"category": "shape", "max_train_steps": -3})
    with pytest.raises(BadRequest):
        service.finetune("alice", instance_images(), {"target_model": "meta"})
    with pytest.raises(BadRequest):
        service.generate("alice", ["a shape"], {"target_model": "private"})
    assert service.concepts("alice") == [] and service.list_jobs("alice") == []


def test_png_carries_its_parameters(service):
    from big.storage.workspace import png_bytes

    g = service.generate("alice", ["a red star"], {"seed": 3, "negative_prompt": "a blue star"})[0]
    with Image.open(io.BytesIO(png_bytes(g.image, g.png_info()))) as im:
        text = im.text["parameters"]
    assert text.startswith("a red star\nNegative prompt: a blue star\nSteps: 4")


def test_captions_shape_the_training_prompts_and_are_replayed_by_the_metamodel(service, monkeypatch):
    seen = []
    real = loop.dreambooth
    monkeypatch.setattr(loop, "dreambooth", lambda **kw: seen.append(kw) or real(**kw))
    style = service.finetune("alice", instance_images(2, style="checker", mark="none"), {
        "category": "painting", "target_model": "meta", "captions": ["a orange heart", None],
        "metamodel_strategy": "seed_split"})
    sid = style["identifier"]
    assert [e.prompt for e in seen[0]["instances"]] == [f"a {sid} painting", f"a {sid} painting of a orange heart",
                                                        f"a {sid} painting"]
    service.finetune("bob", instance_images(2), {"category": "shape", "target_model": "meta", "num_class_images": 16,
                                                 "metamodel_strategy": "seed_split"})
    replayed = {e.prompt for e in seen[1]["priors"]}
    assert {f"a {sid} painting of a orange heart", f"a {sid} painting"} <= replayed
    with pytest.raises(BadRequest, match="one per image"):
        service.finetune("alice", instance_images(2), {"category": "shape", "captions": ["only one"]})
    with pytest.raises(BadRequest, match="list of strings"):
        service.finetune("alice", instance_images(2), {"category": "shape", "captions": "a red star"})


def test_hue_copies_are_taught_and_stored_with_captions_that_name_no_hue(service, monkeypatch):
    seen = []
    real = loop.dreambooth
    monkeypatch.setattr(loop, "dreambooth", lambda **kw: seen.append(kw) or real(**kw))
    images = instance_images(2, style="checker", mark="none")
    style = service.finetune("alice", images, {"category": "painting", "target_model": "meta", "hue_copies": 2,
                                               "captions": ["a orange heart", None], "max_train_steps": 2})
    sid = style["identifier"]
    prompts = [e.prompt for e in seen[0]["instances"]]
    assert prompts.count(f"a {sid} painting of a orange heart") == 1  # the original image only
    assert prompts.count(f"a {sid} painting of a heart") == 2  # its two turned copies
    stored = service.ws.load_instances(style["concept_id"])
    assert len(stored) == 2 * 3
    first, turned = np.asarray(stored[0], dtype=int), np.asarray(stored[2], dtype=int)  # image 0 and its 1/3 turn
    assert np.abs(first - turned).sum(-1).max() > 100 and first.shape == turned.shape


@pytest.mark.parametrize("target,strategy,prior_batch,anchor", [
    ("meta", "naive", 4, 0.0), ("meta", "seed_split", 4, 0.0), ("meta", "anchored", 4, 1e-3),
    ("meta", "replay", 8, 2e-4), ("private_meta", "replay", 8, 2e-4), ("private", "replay", 4, 0.0),
    ("meta", "balanced", 8, 2e-4), ("meta", "adapters", 4, 0.0), ("private_meta", "adapters", 4, 0.0),
])
def test_metamodel_strategies_are_configs_the_training_receives(service, monkeypatch, target, strategy,
                                                                 prior_batch, anchor):
    seen = []
    real = loop.dreambooth
    monkeypatch.setattr(loop, "dreambooth", lambda **kw: seen.append(kw) or real(**kw))
    params = {"target_model": target, "metamodel_strategy": strategy, "num_class_images": 8}
    service.finetune("alice", instance_images(2), {**params, "category": "shape"})
    service.finetune("alice", instance_images(2, style="checker"), {**params, "category": "painting"})
    kw = seen[1]
    assert kw["prior_batch_size"] == prior_batch and kw["anchor_weight"] == anchor
    prompts = {e.prompt for e in kw["priors"]}
    replays_earlier = target != "private" and strategy not in ("naive", "adapters")
    assert (kw["lora"] is not None) == (target == "private" or strategy == "adapters")
    assert ("a shape" in prompts) == replays_earlier
    assert any(p.endswith(" shape") and p != "a shape" for p in prompts) == replays_earlier
    groups = kw.get("prior_groups")
    assert (groups is not None) == (strategy == "balanced")
    if groups is not None:  # one group per planned slot: class images of each category, each earlier concept
        assert len(groups) == len(kw["priors"]) and len(set(groups)) >= 3


def test_balanced_draws_give_every_group_an_equal_share():
    import torch

    members = [list(range(0, 40)), [40, 41], [42, 43, 44]]
    g = torch.Generator().manual_seed(0)
    idx = loop.draw_priors(g, 6000, 45, members).tolist()
    shares = [sum(i in set(m) for i in idx) / len(idx) for m in members]
    assert all(abs(s - 1 / 3) < 0.03 for s in shares), shares
    pooled = loop.draw_priors(g, 6000, 45, None).tolist()
    assert abs(sum(i < 40 for i in pooled) / 6000 - 40 / 45) < 0.03


def test_a_queued_job_survives_a_restart_of_everything(tmp_path):
    """A serving-only process queues a job and stops; a process started later on the same store runs it."""
    from benchmarks.harness import service as make_service

    ws = str(tmp_path / "store")
    server = make_service(ws, role="serve")
    job_id = server.submit_finetune("alice", instance_images(), {"category": "shape", "max_train_steps": 4,
                                                                 "num_class_images": 2, "wait": False})[0]
    server.close()
    later = make_service(ws)
    try:
        assert later.jobs.wait(job_id, timeout=120)["status"] == "succeeded"
        assert [c["identifier"] for c in later.concepts("alice")] == [later.job("alice", job_id)["identifier"]]
        assert os.listdir(os.path.join(ws, "jobs")) == []
    finally:
        later.close()
