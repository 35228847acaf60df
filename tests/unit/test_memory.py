"""How a training job fits the accelerator (big/training/memory.py): the tries `auto` makes from the free memory,
what the config fixes, and stepping up when a try runs out of memory."""
import pytest
import torch

from big.errors import OutOfMemory
from big.training import memory
from big.training.memory import MemoryPlan

GIB = 2**30
SD15_UNET = 859_520_964  # parameters: DreamBooth trains them all


def test_a_cpu_trains_with_plain_adamw_and_no_checkpointing_unless_configured():
    assert memory.plans(SD15_UNET, torch.device("cpu")) == [MemoryPlan(False, False)]
    assert memory.plans(SD15_UNET, torch.device("cpu"), optimizer="adamw8bit", gradient_checkpointing=True) == \
        [MemoryPlan(True, True)]


@pytest.mark.parametrize("free_gib, first", [
    (139, MemoryPlan(False, False)),  # an H200: 13.8 GB of weights, gradients and moments is a tenth of it
    (40, MemoryPlan(True, False)),    # an A100-40GB: over a quarter
    (22, MemoryPlan(True, True)),     # a 24 GB card: over half
])
def test_auto_starts_from_the_trained_parameters_share_of_free_memory_and_steps_up(free_gib, first):
    tries = memory.plans(SD15_UNET, torch.device("cuda"), free_bytes=free_gib * GIB)
    assert tries[0] == first
    assert tries[-1] == MemoryPlan(True, True)  # the last try saves all it can
    assert len(set(tries)) == len(tries)


def test_what_the_config_fixes_stays_fixed():
    assert memory.plans(SD15_UNET, torch.device("cuda"), optimizer="adamw", free_bytes=8 * GIB) == \
        [MemoryPlan(True, False)]
    assert memory.plans(0, torch.device("cuda"), gradient_checkpointing=False, free_bytes=80 * GIB) == \
        [MemoryPlan(False, False), MemoryPlan(False, True)]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="optimizer must be one of auto, adamw, adamw8bit"):
        memory.check_settings("sgd", "auto")
    with pytest.raises(ValueError, match="gradient_checkpointing must be auto, true or false"):
        memory.check_settings("auto", "sometimes")


def test_a_try_that_runs_out_of_memory_is_followed_by_the_next_and_the_last_is_a_clear_error():
    tries = [MemoryPlan(False, False), MemoryPlan(True, False), MemoryPlan(True, True)]

    def train(plan):
        if not plan.eight_bit_adam:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "trained"

    assert memory.run_within_memory(train, tries, what="job") == ("trained", tries[2])

    def never(plan):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(OutOfMemory, match="even with adamw8bit, gradient checkpointing on .*lower train_batch_size"):
        memory.run_within_memory(never, tries, what="job")
