"""Class images for prior preservation ("a dog"), generated once per (base model, category).

All users share the cache: a second finetune in a known category generates nothing. Images are
made with index-derived seeds, so the cache is reproducible, and blank outputs (black from a safety
filter, flat colour from a broken run) are rejected and redrawn with another seed.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from PIL import Image

from big.generation.sampling import DEFAULT_GENERATION_BATCH, halving_on_out_of_memory, seeded_generators
from big.storage.workspace import Workspace

log = logging.getLogger(__name__)
MAX_REDRAWS = 3


def is_blank(img: Image.Image) -> bool:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return float(arr.std()) < 2.0 or float(arr.max()) < 8.0


def ensure_class_images(ws: Workspace, base_key: str, make_pipe: Callable[[], object], category: str, n: int, *,
                        size: int, steps: int, guidance_scale: float,
                        batch: int = DEFAULT_GENERATION_BATCH) -> tuple[list[Image.Image], int]:
    """The first `n` class images of `category`; returns (images, how many were generated now).

    `make_pipe` builds the base-model pipeline, and is only called when something is missing.
    """
    have = dict(enumerate(ws.load_class_images(base_key, category, size, n)))
    made = 0
    prompt = f"a {category}"
    pipe = None
    for start in range(len(have), n, batch):
        pipe = pipe or make_pipe()
        redraws = {i: 0 for i in range(start, min(n, start + batch))}
        while redraws:
            idx = sorted(redraws)
            seeds = [1_000_003 * redraws[i] + i for i in idx]
            with torch.no_grad():
                imgs = halving_on_out_of_memory(
                    lambda some: pipe([prompt] * len(some), num_inference_steps=steps, guidance_scale=guidance_scale,
                                      height=size, width=size, generator=seeded_generators(some)).images,
                    seeds, what=f"class images of {prompt!r}")
            for i, img in zip(idx, imgs):
                if is_blank(img):
                    if redraws[i] >= MAX_REDRAWS:
                        raise RuntimeError(f"the base model keeps producing blank images for {prompt!r}")
                    redraws[i] += 1
                    continue
                ws.save_class_image(base_key, category, size, i, img)
                have[i] = img
                made += 1
                del redraws[i]
    if made:
        log.info("generated %d class images for %r (cache now %d)", made, prompt, len(have))
    return [have[i] for i in range(n)], made
