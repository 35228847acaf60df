"""How much of a DreamBooth update survives a trunk written in a lower precision than it was trained in.

    python -m research.storage_rounding [--steps 300] [--lrs 1e-4 1e-6] [--n 32] [--threads 2]

For each learning rate, a float32 service teaches one private DreamBooth concept (the orange heart with a centre
dot, 5 rendered images, seed 0) and its trained UNet is compared with the base's, weight by weight, after both
are rounded to bfloat16 and to float16 (as a trunk written in that dtype and trained from again would be):

- `update_error`: |rounded update - update| / |update| over all weights (0: nothing lost);
- `moved_lost`: the share of the weights that training moved whose rounded value is their rounded start;
- `fidelity`: the concept's fidelity with the trunk rounded and cast back to float32 (only the stored weights
  differ), n images from seed 5000, next to the unrounded trunk's.

This is why a bfloat16 service (`dtype: bfloat16`) writes trunks in float32 and trains from them. Writes
docs/research/precision/storage_rounding.json.
"""
import argparse
import json
import os
import random
import tempfile

import torch

from benchmarks import harness
from shapes_world import evaluate, world
from shapes_world.scorer import Scorer

CONCEPT = {"shape": "heart", "colour": "orange", "mark": "dot"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def rounding_loss(trained: dict, start: dict, dtype, *, start_is_stored: bool = False) -> dict:
    """What writing `trained` in `dtype` loses of its update from `start`, which is stored in `dtype` too (rounded
    here) or, with `start_is_stored`, already holds the values training started from (a trunk trained from a
    stored trunk, research/trunk_chain_rounding.py)."""
    err = norm = 0.0
    moved = lost = 0
    for k, w in trained.items():
        w, w0 = w.float(), start[k].float()
        update = w - w0
        rounded = w.to(dtype).float() - (w0 if start_is_stored else w0.to(dtype).float())
        err += float((rounded - update).pow(2).sum())
        norm += float(update.pow(2).sum())
        changed = update != 0
        moved += int(changed.sum())
        lost += int((changed & (rounded == 0)).sum())
    return {"update_error": (err / norm) ** 0.5 if norm else 0.0, "moved_lost": lost / moved if moved else 0.0,
            "moved_weights": moved}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-6])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/research/precision/storage_rounding.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rng = random.Random(0)
    images = [world.render(world.random_scene(rng, style="plain", **CONCEPT)) for _ in range(5)]
    scorer = Scorer()
    report = {"steps": a.steps, "n": a.n, "threads": a.threads, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        svc = harness.service(tmp, dtype="float32")
        base = {k: v.clone() for k, v in svc.base_pipe.unet.state_dict().items()}
        for lr in a.lrs:
            r = svc.finetune("bench", images, {"category": "shape", "method": "dreambooth", "learning_rate": lr,
                                               "max_train_steps": a.steps, "seed": 0})
            tuned = svc.models.pipeline_for(f"private:{r['concept_id']}", 1)
            trained = {k: v.clone() for k, v in tuned.unet.state_dict().items()}

            def fidelity():
                return evaluate.concept_scores(tuned, scorer, identifier=r["identifier"], category="shape",
                                               attrs=CONCEPT, n=a.n)["fidelity"]

            run = {"learning_rate": lr, "fidelity_float32": fidelity()}
            for name, dtype in DTYPES.items():
                run[name] = rounding_loss(trained, base, dtype)
                tuned.unet.load_state_dict({k: v.to(dtype).float() for k, v in trained.items()})
                run[name]["fidelity"] = fidelity()
                tuned.unet.load_state_dict(trained)
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
        svc.close()
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{'lr':>8} {'dtype':>9} {'update lost':>12} {'moved weights lost':>19} {'fidelity':>9} (float32)")
    for run in report["runs"]:
        for name in DTYPES:
            x = run[name]
            print(f"{run['learning_rate']:>8g} {name:>9} {x['update_error']:>12.4f} {x['moved_lost']:>19.4f} "
                  f"{x['fidelity']:>9.2f} ({run['fidelity_float32']:.2f})")


if __name__ == "__main__":
    main()
