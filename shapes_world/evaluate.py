"""Measure a pipeline on the shapes world with the shipped scorer.

    python -m shapes_world.evaluate [--model models/shapes-sd] [--out reports/eval] [--n 64]

Reports (JSON, plus a captioned contact sheet PNG):
  base.seen / base.held_out   colour, shape and both-right accuracy for "a {colour} {shape}" prompts,
                              on pretraining pairs and on the six held-out pairs (n per figure >= --n)
  base.full_caption           every attribute of full captions ("a striped painting of ...")
  diversity                   for "a shape": normalised entropy of shapes and colours read by the scorer
  concepts (API)              fidelity: share of "a {id} {category}" images showing every attribute of
                              the concept; prior_leak: share of "a {category}" images showing it
Seeds are fixed and printed; every number comes with its n.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections import Counter
from typing import Sequence

import numpy as np
import torch

from . import world
from .model import DEFAULT_MODEL_DIR, DEFAULT_SCORER_DIR
from .scorer import Scorer, accuracy_on_rendered
from big.generation.sheets import contact_sheet

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0


def load_pipeline(path: str = DEFAULT_MODEL_DIR):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch.float32, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], *, seed: int, steps: int = DEFAULT_STEPS,
             guidance: float = DEFAULT_GUIDANCE, batch: int = 64, negative_prompt: str | None = None):
    """One image per prompt; image i uses seed + i, so results do not depend on batching."""
    images = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start : start + batch])
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                       negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                       height=world.IMAGE_SIZE, width=world.IMAGE_SIZE).images
    return images


def _pairs_prompts(pairs, n, rng):
    reps = math.ceil(n / len(pairs))
    chosen = [p for p in pairs for _ in range(reps)]
    rng.shuffle(chosen)
    return chosen


def base_accuracy(pipe, scorer: Scorer, *, n: int = 64, seed: int = 1000, steps: int = DEFAULT_STEPS,
                  guidance: float = DEFAULT_GUIDANCE, keep_images: list | None = None,
                  parts: tuple = ("seen", "held_out", "full_caption")) -> dict:
    """`parts` picks the figures to make (each one's prompts and seeds are the same whichever others are made)."""
    rng = random.Random(seed)
    out = {}
    for name, pairs in (("seen", world.seen_pairs()), ("held_out", sorted(world.HELD_OUT_PAIRS))):
        chosen = _pairs_prompts(pairs, n, rng)  # drawn even when skipped, so later figures stay the same
        if name not in parts:
            continue
        prompts = [f"a {c} {s}" for c, s in chosen]
        imgs = generate(pipe, prompts, seed=seed, steps=steps, guidance=guidance)
        reads = scorer.read(imgs)
        col = [r["colour"] == c for r, (c, s) in zip(reads, chosen)]
        shp = [r["shape"] == s for r, (c, s) in zip(reads, chosen)]
        out[name] = {"colour": float(np.mean(col)), "shape": float(np.mean(shp)),
                     "both": float(np.mean([a and b for a, b in zip(col, shp)])), "n": len(prompts)}
        if keep_images is not None:
            keep_images += [(im, f"{p} -> {r['colour']} {r['shape']}") for im, p, r in
                            list(zip(imgs, prompts, reads))[:16]]
    if "full_caption" not in parts:
        return out
    # Full captions: background and style follow the words too.
    scenes = [world.random_scene(rng) for _ in range(n)]
    prompts = [world.full_caption(s) for s in scenes]
    reads = scorer.read(generate(pipe, prompts, seed=seed + 7, steps=steps, guidance=guidance))
    out["full_caption"] = {k: float(np.mean([r[k] == getattr(s, k) for r, s in zip(reads, scenes)]))
                           for k in ("shape", "colour", "background", "style")}
    out["full_caption"]["all"] = float(np.mean([all(r[k] == getattr(s, k) for k in ("shape", "colour", "background", "style"))
                                                for r, s in zip(reads, scenes)]))
    out["full_caption"]["n"] = n
    return out


def _entropy(counter: Counter, k: int) -> float:
    total = sum(counter.values())
    h = -sum(v / total * math.log(v / total) for v in counter.values() if v)
    return h / math.log(k)


def diversity(pipe, scorer: Scorer, prompt: str = "a shape", *, n: int = 64, seed: int = 3000,
              steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> dict:
    reads = scorer.read(generate(pipe, [prompt] * n, seed=seed, steps=steps, guidance=guidance))
    return {"prompt": prompt, "shape_entropy": _entropy(Counter(r["shape"] for r in reads), len(world.SHAPES)),
            "colour_entropy": _entropy(Counter(r["colour"] for r in reads), len(world.COLOURS)), "n": n}


def shows(read: dict, attrs: dict) -> bool:
    return all(read[k] == v for k, v in attrs.items())


def class_prompt_images(pipe, category: str, *, n: int = 32, seed: int = 5000, steps: int = DEFAULT_STEPS,
                        guidance: float = DEFAULT_GUIDANCE):
    """The "a {category}" images `concept_scores` reads for leakage (seeds from seed + 100000)."""
    return generate(pipe, [f"a {category}"] * n, seed=seed + 100_000, steps=steps, guidance=guidance)


def concept_scores(pipe, scorer: Scorer, *, identifier: str, category: str, attrs: dict, n: int = 32,
                   seed: int = 5000, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                   keep_images: list | None = None, class_images: list | None = None) -> dict:
    """Fidelity of "a {id} {category}" and leakage of the concept into "a {category}". `class_images`: the
    class prompt's images if already made (`class_prompt_images`, shared by the concepts of one category)."""
    inst = generate(pipe, [f"a {identifier} {category}"] * n, seed=seed, steps=steps, guidance=guidance)
    cls = class_images if class_images is not None else class_prompt_images(pipe, category, n=n, seed=seed,
                                                                            steps=steps, guidance=guidance)
    ri, rc = scorer.read(inst), scorer.read(cls)
    if keep_images is not None:
        keep_images += [(im, f"a {identifier} {category}") for im in inst[:8]]
        keep_images += [(im, f"a {category}") for im in cls[:8]]
    return {"prompt": f"a {identifier} {category}", "attributes": attrs,
            "fidelity": float(np.mean([shows(r, attrs) for r in ri])),
            "per_attribute": {k: float(np.mean([r[k] == v for r in ri])) for k, v in attrs.items()},
            "prior_leak": float(np.mean([shows(r, attrs) for r in rc])), "n": n}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL_DIR)
    ap.add_argument("--scorer", default=DEFAULT_SCORER_DIR)
    ap.add_argument("--out", default="reports/eval")
    ap.add_argument("--n", type=int, default=64, help="images per figure")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    scorer = Scorer(a.scorer)
    t0 = time.time()
    pipe = load_pipeline(a.model)
    t_load = time.time() - t0
    t0 = time.time()
    generate(pipe, ["a red star", "a blue circle", "a shape", "a painting"], seed=0, steps=20, guidance=a.guidance)
    t_four = time.time() - t0
    sheet: list = []
    report = {
        "model": a.model, "seed": a.seed, "steps": a.steps, "guidance": a.guidance, "threads": a.threads,
        "timing_s": {"load_pipeline": round(t_load, 2), "generate_4_images_20_steps": round(t_four, 2)},
        "scorer_on_rendered": {**accuracy_on_rendered(scorer, n=2000, seed=12345), "n": 2000, "seed": 12345},
        "base": base_accuracy(pipe, scorer, n=a.n, seed=a.seed, steps=a.steps, guidance=a.guidance,
                              keep_images=sheet),
        "diversity": diversity(pipe, scorer, n=a.n, seed=a.seed + 2000, steps=a.steps, guidance=a.guidance),
    }
    print(json.dumps(report, indent=1))
    with open(os.path.join(a.out, "eval.json"), "w") as f:
        json.dump(report, f, indent=1)
    contact_sheet([im for im, _ in sheet], [c for _, c in sheet], columns=8,
                  title=f"{a.model} steps={a.steps} cfg={a.guidance} seed={a.seed}").save(
        os.path.join(a.out, "eval_sheet.png"))


if __name__ == "__main__":
    main()
