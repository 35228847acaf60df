"""The served dtype (`dtype` in config.yml, BIG_DTYPE): bfloat16 serving next to float32 training and storage."""
import glob
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import BASE_MODEL, SECRET, instance_images
from big.training import loop
from big.weights import pipelines
from shapes_world import evaluate


def test_a_service_with_an_unknown_dtype_stops_with_a_clear_error(tmp_path):
    from big.service import BIGService, ServiceConfig

    with pytest.raises(ValueError, match="dtype 'half'"):
        BIGService(ServiceConfig(workspace=str(tmp_path), dtype="half", auth={"mode": "disabled"}))


@pytest.fixture
def bf16_service(tmp_path, shared_class_images):
    from big.service import BIGService, ServiceConfig

    shutil.copytree(shared_class_images, tmp_path / "ws-bf16" / "class_images")
    short = {"max_train_steps": 8, "num_class_images": 4, "per_method": {"lora": {"max_train_steps": 8}},
             "per_strategy": {"adapters": {"max_train_steps": 8}}}
    svc = BIGService(ServiceConfig(workspace=str(tmp_path / "ws-bf16"), base_model=BASE_MODEL, dtype="bfloat16",
                                   auth={"mode": "hs256", "secret": SECRET}, finetune_defaults=short,
                                   generate_defaults={"num_inference_steps": 4}))
    yield svc
    svc.close()


# Each of the 30 seen pairs once, always; twice with the slow tests. On a CPU without native bfloat16 (AVX2 only)
# 30 bfloat16 images take 1.5 minutes.
@pytest.mark.parametrize("n", [30, pytest.param(60, marks=pytest.mark.slow)])
def test_bfloat16_serving_reads_like_float32_to_the_scorer(bf16_service, service, scorer, n):
    assert bf16_service.base_pipe.unet.dtype == torch.bfloat16 and service.base_pipe.unet.dtype == torch.float32
    fp32 = evaluate.base_accuracy(service.base_pipe, scorer, n=n, parts=("seen",))["seen"]["both"]
    bf16 = evaluate.base_accuracy(bf16_service.base_pipe, scorer, n=n, parts=("seen",))["seen"]["both"]
    print(f"base prompts right (colour and shape, n={n}, seed 1000): float32 {fp32:.2f}, bfloat16 {bf16:.2f}")
    assert bf16 >= 0.9 and abs(bf16 - fp32) <= 0.1


@pytest.mark.parametrize("method", ["lora", "textual_inversion", "dreambooth"])
def test_every_method_trains_and_serves_on_a_bfloat16_service(bf16_service, method):
    r = bf16_service.finetune("alice", instance_images(), {"category": "shape", "method": method})
    images = bf16_service.generate("alice", [f"a {r['identifier']} shape"],
                                   {"target_model": "private", "identifier": r["identifier"], "num_images": 2})
    assert len(images) == 2 and images[0].image.size == (bf16_service.size, bf16_service.size)
    assert "Dtype: bfloat16" in images[0].parameters_text()  # the text says why another service's pixels differ
    if method == "dreambooth":  # a private model is never trained again: written as it is served
        folder = bf16_service.registry.version_path(f"private:{r['concept_id']}", 1)
        for sub in ("unet", "text_encoder"):  # pivotal tuning trained the identifier's row
            (weights,) = glob.glob(os.path.join(folder, sub, "*.safetensors"))
            assert {t.dtype for t in load_file(weights).values()} == {torch.bfloat16}, sub


def test_a_bfloat16_metamodel_trains_each_trunk_from_its_stored_float32_weights(bf16_service, monkeypatch):
    """Not from the rounded served copy: bfloat16's 8-bit significand would drop part of every update, version
    after version."""
    starts = []  # read at the call: modules loaded for the job are trained in place
    real = loop.dreambooth

    def spy(**kw):
        assert kw["unet"].dtype == torch.float32 and kw["text_encoder"].dtype == torch.float32
        assert kw["modules_are_copies"] and kw["unet"] is not bf16_service.base_pipe.unet
        starts.append({k: v.detach().clone().cpu() for k, v in kw["unet"].state_dict().items()})
        return real(**kw)

    monkeypatch.setattr(loop, "dreambooth", spy)
    params = {"category": "shape", "target_model": "private_meta", "metamodel_strategy": "seed_split",
              "learning_rate": 1e-4}
    bf16_service.finetune("alice", instance_images(), params)
    bf16_service.finetune("alice", instance_images(seed=4, shape="star", colour="red", mark="ring"), params)

    base = load_file(os.path.join(pipelines.resolve_base(BASE_MODEL), "unet", "diffusion_pytorch_model.safetensors"))
    (v1_file,) = glob.glob(os.path.join(bf16_service.registry.version_path("private_meta:alice", 1), "unet",
                                        "*.safetensors"))
    v1 = load_file(v1_file)
    assert {t.dtype for t in v1.values()} == {torch.float32}
    assert len(starts) == 2
    for start, stored in zip(starts, (base, v1)):
        assert all(torch.equal(start[k], stored[k]) for k in stored)
    # The served copy of version 1 is those weights rounded to bfloat16; training did not start from it.
    served = bf16_service.models.pipeline_for("private_meta:alice", 1).unet.state_dict()
    assert all(torch.equal(served[k].cpu(), v1[k].bfloat16()) for k in v1)
    assert any(not torch.equal(served[k].cpu().float(), v1[k]) for k in v1)
    assert bf16_service.models.pipeline_for("private_meta:alice", 2).unet.dtype == torch.bfloat16




def test_lora_under_mixed_precision_trains_float32_adapters_over_the_served_precision(bf16_service):
    """A bfloat16 UNet under bfloat16 autocast (a GPU's case, with float16 there): the trained copy keeps the served
    precision and only the adapters are float32, as in diffusers' LoRA scripts; the served UNet is untouched."""
    from accelerate.state import AcceleratorState

    pipe = bf16_service.base_pipe
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    # accelerate keeps one mixed precision per process (a service has one served dtype); this test needs another.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        r = loop.dreambooth(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                            noise_scheduler=bf16_service.models.noise_scheduler(),
                            instances=[loop.TrainExample(im, "a sks shape") for im in instance_images(3)], priors=[],
                            learning_rate=1e-3, max_train_steps=3, size=bf16_service.size, mixed_precision="bf16",
                            lora=loop.LoraSettings())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    trained = {p.dtype for n, p in r.unet.named_parameters() if "lora_" in n}
    frozen = {p.dtype for n, p in r.unet.named_parameters() if "lora_" not in n}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(r.losses)))
    assert {v.dtype for v in r.lora_unet.values()} == {torch.float32} and any(v.abs().sum() > 0 for k, v in
                                                                              r.lora_unet.items() if "lora_B" in k)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
