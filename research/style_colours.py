"""Does a style keep the colour a prompt asks for? Each style of benchmarks/continual.py taught alone as a
metamodel adapter, with and without `hue_copies`, then asked to paint base-model subjects.

    python -m research.style_colours [--teach-seeds 0 1 2] [--hue-copies 0 3] [--n 32] [--seed 11] [--jobs 2]

A style's five images come from the world in random colours (`harness.concept_images`, captioned with
their subjects, "a purple heart"). With so few, an identifier binds their colours: a teach seed whose hollow
images hold a purple heart paints "a {hollow} painting of a orange heart" purple. `hue_copies` also teaches
hue-rotated copies captioned without hue words. Prompts: "a {style} painting of a {colour} {shape}" for six
subjects (SUBJECTS, free backgrounds); the scorer reads style, colour and shape. Each (teach seed, style,
hue_copies) is one training in a worker process of one torch thread (a training step of this UNet is no
faster on two); images i use seed + i. Writes docs/research/compositions/style_colours.json and a contact sheet of
the first images of each prompt, and prints, per setting, the mean share of images with all three right.
"""
import argparse
import concurrent.futures
import multiprocessing
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from benchmarks import harness
from benchmarks.continual import SEQUENCE, Served, save_class_images
from benchmarks.harness import concept_images, write_report
from shapes_world import evaluate
from shapes_world.scorer import Scorer

SUBJECTS = ("orange heart", "red star", "blue star", "green circle", "purple heart", "yellow square")
STYLES = {name: (i, category, attrs) for i, (name, category, attrs) in enumerate(SEQUENCE) if "style" in attrs}


def one_training(style: str, teach_seed: int, hue_copies: int, n: int, seed: int, steps: int | None,
                 class_cache: str) -> dict:
    """Teach `style` alone (the images and seed continual.py's sequence gives it at `teach_seed`), then score
    every subject of SUBJECTS in it. `steps`: None is the model's default for metamodel adapters;
    `class_cache`: the class images, made once by `make_class_images` (so train_s leaves them out)."""
    torch.set_num_threads(1)
    i, category, attrs = STYLES[style]
    images, captions = concept_images(attrs, 5, teach_seed + 100 * i)
    scorer = Scorer()
    with tempfile.TemporaryDirectory() as tmp:
        # Copied, not linked: trainings side by side must not write into one cache.
        shutil.copytree(class_cache, os.path.join(tmp, "class_images"))
        svc = harness.service(tmp, train_threads=1)
        t0 = time.time()
        r = svc.finetune("bench", images, {"category": category, "target_model": "meta", "seed": teach_seed + i,
                                           "metamodel_strategy": "adapters", "captions": captions,
                                           "hue_copies": hue_copies,
                                           **({"max_train_steps": steps} if steps else {})})
        train_s = time.time() - t0
        served = Served(svc, "bench", "meta", svc.registry.get_concept(r["concept_id"])["version"])
        rows, sheet = {}, []
        for subject in SUBJECTS:
            colour, shape = subject.split()
            prompt = f"a {r['identifier']} painting of a {subject}"
            shown = evaluate.generate(served, [prompt] * n, seed=seed)
            reads = scorer.read(shown)
            want = {"style": attrs["style"], "colour": colour, "shape": shape}
            rows[subject] = {"all": round(float(np.mean([evaluate.shows(rd, want) for rd in reads])), 3),
                             **{k: round(float(np.mean([rd[k] == v for rd in reads])), 3) for k, v in want.items()}}
            sheet += [(im, f"{style} t{teach_seed} hue {hue_copies}: {subject}") for im in shown[:4]]
        svc.close()
    return {"style": style, "teach_seed": teach_seed, "hue_copies": hue_copies, "train_s": round(train_s, 1),
            "training_subjects": captions, "subjects": rows,
            "mean_all": round(float(np.mean([v["all"] for v in rows.values()])), 3), "sheet": sheet}


def make_class_images(class_cache: str) -> None:
    """The styles' class images, made once into `class_cache` on one thread, as each training would make them."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        svc = harness.service(tmp)
        save_class_images(svc, {category for _, category, _ in STYLES.values()}, class_cache)
        svc.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teach-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--hue-copies", type=int, nargs="+", default=[0, 3])
    ap.add_argument("--styles", nargs="+", default=list(STYLES), choices=list(STYLES))
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--steps", type=int, help="training steps (default: the model's, 600)")
    ap.add_argument("--jobs", type=int, default=2, help="trainings side by side, one torch thread each")
    ap.add_argument("--out", default="docs/research/compositions")
    a = ap.parse_args(argv)
    t0 = time.time()
    runs = [(s, t, h) for s in a.styles for t in a.teach_seeds for h in a.hue_copies]
    print(f"{len(runs)} trainings; image seed {a.seed}, n={a.n}", flush=True)
    with tempfile.TemporaryDirectory() as class_cache, concurrent.futures.ProcessPoolExecutor(
            a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        make_class_images(class_cache)
        results = list(pool.map(one_training, *zip(*runs), [a.n] * len(runs), [a.seed] * len(runs),
                                 [a.steps] * len(runs), [class_cache] * len(runs)))
    sheet = [cell for r in results for cell in r.pop("sheet")]
    report = {"seed": a.seed, "n": a.n, "steps": a.steps, "subjects": SUBJECTS, "runs": results,
              "wall_s": round(time.time() - t0, 1)}
    summary = {}
    for r in results:
        summary.setdefault(f"{r['style']} teach {r['teach_seed']}", {})[f"hue_copies {r['hue_copies']}"] = r["mean_all"]
        print(f"{r['style']:8s} teach {r['teach_seed']} hue_copies {r['hue_copies']}: mean {r['mean_all']:.2f}  "
              + "  ".join(f"{s} {v['all']:.2f}" for s, v in r["subjects"].items()), flush=True)
    for h in a.hue_copies:
        mean = float(np.mean([r["mean_all"] for r in results if r["hue_copies"] == h]))
        summary[f"mean hue_copies {h}"] = round(mean, 3)
        print(f"hue_copies {h}: mean over styles and teach seeds {mean:.2f}")
    report["summary"] = summary
    write_report(a.out, "style_colours", report, sheet, columns=12,
                 title=f"styles painting base subjects, with and without hue copies (seed {a.seed}..)")
    print(f"wall {report['wall_s']} s")


if __name__ == "__main__":
    main()
