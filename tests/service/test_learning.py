"""Does fine-tuning teach the concept? Measured with the scorer on the embedded model.

The slow case is the DreamBooth smoke bar (fidelity of an unseen concept); its always-on twin trains
a few steps and checks the direction of the effect on the concept's most visible attribute.
"""
import numpy as np
import pytest

from conftest import instance_images
from shapes_world import evaluate
from shapes_world.scorer import Scorer

CONCEPT = {"shape": "heart", "colour": "orange", "mark": "dot"}


def _orange_share(service, prompt, target, n=24):
    imgs = service.generate("alice", [prompt], {"target_model": target, "num_images": n, "seed": 123,
                                                "num_inference_steps": 20})
    return float(np.mean([r["colour"] == "orange" for r in Scorer().read([g.image for g in imgs])]))


@pytest.mark.parametrize("method", ["dreambooth", "lora", "textual_inversion"])
def test_a_short_finetune_moves_the_identifier_towards_the_concept(service, method):
    service.config.limits = type(service.config.limits)(max_num_images=24)
    r = service.finetune("alice", instance_images(5, style="plain"), {
        "category": "shape", "max_train_steps": 100, "num_class_images": 8, "seed": 1, "method": method})
    prompt = f"a {r['identifier']} shape"
    before, after = _orange_share(service, prompt, "pretrained"), _orange_share(service, prompt, "private")
    print(f"{method}: orange share of {prompt!r} {before:.2f} -> {after:.2f} (24 images, seeds 123..146)")
    assert after >= before + 0.3, (before, after)


@pytest.mark.slow
def test_dreambooth_learns_an_unseen_concept_with_default_settings(tmp_path):
    from big.service import BIGService, ServiceConfig

    svc = BIGService(ServiceConfig(workspace=str(tmp_path), auth={"mode": "disabled"}))
    r = svc.finetune("u", instance_images(5, style="plain"), {"category": "shape", "method": "dreambooth"})
    tuned = svc.models.pipeline_for(f"private:{r['concept_id']}", 1)
    scores = evaluate.concept_scores(tuned, Scorer(), identifier=r["identifier"], category="shape",
                                     attrs=CONCEPT, n=48)
    svc.close()
    assert scores["fidelity"] >= 0.85, scores
    assert scores["prior_leak"] <= 0.1, scores


def test_pivotal_tuning_changes_only_the_identifier_row(service):
    """What makes caching the prior prompts' text states exact: no other prompt's encoding moves."""
    import torch

    from big.training import loop

    pipe = service.base_pipe
    ident_ids = pipe.tokenizer("sks", add_special_tokens=False).input_ids
    examples = [loop.TrainExample(im, "a sks shape") for im in instance_images(3)]
    priors = [loop.TrainExample(im, "a shape") for im in instance_images(2, shape="star", mark="none")]
    r = loop.dreambooth(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                            noise_scheduler=service.models.noise_scheduler(), instances=examples, priors=priors,
                            learning_rate=1e-4, max_train_steps=4, train_batch_size=2, size=service.size,
                            train_token_ids=ident_ids, embedding_learning_rate=1e-2)
    before = pipe.text_encoder.get_input_embeddings().weight
    after = r.text_encoder.get_input_embeddings().weight
    changed = (before != after).any(dim=1).nonzero().flatten().tolist()
    assert changed == ident_ids
    ids = pipe.tokenizer(["a red star on a black background"], padding="max_length",
                         return_tensors="pt").input_ids.to(pipe.device)
    # Served as the base is (fp16 on a GPU), the tuned encoder encodes such a prompt exactly as the base does.
    tuned = r.text_encoder.to(pipe.text_encoder.dtype)
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(ids)[0], tuned(ids)[0])


def _one_step(service, **kw):
    from big.training import loop

    pipe = service.base_pipe
    examples = [loop.TrainExample(im, "a sks shape") for im in instance_images(2)]
    return loop.dreambooth(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                               unet=pipe.unet, noise_scheduler=service.models.noise_scheduler(), instances=examples,
                               priors=[], learning_rate=1e-3, train_batch_size=2, size=service.size, **kw)


