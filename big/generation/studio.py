"""Sweeps and grids: which images to make (pure planning), and the sheet or animation that shows them
(their parameters are parsed in `big.parsing`).

A sweep is one prompt and one seed with one parameter moved over a range (guidance 0..30 by default), shown
as an animated GIF with the value on each frame. A grid is prompts x guidance scales x steps x seeds, or
random samples around a setting, shown as a captioned contact sheet. Every image is an ordinary generated
image with its own PNG parameters, so any frame or cell can be made again with /generate.
"""
from __future__ import annotations

import io
import random
from typing import Sequence

from big.generation.sampling import GeneratedImage, ImageSpec
from big.generation.sheets import animated_gif, contact_sheet

def sweep_specs(prompt: str, seed: int, parameter: str, values: list, *, guidance_scale: float,
                num_inference_steps: int) -> list[ImageSpec]:
    base = {"guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps}
    return [ImageSpec(prompt, seed, **{**base, parameter: v}) for v in values]


def grid_specs(prompts: Sequence[str], guidance_scales: Sequence[float], steps: Sequence[int],
               seeds: Sequence[int]) -> list[ImageSpec]:
    """Every combination, prompt-major: rows of the sheet are prompts, columns the rest."""
    return [ImageSpec(p, s, g, n) for p in prompts for g in guidance_scales for n in steps for s in seeds]


def random_specs(prompts: Sequence[str], n: int, *, seed: int, guidance_scale: float, num_inference_steps: int,
                 guidance_spread: float = 0.5, steps_spread: float = 0.5, max_steps: int,
                 max_guidance: float) -> list[ImageSpec]:
    """`n` samples per prompt around a setting: guidance and steps within +-spread of it, random seeds.

    The draw itself is seeded by `seed`, so the same request gives the same grid.
    """
    rng = random.Random(seed)
    out = []
    for p in prompts:
        for _ in range(n):
            g = guidance_scale * (1 + rng.uniform(-guidance_spread, guidance_spread))
            k = num_inference_steps * (1 + rng.uniform(-steps_spread, steps_spread))
            out.append(ImageSpec(p, rng.randrange(2**31 - 1), round(min(max(g, 0.0), max_guidance), 2),
                                 int(min(max(round(k), 1), max_steps))))
    return out


def frame_label(parameter: str, value) -> str:
    return {"guidance_scale": "guidance", "num_inference_steps": "steps"}[parameter] + f" {value}"


def cell_caption(img: GeneratedImage) -> str:
    p = img.parameters
    return f"{img.prompt}\ncfg {p['guidance_scale']} steps {p['num_inference_steps']}\nseed {img.seed}"


def gif_bytes(images: list[GeneratedImage], labels: list[str], duration_ms: int = 250) -> bytes:
    buf = io.BytesIO()
    animated_gif([g.image for g in images], labels, buf, duration_ms=duration_ms)
    return buf.getvalue()


def sheet_png(images: list[GeneratedImage], columns: int, title: str | None = None) -> bytes:
    sheet = contact_sheet([g.image for g in images], [cell_caption(g) for g in images],
                          columns=max(1, min(columns, len(images))), title=title)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
