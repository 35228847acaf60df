"""research/unet_speed_options.py compares the UNet's speed under other memory formats and dtypes; its
ratios mean something only if every option computes the reference's result, within the option's precision."""
import torch

from research.unet_speed_options import adapter_step_options, generation_options, load_unet


def test_each_option_computes_the_reference_result():
    calls = generation_options()
    ref, nhwc, bf16 = (calls[name]() for name in ("fp32 (reference)", "channels_last", "bf16"))
    assert ref.shape == (64, 4, 16, 16) and ref.abs().mean() > 0.1
    assert torch.allclose(nhwc, ref, atol=1e-4)
    assert (bf16 - ref).abs().mean() < 0.02 * ref.abs().mean()  # bfloat16 rounding, not another function

    losses = {name: [step() for _ in range(3)] for name, step in adapter_step_options().items()}
    assert set(losses) == {"fp32 (reference)", "channels_last", "bf16 autocast", "bf16 trunk"}
    reference = losses.pop("fp32 (reference)")
    assert reference[0] > 0.1
    for name, run in losses.items():
        tol = 1e-4 if name == "channels_last" else 2e-2
        assert all(abs(a - b) <= tol * b for a, b in zip(run, reference)), (name, losses)
    trainable = [n for n, p in load_unet(lora=True).named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)  # the adapters step trains the adapter alone
