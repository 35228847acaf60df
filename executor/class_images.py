"""Class images for prior preservation ("a dog"), generated once per (base model, category).

All users share the cache: a second finetune in a known category generates nothing. Images are
made with index-derived seeds, so the cache is reproducible, and blank outputs (black from a safety
filter, flat colour from a broken run) are rejected and redrawn with another seed.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from . import pipelines
from .storage import Workspace

log = logging.getLogger(__name__)
MAX_REDRAWS = 3


def is_blank(img: Image.Image) -> bool:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return float(arr.std()) < 2.0 or float(arr.max()) < 8.0


def ensure_class_images(ws: Workspace, base_key: str, base_pipe, category: str, n: int, *, size: int,
                        steps: int, guidance_scale: float, batch: int = 16) -> tuple[list[Image.Image], int]:
    """The first `n` class images of `category`; returns (images, how many were generated now)."""
    have = ws.load_class_images(base_key, category, size, n)
    made = 0
    prompt = f"a {category}"
    pipe = None
    index = len(have)
    while index < n:
        pipe = pipe or pipelines.compose(base_pipe)
        todo = list(range(index, min(n, index + batch)))
        pending = {i: 0 for i in todo}
        while pending:
            idx = sorted(pending)
            seeds = [1_000_003 * pending[i] + i for i in idx]
            with torch.no_grad():
                imgs = pipe([prompt] * len(idx), num_inference_steps=steps, guidance_scale=guidance_scale,
                            height=size, width=size,
                            generator=[torch.Generator(device=pipe.device).manual_seed(s) for s in seeds]).images
            for i, img in zip(idx, imgs):
                if is_blank(img) and pending[i] < MAX_REDRAWS:
                    pending[i] += 1
                    continue
                if is_blank(img):
                    raise RuntimeError(f"the base model keeps producing blank images for {prompt!r}")
                ws.save_class_image(base_key, category, size, i, img)
                have.append(img)
                made += 1
                del pending[i]
        index = len(have)
    if made:
        log.info("generated %d class images for %r (cache now %d)", made, prompt, len(have))
    return have[:n], made