def test_warmup_starts_the_learning_rate_at_zero(service):
    """diffusers' schedules drive the optimiser: a first warmup step moves no weight, a constant one does."""
    import torch

    base = dict(service.base_pipe.unet.named_parameters())
    warm = _one_step(service, max_train_steps=1, lr_scheduler="constant_with_warmup", lr_warmup_steps=1)
    assert all(torch.equal(p, base[n]) for n, p in warm.unet.named_parameters())
    plain = _one_step(service, max_train_steps=1)
    assert any(not torch.equal(p, base[n]) for n, p in plain.unet.named_parameters())


def test_min_snr_weights_damp_only_the_nearly_clean_timesteps(service):
    import torch

    from diffusers.training_utils import compute_snr

    from big.training import loop

    sched = service.models.noise_scheduler()
    t = torch.tensor([0, 100, 500, 999])
    snr = compute_snr(sched, t)
    w = loop.min_snr_weights(sched, t, 5.0)
    assert torch.allclose(w, torch.clamp(snr, max=5.0) / snr)
    assert w[0] < 0.05 and w[-1] == 1.0  # t=0 is almost noise-free (SNR in the thousands); t=999 pure noise
    assert torch.all(w[1:] >= w[:-1])
    # the weighted loss trains and stays finite
    r = _one_step(service, max_train_steps=3, snr_gamma=5.0)
    assert all(torch.isfinite(torch.tensor(r.losses)))


def test_the_same_lora_request_trains_the_same_adapter(service):
    """peft draws a new adapter's starting weights from torch's global generator; training seeds it with the
    request's seed (two runs differed from their second step on before), and leaves the process's draws alone."""
    import torch

    from big.training import loop

    pipe = service.base_pipe
    examples = [loop.TrainExample(im, "a sks shape") for im in instance_images(3)]

    def adapter(seed):
        return loop.dreambooth(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                   unet=pipe.unet, noise_scheduler=service.models.noise_scheduler(), instances=examples,
                                   priors=[], learning_rate=1e-3, max_train_steps=3, train_batch_size=2,
                                   size=service.size, seed=seed, lora=loop.LoraSettings()).lora_unet

    global_state = torch.random.get_rng_state()
    first = adapter(0)
    assert torch.equal(torch.random.get_rng_state(), global_state)
    again, other = adapter(0), adapter(1)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


HALF_PRECISION_TRAINING = r"""
import json

import torch
from diffusers import DDPMScheduler

from conftest import instance_images
from big.training import loop
from big.weights import embeddings, pipelines

pipe = pipelines.load_base_pipeline("embedded", torch.device("cpu"), torch.bfloat16)
tok = pipe.tokenizer
token_id = tok("sks", add_special_tokens=False).input_ids[0]
examples = [loop.TrainExample(im, "a sks shape") for im in instance_images(2)]
priors = [loop.TrainExample(im, "a shape") for im in instance_images(2, shape="star", mark="none")]
methods = {
    "dreambooth": {},
    "lora": {"lora": loop.LoraSettings(4, 4, False, "attention")},
    "textual_inversion": {"train_unet": False, "embedding": embeddings.ConceptEmbedding(
        "sks", token_id, embeddings.init_vectors(pipe.text_encoder, tok, "shape", 1, "sks"))},
}
losses = {}
for name, kw in methods.items():
    r = loop.dreambooth(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=tok, unet=pipe.unet,
                            noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config), instances=examples,
                            priors=priors, learning_rate=1e-4, max_train_steps=2, train_batch_size=2, size=32,
                            mixed_precision="bf16", **kw)
    losses[name] = r.final_loss
print("LOSSES", json.dumps(losses))
"""


def test_training_runs_on_half_precision_served_modules_as_on_a_gpu():
    """On a GPU the service serves fp16 modules and trains in mixed precision; this CPU stand-in serves bf16
    and trains with bf16 autocast (textual inversion crashed there on dtypes before its forward was autocast).
    A child process, because accelerate keeps one precision per process."""
    import json
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # conftest's folder, then the repo's
    path = [tests, os.path.dirname(tests), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    r = subprocess.run([sys.executable, "-c", HALF_PRECISION_TRAINING], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("LOSSES "))[len("LOSSES "):])
    assert set(losses) == {"dreambooth", "lora", "textual_inversion"}
    assert all(np.isfinite(v) for v in losses.values()), losses
