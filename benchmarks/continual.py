"""Does the metamodel forget? A sequence of concepts taught to one metamodel, scored after each step.

    python -m benchmarks.continual [--strategies naive seed_split adapters] [--steps 200] [--n 32] [--no-captions]
                                   [--dtype bfloat16]
    python -m benchmarks.continual --preset smoke      # the small version the test suite runs

Sequence: an object (an orange heart with a centre dot, category "shape"), a style (checker, "painting", each
image captioned with its subject unless --no-captions), a second object of the same category (a red star with a
ring: the seed's hard case), a second style (hollow). After each step every concept learned so far is scored
(fidelity), the base prompts (drift), the class prompts (leak: "a shape" showing a concept) and style x object
compositions ("a {style} painting of a {object} shape", both attributes right; and the composable prompt "...
AND a {object} shape :2", whose second part is the object's adapter alone). Every image is made through the
service's own rendering (`BIGService.render`, what /generate serves: a metamodel's trunk plus the adapters a
prompt names). Writes a JSON table, a PNG line chart per strategy and a contact sheet per step to --out.
Training times exclude the class images, made once per category before any step (as one service shares them
among all its users), as does the base model's score.

The strategies run side by side, one process of one torch thread each (--jobs 1 --threads 2 runs them one
after another): a training step of this small UNet takes as long on one thread as on two, so the cores are
better used by separate trainings. Their train_s are then times under the same sharing of the cores:
compare them with each other, not with a run made alone.
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from benchmarks import harness
from benchmarks.harness import concept_images
from big.storage.versions import read_version
from big.generation import sampling
from big.service import BIGService
from shapes_world import evaluate
from shapes_world.scorer import Scorer
from big.generation.sheets import captioned_sheet, line_chart

SEQUENCE = [
    ("heart-dot", "shape", {"shape": "heart", "colour": "orange", "mark": "dot"}),
    ("checker", "painting", {"style": "checker"}),
    ("star-ring", "shape", {"shape": "star", "colour": "red", "mark": "ring"}),
    ("hollow", "painting", {"style": "hollow"}),
]
PRESETS = {
    "full": dict(steps=None, n=32, base_n=64, concepts=4),
    "smoke": dict(steps=250, n=8, base_n=8, concepts=2),
}


def teach_as_adapters(svc: BIGService, seed: int = 0, style_images: int = 5,
                      style_params: dict | None = None) -> list[tuple[str, str, dict, dict]]:
    """The whole SEQUENCE taught to `svc`'s shared metamodel with the `adapters` strategy, one concept after
    another (the benchmarks that study adapters once learned): (name, category, attributes, registry row).
    `style_images`: how many images teach each style (the first five are the same whatever the number; objects
    always get five); `style_params`: more /finetune parameters for the styles only (e.g. {"hue_copies": 3}; even
    {"metamodel_strategy": "seed_split"}, which teaches the styles into the trunk by DreamBooth)."""
    learned = []
    for i, (name, category, attrs) in enumerate(SEQUENCE):
        images, captions = concept_images(attrs, style_images if "style" in attrs else 5, seed + 100 * i)
        params = {"category": category, "target_model": "meta", "metamodel_strategy": "adapters", "seed": seed + i}
        if "style" in attrs:
            params.update(style_params or {})
        r = svc.finetune("bench", images, {**params, **({"captions": captions} if captions else {})})
        learned.append((name, category, attrs, svc.registry.get_concept(r["concept_id"])))
        print(name, r["identifier"], flush=True)
    return learned


class Served:
    """A model version as /generate serves it (a metamodel's trunk plus the adapters each prompt names),
    called like a diffusers pipeline so that shapes_world.evaluate scores exactly what users get."""

    def __init__(self, svc: BIGService, user: str, target: str, version: int):
        self.svc, self.user, self.params = svc, user, {"target_model": target, "model_version": version}

    def __call__(self, prompts, *, num_inference_steps, guidance_scale, generator, height, width,
                 negative_prompt=None):
        specs = [sampling.ImageSpec(p, g.initial_seed(), guidance_scale, num_inference_steps)
                 for p, g in zip(prompts, generator)]
        params = {**self.params, "height": height, "width": width}
        if negative_prompt:
            params["negative_prompt"] = negative_prompt[0]
        return argparse.Namespace(images=[g.image for g in self.svc.render(self.user, specs, params)])


def score_concepts(pipe, scorer, learned, *, n: int, seed: int, keep_images: list | None = None) -> dict:
    """`evaluate.concept_scores` of each (name, category, attributes, identifier) in `learned`, by name; the class
    prompt's images are made once per category and read for every concept of it."""
    class_images = {c: evaluate.class_prompt_images(pipe, c, n=n, seed=seed) for c in sorted({x[1] for x in learned})}
    return {name: evaluate.concept_scores(pipe, scorer, identifier=ident, category=category, attrs=attrs, n=n,
                                          seed=seed, keep_images=keep_images, class_images=class_images[category])
            for name, category, attrs, ident in learned}


def run_strategy(strategy: str, *, steps, n, base_n, concepts, seed, scorer, out_dir, base_model, base, class_cache,
                 captions=True, threads=None, dtype="auto"):
    """`base` and `class_cache`: the base model's scores and a folder of class images, from `prepare_shared`
    (the same for every strategy, as one service shares class images among its users); `scorer`: None makes
    one here (a worker process); `threads`: torch's thread count for this strategy."""
    if threads:
        torch.set_num_threads(threads)
    scorer = scorer or Scorer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        svc = harness.service(tmp, base_model=base_model, dtype=dtype)
        # Read only: strategies running side by side share it.
        shutil.copytree(class_cache, os.path.join(tmp, "class_images"), dirs_exist_ok=True)
        for category in sorted({c for _, c, _ in SEQUENCE[:concepts]}):  # made before any training is timed
            svc.prior_class_images(category, svc.finetune_defaults["num_class_images"])
        learned = []
        for i, (name, category, attrs) in enumerate(SEQUENCE[:concepts]):
            params = {"category": category, "target_model": "meta", "metamodel_strategy": strategy, "seed": seed + i}
            if steps:
                params["max_train_steps"] = steps
            t0 = time.time()
            images, image_captions = concept_images(attrs, 5, seed + 100 * i, captions)
            if image_captions:
                params["captions"] = image_captions
            r = svc.finetune("bench", images, params)
            train_s = time.time() - t0
            learned.append((name, category, attrs, r["identifier"]))
            pipe = Served(svc, "bench", "meta", r["model_version"])
            version_dir = svc.registry.version_path("meta", r["model_version"])
            sheet = []
            t_score = time.time()
            scores = score_concepts(pipe, scorer, learned, n=n, seed=seed + 7, keep_images=sheet)
            fid = {cname: sc["fidelity"] for cname, sc in scores.items()}
            leak = [sc["prior_leak"] for sc in scores.values()]
            comps, per_attribute, comps_and = {}, {}, {}
            styles = [c for c in learned if c[1] == "painting"]
            objects = [c for c in learned if c[1] == "shape"]
            for (sname, _, sattrs, sid) in styles:
                for (oname, _, oattrs, oid) in objects:
                    prompt = f"a {sid} painting of a {oid} shape"
                    imgs = evaluate.generate(pipe, [prompt] * n, seed=seed + 11)
                    reads = scorer.read(imgs)
                    both = {**sattrs, **oattrs}
                    comps[f"{sname}x{oname}"] = float(np.mean([evaluate.shows(rd, both) for rd in reads]))
                    per_attribute[f"{sname}x{oname}"] = {k: float(np.mean([rd[k] == v for rd in reads]))
                                                         for k, v in both.items()}
                    sheet += [(im, prompt) for im in imgs[:4]]
                    composed = f"{prompt} AND a {oid} shape :2"
                    imgs = evaluate.generate(pipe, [composed] * n, seed=seed + 11)
                    comps_and[f"{sname}x{oname}"] = float(np.mean([evaluate.shows(rd, both)
                                                                   for rd in scorer.read(imgs)]))
                    sheet += [(im, composed) for im in imgs[:4]]
            acc = evaluate.base_accuracy(pipe, scorer, n=base_n, seed=seed, parts=("seen",))
            row = {"step": i + 1, "concept": name, "identifier": r["identifier"], "train_s": round(train_s, 1),
                   "score_s": round(time.time() - t_score, 1),
                   "version_bytes": read_version(version_dir).bytes(), "method": r["method"],
                   "fidelity": fid, "class_leak_max": max(leak), "compositions": comps,
                   "composition_attributes": per_attribute, "compositions_and_object": comps_and,
                   "base_both_seen": acc["seen"]["both"],
                   "base_drift_points": round(100 * (base["seen"]["both"] - acc["seen"]["both"]), 1)}
            rows.append(row)
            print(json.dumps({"strategy": strategy, **row}), flush=True)
            captioned_sheet(sheet, columns=8, title=f"{strategy} after {i + 1}: {name}").save(
                os.path.join(out_dir, f"{strategy}_step{i + 1}.png"))
        svc.close()
    return {"base": base, "rows": rows}


def save_class_images(svc: BIGService, categories, class_cache: str) -> None:
    """`svc`'s class images of `categories` (as many as a finetune takes by default), made now and copied into
    the folder `class_cache`: benchmarks make them once and give every training's workspace a copy, as one
    service shares them among its users."""
    for category in sorted(categories):
        svc.prior_class_images(category, svc.finetune_defaults["num_class_images"])
    shutil.copytree(os.path.join(svc.ws.root, "class_images"), class_cache, dirs_exist_ok=True)


def prepare_shared(*, base_model, scorer, seed, base_n, concepts, class_cache, dtype="auto"):
    """The base model's scores, and the class images of the sequence's categories written to `class_cache`."""
    with tempfile.TemporaryDirectory() as tmp:
        svc = harness.service(tmp, base_model=base_model, dtype=dtype)
        base = evaluate.base_accuracy(svc.base_pipe, scorer, n=base_n, seed=seed, parts=("seen",))
        save_class_images(svc, {c for _, c, _ in SEQUENCE[:concepts]}, class_cache)
        svc.close()
    return base


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", nargs="+", default=["naive", "seed_split", "adapters"])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--n", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the shared setup and of each "
                    "strategy when --jobs is 1")
    ap.add_argument("--jobs", type=int, help="strategies run side by side in this many processes of one torch "
                    "thread each (default: one per strategy; 1 runs them one after another with --threads)")
    ap.add_argument("--base-model", default="embedded")
    ap.add_argument("--dtype", default="auto", help="the services' served dtype (the service's `dtype`: auto, "
                    "float32, bfloat16; training works on float32 copies either way)")
    ap.add_argument("--out", default="reports/continual")
    ap.add_argument("--no-captions", action="store_true", help="teach styles without per-image captions")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    preset = dict(PRESETS[a.preset])
    if a.steps:
        preset["steps"] = a.steps
    if a.n:
        preset["n"] = a.n
    os.makedirs(a.out, exist_ok=True)
    scorer = Scorer()
    jobs = a.jobs or len(a.strategies)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as class_cache:
        # What every strategy shares is made once, before any of them starts: the base model's scores
        # and the class images (as one service shares them among its users).
        base = prepare_shared(base_model=a.base_model, scorer=scorer, seed=a.seed, base_n=preset["base_n"],
                              concepts=preset["concepts"], class_cache=class_cache, dtype=a.dtype)
        common = dict(seed=a.seed, out_dir=a.out, base_model=a.base_model, dtype=a.dtype, captions=not a.no_captions,
                      base=base, class_cache=class_cache, **preset)
        if jobs == 1:
            results = {s: run_strategy(s, scorer=scorer, **common) for s in a.strategies}
        else:
            # Training a small UNet at batch 8 gains nothing from a second thread (0.12-0.14 s a step with one
            # or two on this CPU), so two cores do twice the work as separate processes.
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                futures = {s: pool.submit(run_strategy, s, scorer=None, threads=1, **common) for s in a.strategies}
                results = {s: f.result() for s, f in futures.items()}
    report = {"preset": a.preset, "seed": a.seed, "threads": a.threads if jobs == 1 else 1, "jobs": jobs,
              "cores": os.cpu_count(), "style_captions": not a.no_captions, "dtype": a.dtype,
              **preset, "strategies": results,
              "wall_s": round(time.time() - t0, 1)}
    with open(os.path.join(a.out, "continual.json"), "w") as f:
        json.dump(report, f, indent=1)
    for s, res in results.items():
        names = [r["concept"] for r in res["rows"]]
        series = {c: [r["fidelity"].get(c) for r in res["rows"]] for c in names}
        line_chart(series, [f"+{c}" for c in names], title=f"{s}: fidelity of each concept as more are learned",
                   y_label="fidelity").save(os.path.join(a.out, f"{s}_fidelity.png"))
    print("\nstrategy     first-concept fidelity after each step        drift(pts)  max leak  compositions")
    for s, res in results.items():
        first = SEQUENCE[0][0]
        print(f"{s:12s} {[round(r['fidelity'][first], 2) for r in res['rows']]!s:45s} "
              f"{res['rows'][-1]['base_drift_points']:>9}  {max(r['class_leak_max'] for r in res['rows']):.2f}  "
              f"{res['rows'][-1]['compositions']}")
        print(f"{'':12s} compositions with 'AND a {{object}} shape :2': {res['rows'][-1]['compositions_and_object']}")
    print(f"wall {report['wall_s']} s")


if __name__ == "__main__":
    main()
