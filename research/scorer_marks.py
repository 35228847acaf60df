"""Does the scorer read the marks that generated images draw? A cross-check with a geometric dot rule.

    python -m research.scorer_marks            # ~2.5 minutes on 2 CPU cores; --out for the contact sheet

The scorer is trained on rendered scenes, whose centre dot is pure black. A concept's adapter draws softer
dots, more so before it is fully trained. This script compares the scorer's "dot" reads with a simple rule
(a dark blob at the shape's centroid). It first checks the rule itself: on rendered hearts with and without
a dot, and on the base model's generated hearts, which have no dot. Then it teaches the heart-dot concept as
a metamodel adapter stopped early (`--steps`, default 250: the continual smoke preset's) and reads its images
both ways. A contact sheet labels each image with both reads, so an eye can judge who is right.

It also probes the dot's ink: rendered orange hearts (plain and hollow, on white or gray, where a black dot
shows) with the dot redrawn in navy or purple. `--second-scorer DIR` reads the probe and the adapter's images
with another scorer too, e.g. one trained with marks in other inks
(`python -m shapes_world.scorer train --reink-marks --steps 2000 --out DIR`, ~30 minutes on 2 cores).
"""
import argparse
import json
import os
import random
import tempfile

import numpy as np
import torch

from benchmarks import harness
from benchmarks.continual import Served
from benchmarks.harness import concept_images
from shapes_world import evaluate, world
from shapes_world.scorer import Scorer, mark_in_ink
from big.generation.sheets import contact_sheet

HEART_DOT = {"shape": "heart", "colour": "orange", "mark": "dot"}
RENDER_SEED = 4242
INK_SEED = 4343
INKS = {"black": (0, 0, 0), "navy": (40, 30, 110), "dark purple": (80, 25, 120), "purple": (140, 40, 190)}
TRAIN_SEED = 0


def has_centre_dot(img) -> bool:
    """A dark blob (>= 3 pixels under 0.45 x the fill's median luminance) within 3.5 px of the shape's centroid;
    the background is the border's median colour, the shape every pixel far from it."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    shape = np.abs(a - np.median(border, axis=0)).sum(-1) > 120
    if shape.sum() < 20:
        return False
    ys, xs = np.nonzero(shape)
    lum = a.mean(-1)
    yy, xx = np.mgrid[: a.shape[0], : a.shape[1]]
    near = (yy - ys.mean()) ** 2 + (xx - xs.mean()) ** 2 <= 3.5**2
    return int((near & (lum < 0.45 * np.median(lum[shape]))).sum()) >= 3


def both_reads(images, scorer) -> tuple[list[bool], list[dict]]:
    """For each image: whether the rule sees a dot, and the scorer's read."""
    return [has_centre_dot(im) for im in images], scorer.read(images)


def shares(rule_dots: list[bool], reads: list[dict]) -> tuple[float, float]:
    """(share the rule sees a dot in, share the scorer reads as "dot")."""
    return float(np.mean(rule_dots)), float(np.mean([r["mark"] == "dot" for r in reads]))


def ink_probe(scorer, second=None, n: int = 64) -> dict:
    """Share of rendered orange hearts read as having a dot, with the dot redrawn in each of INKS."""
    rng = random.Random(INK_SEED)
    out = {}
    for style in ("plain", "hollow"):
        scenes = [world.random_scene(rng, **HEART_DOT, style=style, background=rng.choice(("white", "gray")))
                  for _ in range(n)]
        for ink, rgb in INKS.items():
            images = [mark_in_ink(s, rgb) for s in scenes]
            rule_dots, reads = both_reads(images, scorer)
            rule, read = shares(rule_dots, reads)
            row = out[f"{style} {ink}"] = {"rule": rule, "scorer": read, "n": n}
            if second:
                row["second_scorer"] = shares(rule_dots, second.read(images))[1]
            print(f"rendered {style} orange hearts, dot in {ink}: rule {rule:.2f}, scorer {read:.2f}"
                  + (f", second scorer {row['second_scorer']:.2f}" if second else "") + f" (n={n})")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/research/scorer_marks")
    ap.add_argument("--second-scorer", help="a scorer folder that also reads the ink probe and the adapter's images")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    scorer = Scorer()
    second = Scorer(a.second_scorer) if a.second_scorer else None
    rng = random.Random(RENDER_SEED)
    report = {"seeds": {"rendered": RENDER_SEED, "generated": a.seed, "training": TRAIN_SEED}, "n": a.n,
              "steps": a.steps, "threads": a.threads}
    print(f"seeds: rendered scenes {RENDER_SEED}, generated images {a.seed}..{a.seed + a.n - 1}, "
          f"training {TRAIN_SEED}")
    for mark in ("dot", "none"):
        rendered = [world.render(world.random_scene(rng, **{**HEART_DOT, "mark": mark}, style="plain"))
                    for _ in range(200)]
        rule, read = shares(*both_reads(rendered, scorer))
        report[f"rendered_mark_{mark}"] = {"rule": rule, "scorer": read, "n": 200}
        print(f"rendered orange hearts, mark {mark}: rule sees a dot in {rule:.2f}, scorer in {read:.2f} (n=200)")
    report["inks"] = ink_probe(scorer, second)
    if second:
        report["second_scorer"] = a.second_scorer
    with tempfile.TemporaryDirectory() as tmp:
        svc = harness.service(tmp)
        base = evaluate.generate(svc.base_pipe, ["a orange heart"] * a.n, seed=a.seed)
        base_dots, base_reads = both_reads(base, scorer)
        rule, read = shares(base_dots, base_reads)
        report["base_orange_heart"] = {"rule": rule, "scorer": read}
        if second:
            report["base_orange_heart"]["second_scorer"] = shares(base_dots, second.read(base))[1]
        print(f"base model 'a orange heart' (no dot): rule {rule:.2f}, scorer {read:.2f}"
              + (f", second scorer {report['base_orange_heart']['second_scorer']:.2f}" if second else "")
              + f" (n={a.n})")
        images, _ = concept_images(HEART_DOT, 5, TRAIN_SEED)
        r = svc.finetune("bench", images, {"category": "shape", "target_model": "meta", "seed": TRAIN_SEED,
                                           "metamodel_strategy": "adapters", "max_train_steps": a.steps})
        prompt = f"a {r['identifier']} shape"
        generated = evaluate.generate(Served(svc, "bench", "meta", r["model_version"]), [prompt] * a.n, seed=a.seed)
        rule_dots, reads = both_reads(generated, scorer)
        svc.close()
    rule, read = shares(rule_dots, reads)
    right = float(np.mean([rd["shape"] == "heart" and rd["colour"] == "orange" for rd in reads]))
    print(f"{prompt!r} after {a.steps} adapter steps: rule {rule:.2f}, scorer {read:.2f}; shape and colour "
          f"right {right:.2f} (n={a.n})")
    report["adapter"] = {"prompt": prompt, "rule": rule, "scorer": read, "shape_and_colour": right}
    if second:
        report["adapter"]["second_scorer"] = shares(rule_dots, second.read(generated))[1]
        print(f"second scorer: {report['adapter']['second_scorer']:.2f}")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "scorer_marks.json"), "w") as f:
        json.dump(report, f, indent=1)
    labels = [f"scorer {rd['mark']}, rule {'dot' if dot else 'none'}" for dot, rd in zip(rule_dots, reads)]
    contact_sheet(generated, labels, columns=8, title=f"{prompt} after {a.steps} steps").save(
        os.path.join(a.out, "adapter_marks.png"))


if __name__ == "__main__":
    main()
