"""The served dtype (`dtype` in config.yml, BIG_DTYPE): bfloat16 serving next to float32 training and storage."""

import pytest
import torch

from big.training import loop
from big.weights import pipelines


def test_auto_is_float16_on_a_gpu_and_float32_on_a_cpu_and_float16_needs_a_gpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pipelines.pick_dtype("auto", cpu) == torch.float32 and pipelines.pick_dtype(None, cuda) == torch.float16
    assert pipelines.pick_dtype("bfloat16", cpu) == torch.bfloat16
    assert pipelines.pick_dtype("float16", cuda) == torch.float16
    with pytest.raises(ValueError, match="use 'bfloat16'"):
        pipelines.pick_dtype("float16", cpu)
    with pytest.raises(ValueError, match="use one of auto, float32, float16, bfloat16"):
        pipelines.pick_dtype("fp8", cpu)


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_on_a_cpu_that_only_emulates_it_is_served_with_a_warning(monkeypatch, caplog, native):
    monkeypatch.setattr(pipelines, "cpu_has_native_bfloat16", lambda: native)
    with caplog.at_level("WARNING", logger=pipelines.__name__):
        assert pipelines.pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
        pipelines.pick_dtype("bfloat16", torch.device("cuda"))  # a GPU's bfloat16 is not the CPU's business
    warned = [r.getMessage() for r in caplog.records if "without native bfloat16" in r.getMessage()]
    assert len(warned) == (0 if native else 1)
    assert native or "use 'float32' here" in warned[0]


def test_autocast_follows_the_served_dtype_on_a_gpu_and_a_cpu_trains_without_it():
    assert loop.mixed_precision_for(torch.bfloat16, "cuda") == "bf16"
    assert loop.mixed_precision_for(torch.float16, "cuda") == "fp16"
    assert loop.mixed_precision_for(torch.bfloat16, "cpu") == "no"


# Each of the 30 seen pairs once, always; twice with the slow tests. On a CPU without native bfloat16 (AVX2 only)
# 30 bfloat16 images take 1.5 minutes.


def test_storing_a_trunk_loses_the_updates_below_the_dtypes_resolution():
    """The measure of research/storage_rounding.py and trunk_chain_rounding.py: near 1.0 float16 resolves
    2**-10, bfloat16 2**-7."""
    from research.storage_rounding import rounding_loss

    start = {"w": torch.tensor([1.0, 1.0, 2.0])}
    trained = {"w": torch.tensor([1.0 + 1e-4, 1.5, 2.0])}  # a tiny update, an exact one, an unmoved weight
    half = rounding_loss(trained, start, torch.float16, start_is_stored=True)
    assert half["moved_weights"] == 2 and half["moved_lost"] == 0.5
    assert half["update_error"] == pytest.approx(1e-4 / (1e-8 + 0.25) ** 0.5, rel=1e-3)
    assert rounding_loss(trained, start, torch.float32) == {"update_error": 0.0, "moved_lost": 0.0,
                                                            "moved_weights": 2}
    coarse = {"w": torch.tensor([1.0 + 2**-9, 1.5, 2.0])}  # kept by float16, rounded away by bfloat16
    assert rounding_loss(coarse, start, torch.float16)["moved_lost"] == 0.0
    assert rounding_loss(coarse, start, torch.bfloat16)["moved_lost"] == 0.5
    # A start that is not itself stored (a float32 base under a rounded first version): its rounding counts.
    off_grid = {"w": torch.tensor([1.0 + 3e-4])}
    assert rounding_loss({"w": off_grid["w"] + 2**-10}, off_grid, torch.float16)["update_error"] == 0.0
    assert rounding_loss({"w": off_grid["w"] + 2**-10}, off_grid, torch.float16,
                         start_is_stored=True)["update_error"] > 0.1
