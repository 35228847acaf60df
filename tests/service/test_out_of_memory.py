"""A batch too large for the accelerator's memory is served in halves, with the same images; one image that does
not fit is a clear error. CPU torch never runs out of memory this way, so the UNet here raises torch's own
`OutOfMemoryError` (what CUDA raises) for batches above a chosen size."""
import contextlib
import logging

import pytest
import torch

from conftest import BASE_MODEL, assert_same_but_rounding
from big.generation import sampling
from big.errors import OutOfMemory


@contextlib.contextmanager
def unet_memory_for(unet, max_rows: int):
    """The UNet raises CUDA's out-of-memory error on a batch of more than `max_rows` rows (two per image with
    guidance); records every batch size it was called with."""
    rows = []

    def check(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        rows.append(sample.shape[0])
        if sample.shape[0] > max_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test: {sample.shape[0]} rows)")

    handle = unet.register_forward_pre_hook(check, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def test_generate_serves_a_batch_the_gpu_cannot_hold_in_smaller_batches_with_the_same_images(service, caplog):
    params = {"target_model": "pretrained", "seed": 5, "num_images": 5, "guidance_scale": 4.0}
    prompts = ["a red star", "a blue circle AND a striped painting :0.5"]
    expected = service.generate("dave", prompts, params)
    with caplog.at_level(logging.WARNING, logger="big.generation.sampling"), \
            unet_memory_for(service.base_pipe.unet, max_rows=4) as rows:
        got = service.generate("dave", prompts, params)
    assert_same_but_rounding(got, expected, service.device)
    assert [g.seed for g in got] == [g.seed for g in expected] and [g.prompt for g in got] == prompts[:1] * 5 + \
        prompts[1:] * 5
    assert got[0].parameters_text() == expected[0].parameters_text()  # the PNG text says the same
    assert max(rows) == 10 and max(r for r in rows if r <= 4) == 4  # tried 5 images, served at most 2 a call
    assert "out of accelerator memory with 5 images" in caplog.text
    assert "of a composable prompt" in caplog.text  # the AND prompt's own denoising loop was split too

    with unet_memory_for(service.base_pipe.unet, max_rows=0):
        with pytest.raises(OutOfMemory, match="32x32 images: one image does not fit"):
            service.generate("dave", prompts[:1], {**params, "num_images": 2})
    # Nothing is left broken: the next request is served as before.
    assert_same_but_rounding(service.generate("dave", prompts, params), expected, service.device)


def test_generation_batch_is_the_images_per_pipeline_call(tmp_path):
    from big.service import BIGService, ServiceConfig

    with pytest.raises(ValueError, match="generation_batch must be at least 1, not 0"):
        BIGService(ServiceConfig(workspace=str(tmp_path / "bad"), base_model=BASE_MODEL, generation_batch=0,
                                 auth={"mode": "disabled"}))
    svc = BIGService(ServiceConfig(workspace=str(tmp_path / "ws"), base_model=BASE_MODEL, generation_batch=3,
                                   auth={"mode": "disabled"}, generate_defaults={"num_inference_steps": 4}))
    try:
        params = {"target_model": "pretrained", "seed": 1, "num_images": 7}
        with unet_memory_for(svc.base_pipe.unet, max_rows=10**6) as rows:
            images = svc.generate("erin", ["a green heart"], params)
        assert sorted(set(rows)) == [2, 6]  # 3 + 3 + 1 images, each twice with guidance
        reference = sampling.render(svc.base_pipe, [sampling.ImageSpec("a green heart", 1 + k, 4.0, 4)
                                                      for k in range(7)],
                                      negative_prompt=None, height=svc.size, width=svc.size, model_label="pretrained",
                                      model_version=0, max_batch=7)
        assert_same_but_rounding(images, reference, svc.device)
    finally:
        svc.close()


def test_one_image_that_does_not_fit_is_decoded_in_tiles(service, caplog):
    """The VAE's decoder raises CUDA's out-of-memory error unless it decodes in tiles: the image is served, and the
    VAE decodes whole images again afterwards."""
    vae = service.base_pipe.vae
    params = {"target_model": "pretrained", "seed": 5}
    expected = service.generate("erin", ["a red star"], params)
    calls = []

    def check(module, args):
        calls.append(vae.use_tiling)
        if not vae.use_tiling:
            raise torch.OutOfMemoryError("CUDA out of memory (test: the VAE decodes whole images)")

    handle = vae.decoder.register_forward_pre_hook(check)
    try:
        with caplog.at_level(logging.WARNING, logger="big.generation.sampling"):
            got = service.generate("erin", ["a red star"], params)
    finally:
        handle.remove()
    assert calls == [False, True] and not vae.use_tiling
    assert "one image does not fit in the accelerator's memory; decoding it in tiles" in caplog.text
    # At 32 px the latents are smaller than one tile, so the tiled decoder decodes them whole: the same image.
    assert_same_but_rounding(got, expected, service.device)
