"""benchmarks/unet_speed_options.py compares the UNet's speed under other memory formats and dtypes; its
ratios mean something only if every option computes the reference's result, within the option's precision."""
import torch

from benchmarks.unet_speed_options import generation_call, load_unet, training_step


def test_each_option_computes_the_reference_result():
    ref = generation_call(load_unet(lora=False))()
    nhwc = generation_call(load_unet(lora=False, channels_last=True), channels_last=True)()
    bf16 = generation_call(load_unet(lora=False, dtype=torch.bfloat16), dtype=torch.bfloat16)()
    assert ref.shape == (64, 4, 16, 16) and ref.abs().mean() > 0.1
    assert torch.allclose(nhwc, ref, atol=1e-4)
    assert (bf16 - ref).abs().mean() < 0.02 * ref.abs().mean()  # bfloat16 rounding, not another function

    losses = {name: [step() for _ in range(3)] for name, step in {
        "fp32": training_step(load_unet(lora=True)),
        "channels_last": training_step(load_unet(lora=True, channels_last=True), channels_last=True),
        "bf16 autocast": training_step(load_unet(lora=True), autocast=True),
        "bf16 trunk": training_step(load_unet(lora=True, dtype=torch.bfloat16), dtype=torch.bfloat16),
    }.items()}
    assert losses["fp32"][0] > 0.1
    for name in ("channels_last", "bf16 autocast", "bf16 trunk"):
        tol = 1e-4 if name == "channels_last" else 2e-2
        assert all(abs(a - b) <= tol * b for a, b in zip(losses[name], losses["fp32"])), (name, losses)
    trainable = [n for n, p in load_unet(lora=True).named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)  # the adapters step trains the adapter alone
