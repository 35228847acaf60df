"""The fewest steps for the embedded model's default private LoRA: fidelity per (concept, steps, lr, seed).

    python -m research.lora_steps '[{"concept": "heart-dot", "max_train_steps": 350, "seed": 10}]' [--threads 1]

Each config trains one private LoRA concept with the model's defaults plus the config's /finetune values, on one
of the continual benchmark's four concepts (two objects, two captioned styles; five images each), and scores it
as /generate serves it (N=32 images of "a {id} {category}", and the class prompt with the concept applied: leak).
Prints one JSON line per config; docs/private-concepts.md records what the runs chose.
"""
import argparse
import json
import os
import tempfile

import torch

from benchmarks import harness
from benchmarks.continual import SEQUENCE, Served
from benchmarks.harness import concept_images
from big.storage.versions import read_version
from shapes_world import evaluate
from shapes_world.scorer import Scorer

CONCEPTS = {name: (category, attrs) for name, category, attrs in SEQUENCE}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", help="JSON list of {concept, seed, and /finetune values}")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    n = int(os.environ.get("N", 32))
    scorer = Scorer()
    with tempfile.TemporaryDirectory() as tmp:
        svc = harness.service(tmp, max_num_images=max(16, n))
        for i, cfg in enumerate(json.loads(a.configs)):
            cfg = dict(cfg)
            name = cfg.pop("concept")
            category, attrs = CONCEPTS[name]
            images, captions = concept_images(attrs, 5, 100 * [c for c, *_ in SEQUENCE].index(name))
            params = {"category": category, "method": "lora", **cfg, **({"captions": captions} if captions else {})}
            user = f"u{i}"
            r = svc.finetune(user, images, params)
            meta = read_version(svc.registry.version_path(f"private:{r['concept_id']}", 1)).meta.to_dict()
            served = Served(svc, user, "private", None)
            served.params = {"target_model": "private", "identifiers": [r["identifier"]]}  # the class prompt too
            sc = evaluate.concept_scores(served, scorer, identifier=r["identifier"], category=category, attrs=attrs,
                                         n=n)
            print(json.dumps({"concept": name, "cfg": cfg, "ident": r["identifier"],
                              "train_s": round(meta["train_seconds"], 1), "fid": sc["fidelity"],
                              "leak": sc["prior_leak"], "per": sc["per_attribute"],
                              "loss": round(meta["final_loss"], 4)}), flush=True)
        svc.close()


if __name__ == "__main__":
    main()
