"""How a training job fits the accelerator's memory: gradient checkpointing and 8-bit Adam.

`auto` (config.yml's `optimizer` and `gradient_checkpointing`) picks them from the device's free memory before the
job, and steps up when a try runs out of memory anyway (`plans`): the first try is the fastest that the trained
parameters' own bytes allow, each later one trades speed for memory. What each costs and saves on a GPU is
measured by `benchmarks/gpu.py` (docs/gpu.md).

The trained parameters' bytes are exact: float32 weights, gradients and AdamW's two moments, 16 bytes each (10
with 8-bit Adam's moments). Activations depend on the image size, the batch and the UNet, and are not estimated:
a try that does not fit fails at its first step, and the next one starts over.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from big.errors import OutOfMemory

log = logging.getLogger(__name__)

OPTIMIZERS = ("auto", "adamw", "adamw8bit")
CHECKPOINTING = ("auto", True, False)
BYTES_PER_TRAINED_PARAMETER = 16  # float32 weight, gradient and two AdamW moments


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    gradient_checkpointing: bool
    eight_bit_adam: bool

    @property
    def optimizer(self) -> str:
        return "adamw8bit" if self.eight_bit_adam else "adamw"

    def __str__(self) -> str:
        return f"{self.optimizer}, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}"


@functools.lru_cache(maxsize=None)
def _bitsandbytes():
    """bitsandbytes, imported once, or None where it does not import. Its CPU backend warns on import about a 4-bit
    kernel BIG does not use: that one logger is quiet meanwhile."""
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        import bitsandbytes

        return bitsandbytes
    except Exception:  # noqa: BLE001 - any import failure (no package, no native library) means none here
        return None
    finally:
        noisy.setLevel(level)


def eight_bit_adam_available() -> bool:
    """Whether bitsandbytes' AdamW8bit imports here."""
    return _bitsandbytes() is not None


def check_settings(optimizer: str, gradient_checkpointing) -> None:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {optimizer!r}")
    if gradient_checkpointing not in CHECKPOINTING:
        raise ValueError(f"gradient_checkpointing must be auto, true or false, not {gradient_checkpointing!r}")
    if optimizer == "adamw8bit" and not eight_bit_adam_available():
        raise ValueError("optimizer 'adamw8bit' needs bitsandbytes, which does not import here")


def free_memory(device: torch.device) -> int | None:
    """Free bytes of a CUDA device; None elsewhere (a CPU's host memory is not planned for)."""
    if torch.device(device).type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def plans(trained_parameters: int, device: torch.device, *, optimizer: str = "auto",
          gradient_checkpointing="auto", free_bytes: int | None = None) -> list[MemoryPlan]:
    """The tries of one job, in order. What the config fixes stays fixed; `auto` settings start from what the free
    memory suggests and step up (checkpointing, then 8-bit Adam where bitsandbytes imports).

    On a CPU, `auto` is plain AdamW without checkpointing: host memory is not the limit there, and both only slow a
    CPU's step. On a GPU the trained parameters' bytes decide the first try: over half the free memory, 8-bit Adam
    and checkpointing; over a quarter, checkpointing; else neither."""
    free = free_memory(device) if free_bytes is None else free_bytes
    if free is None:  # a CPU
        return [MemoryPlan(gradient_checkpointing is True, optimizer == "adamw8bit")]
    need = trained_parameters * BYTES_PER_TRAINED_PARAMETER
    eight_bit_ok = optimizer == "adamw8bit" or (optimizer == "auto" and eight_bit_adam_available())
    start = MemoryPlan(gradient_checkpointing is True or (gradient_checkpointing == "auto" and need > free / 4),
                       optimizer == "adamw8bit" or (eight_bit_ok and need > free / 2))
    out = [start]
    if gradient_checkpointing == "auto" and not start.gradient_checkpointing:
        out.append(dataclasses.replace(out[-1], gradient_checkpointing=True))
    if optimizer == "auto" and eight_bit_ok and not out[-1].eight_bit_adam:
        out.append(dataclasses.replace(out[-1], eight_bit_adam=True))
    return out


def adamw(groups, *, lr: float, weight_decay: float, eight_bit: bool, fused: bool):
    """AdamW over parameter groups: bitsandbytes' 8-bit moments (a quarter of the bytes), or torch's, fused where
    the device has the kernel (one launch for all tensors instead of a loop over hundreds)."""
    if eight_bit:
        return _bitsandbytes().optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused)


def run_within_memory(train, tries: list[MemoryPlan], *, what: str):
    """(train(plan), plan) of the first try that fits; OutOfMemory when none does."""
    for i, plan in enumerate(tries):
        try:
            return train(plan), plan
        except torch.OutOfMemoryError as e:
            reason = (str(e).splitlines() or ["out of memory"])[0]
        # After the except block: inside it the traceback still holds the failed try's tensors.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if i + 1 < len(tries):
            log.warning("%s: out of accelerator memory with %s (%s); starting over with %s", what, plan, reason,
                        tries[i + 1])
    raise OutOfMemory(f"training does not fit in the accelerator's memory even with {tries[-1]} ({reason}); "
                      "lower train_batch_size, or train LoRA instead of DreamBooth")
