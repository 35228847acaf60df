"""Samplers by name, the PNG parameters text, and reproducing an image from that text alone."""
import pytest
import torch

from big.generation import infotext, schedulers
from big.errors import BadRequest


@pytest.mark.parametrize("name,key", [
    ("ddim", "ddim"), ("DDIM", "ddim"), ("DPM++ 2M", "dpmpp_2m"), ("dpmpp_2m_karras", "dpmpp_2m_karras"),
    ("Euler a", "euler_a"), ("EulerAncestralDiscreteScheduler", "euler_a"), ("euler", "euler"),
    ("PLMS", "pndm"), ("PNDMScheduler", "pndm"), ("heun", "heun"),
])
def test_sampler_names_people_use_resolve(name, key):
    assert schedulers.resolve(name).key == key


def test_an_unknown_sampler_is_a_clear_error():
    with pytest.raises(BadRequest, match="unknown scheduler"):
        schedulers.resolve("warp-drive")


def test_infotext_round_trips_with_awkward_prompts():
    fields = {"Steps": 20, "Sampler": "DPM++ 2M", "CFG scale": 4.0, "Seed": 7, "Size": "32x32",
              "Model": "private:sks", "Model version": 1}
    text = infotext.format_infotext("a (sks:1.2) shape,\nsecond line", "blurry, \"odd\": yes", fields)
    prompt, neg, parsed = infotext.parse_infotext(text)
    assert prompt == "a (sks:1.2) shape,\nsecond line" and neg == "blurry, \"odd\": yes"
    assert parsed == {k: str(v) for k, v in fields.items()}
    p, params = infotext.request_from_infotext(text)
    assert params == {"num_inference_steps": 20, "seed": 7, "num_images": 1, "guidance_scale": 4.0, "width": 32,
                      "height": 32, "negative_prompt": "blurry, \"odd\": yes", "scheduler": "DPM++ 2M",
                      "target_model": "private", "identifiers": ["sks"], "model_version": 1, "emphasis": "original"}
    # The dtype is recorded, not requested: a service serves one.
    assert infotext.request_from_infotext(text + ", Dtype: bfloat16")[1] == params
    # An AUTOMATIC1111 text names its emphasis only when it is not its default ("original"); ours always do.
    assert infotext.request_from_infotext(text + ", Emphasis: context")[1]["emphasis"] == "context"


@pytest.mark.parametrize("text", ["", "just a prompt", "a prompt\nSteps: many, Seed: 1"])
def test_malformed_parameters_text_is_a_bad_request(text):
    with pytest.raises(BadRequest):
        infotext.request_from_infotext(text)


def test_each_image_draws_its_noise_from_its_own_seed_on_the_cpu():
    """Seeds are portable: a GPU server draws the same starting noise as a CPU server (on a CUDA generator the
    same seed gives other numbers), and an image's noise does not depend on its batch-mates."""
    from diffusers.utils.torch_utils import randn_tensor

    from big.generation.sampling import seeded_generators

    gens = seeded_generators([7, 8])
    assert [g.device.type for g in gens] == ["cpu", "cpu"]
    batch = randn_tensor((2, 4, 8, 8), generator=gens, device=torch.device("cpu"))
    alone = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(8))
    assert torch.equal(batch[1], alone[0])
