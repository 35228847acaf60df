"""Fitting a job to the accelerator's memory, with the real training loop on the embedded model: 8-bit AdamW
(bitsandbytes, which runs on a CPU too) trains and is recorded in the version, and a try that runs out of memory
is followed by the next (CPU torch never runs out this way, so the UNet raises torch's own `OutOfMemoryError`, what
CUDA raises, as tests/service/test_out_of_memory.py does)."""
import json
import os

import torch

from conftest import instance_images
from big.training import loop, memory
from big.training.memory import MemoryPlan

FAST = {"category": "shape", "max_train_steps": 4, "num_class_images": 2, "method": "dreambooth"}


def test_a_job_trains_with_8_bit_adamw_and_its_version_says_so(service):
    service.config.optimizer = "adamw8bit"
    r = service.finetune("alice", instance_images(3), FAST)
    path = service.registry.version_path(f"private:{r['concept_id']}", 1)
    with open(os.path.join(path, "big_version.json")) as f:
        meta = json.load(f)
    assert meta["optimizer"] == "adamw8bit" and meta["gradient_checkpointing"] is False
    assert service.generate("alice", [f"a {r['identifier']} shape"], {"target_model": "private", "seed": 1})


def test_8_bit_adamw_keeps_its_moments_in_bytes_and_learns(service):
    pipe = service.base_pipe
    kw = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
              noise_scheduler=service.models.noise_scheduler(), priors=[], learning_rate=1e-4, max_train_steps=12,
              instances=[loop.TrainExample(im, "a sks shape") for im in instance_images(3)], size=service.size)
    eight, plain = loop.dreambooth(**kw, eight_bit_adam=True), loop.dreambooth(**kw)
    moved = [(a - b).abs().max() for a, b in zip(eight.unet.parameters(), pipe.unet.parameters())]
    assert max(moved) > 0 and all(torch.isfinite(torch.tensor(eight.losses)))
    # The same draws and steps as the float32 optimizer: a loss curve close to its one.
    assert abs(eight.final_loss - plain.final_loss) < 0.25 * plain.final_loss, (eight.losses, plain.losses)


def test_a_try_that_runs_out_of_memory_starts_over_with_gradient_checkpointing(service):
    """The UNet's training copy raises CUDA's out-of-memory error unless it checkpoints; the job's second try does."""
    pipe = service.base_pipe
    tries = memory.plans(pipe.unet.num_parameters(), service.device, free_bytes=2**40)
    assert tries[:2] == [MemoryPlan(False, False), MemoryPlan(True, False)]
    seen = []

    def check(module, args):
        if module.training:
            seen.append(module.is_gradient_checkpointing)
            if not module.is_gradient_checkpointing:
                raise torch.OutOfMemoryError("CUDA out of memory (test: without gradient checkpointing)")

    handle = pipe.unet.register_forward_pre_hook(check)  # deep-copied with the UNet into each try's copy
    try:
        result, used = memory.run_within_memory(lambda plan: loop.dreambooth(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            noise_scheduler=service.models.noise_scheduler(), priors=[], learning_rate=1e-4, max_train_steps=3,
            instances=[loop.TrainExample(im, "a sks shape") for im in instance_images(3)], size=service.size,
            gradient_checkpointing=plan.gradient_checkpointing, eight_bit_adam=plan.eight_bit_adam), tries, what="job")
    finally:
        handle.remove()
    assert used == MemoryPlan(True, False) and result.steps == 3
    assert seen[0] is False and set(seen[1:]) == {True}
