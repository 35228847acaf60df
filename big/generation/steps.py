"""Between two denoising steps: the thread that generates may serve someone else there.

The serving thread's scheduler (big/scheduling.py) sets `between_steps` on its thread; every denoising loop calls
`step_done()` after each step. On other threads (training jobs drawing class images) it is unset and costs nothing.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

between_steps: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("between_steps",
                                                                                        default=None)


def step_done() -> None:
    hook = between_steps.get()
    if hook is not None:
        hook()


@contextlib.contextmanager
def uninterrupted():
    """No one else is served between steps inside: for a call holding something a nested call might need (the
    LoRA runtime's adapter set)."""
    token = between_steps.set(None)
    try:
        yield
    finally:
        between_steps.reset(token)
