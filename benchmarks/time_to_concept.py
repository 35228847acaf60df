"""Time to a concept: where a finetune's seconds go, from /finetune to its committed version, per model and method.

    python -m benchmarks.time_to_concept [--models embedded] [--threads 2] [--out reports/time_to_concept]
    python -m benchmarks.time_to_concept --models sd15 sdxl --out reports/time_to_concept-gpu   # on a GPU host
    python -m benchmarks.time_to_concept --preset smoke      # the small version the test suite runs

For each model, a fresh service (its own workspace, so the first job of a category makes its class images) runs
a private LoRA and a private DreamBooth concept (`--methods`) at the model's default settings, one job alone at a
time, each twice: the first job of the category generates its class images, the second reads them. Every row is the job's
own record (`/jobs`' `seconds`: queue, load, class_images, train, commit, and total from /finetune to the end).
The reference row is a LoRA job with `--reference` (JSON /finetune values; by default the embedded model's LoRA
defaults before research/lora_steps.py chose them again: rank 1, 700 steps), run in the same service after the
others: `lora_vs_reference` is the default LoRA job's total (class images read, as for every job after a
category's first) over the reference job's.

`sd15`, `sdxl` (and their `-tiny` twins) are the architectures of `benchmarks/configs/` at their sizes with
random weights, saved as a model folder first (no download); only their seconds mean anything.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from benchmarks import harness

METHODS = ("lora", "dreambooth")


def model_folder(name: str, root: str, device: torch.device) -> str:
    """`embedded`, or a folder holding the random-weight pipeline of `benchmarks/configs/<name>.json`."""
    if name == "embedded":
        return name
    from benchmarks.gpu import build

    pipe, _, _ = build(name, device, torch.float16 if device.type == "cuda" else torch.float32)
    folder = os.path.join(root, name)
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe
    return folder


def job_row(svc, user: str, images, params: dict) -> dict:
    t = time.perf_counter()
    r = svc.finetune(user, images, params)
    wall = time.perf_counter() - t
    job = svc.job(user, r["job_id"])
    return {"method": params["method"], "steps": job["total_steps"], "wall_s": round(wall, 2),
            **{k: v for k, v in job["seconds"].items()},
            "train_steps_per_s": round(job["total_steps"] / job["seconds"]["train"], 2)}


def run_model(name: str, *, methods, steps: int | None, class_images: int | None, reference: dict, root: str,
              device: torch.device) -> dict:
    folder = model_folder(name, root, device)
    with tempfile.TemporaryDirectory(dir=root) as ws:
        svc = harness.service(ws, base_model=folder)
        size = svc.size
        images = [im.resize((size, size)) for im in harness.instance_images(5)]
        common = {"category": "shape", "target_model": "private", "seed": 0}
        if steps:
            common["max_train_steps"] = steps
        if class_images is not None:
            common["num_class_images"] = class_images
        rows = []
        for method in methods:
            svc.ws.discard(svc.ws.class_image_dir(svc.base_key, "shape", size))  # each method's first job: none yet
            for run in ("first_of_category", "class_images_cached"):
                row = job_row(svc, f"{method}-{run}", images, {**common, "method": method})
                rows.append({"run": run, **row})
                print(name, rows[-1], flush=True)
        reference_row = job_row(svc, "reference", images, {**common, "method": "lora", **reference})
        print(name, "reference", reference_row, flush=True)
        defaults = {k: svc.finetune_defaults.get(k) for k in ("max_train_steps", "learning_rate")}
        lora_defaults = svc.finetune_defaults.get("per_method", {}).get("lora", {})
        svc.close()
    lora = next(r for r in rows if r["method"] == "lora" and r["run"] == "class_images_cached")
    return {"model": name, "defaults": {**defaults, **{f"lora_{k}": v for k, v in lora_defaults.items()}},
            "jobs": rows, "reference_lora": {"run": "class_images_cached", "params": reference, **reference_row},
            "lora_vs_reference": round(lora["total"] / reference_row["total"], 3)}


def markdown(report: dict) -> str:
    cols = ("run", "method", "steps", "queue", "load", "class_images", "train", "commit", "total", "train_steps_per_s")
    lines = []
    for m in report["models"]:
        lines += [f"### {m['model']} (default LoRA job / reference LoRA job {m['reference_lora']['params']}: "
                  f"{m['lora_vs_reference']:.2f}x)", "",
                  "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        for r in m["jobs"] + [{**m["reference_lora"], "run": "reference"}]:
            lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["embedded"],
                    help="embedded, sd15, sdxl, sd15-tiny, sdxl-tiny")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=None, help="every job's steps (default: the model's defaults)")
    ap.add_argument("--class-images", type=int, default=None, help="default: the model's default")
    ap.add_argument("--reference", type=json.loads, default={"max_train_steps": 700, "lora_rank": 1},
                    help="the reference LoRA job's /finetune values (JSON)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="reports/time_to_concept")
    a = harness.parse_args(ap, argv, smoke=dict(models=["sd15-tiny"], methods=["lora"], steps=2, class_images=1,
                                                reference={"max_train_steps": 3, "lora_rank": 1}))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"threads": a.threads, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "models": []}
    with tempfile.TemporaryDirectory() as root:
        for name in a.models:
            report["models"].append(run_model(name, methods=a.methods, steps=a.steps, class_images=a.class_images,
                                              reference=a.reference, root=root, device=device))
    harness.write_json(os.path.join(a.out, "time_to_concept.json"), report)
    with open(os.path.join(a.out, "time_to_concept.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
