"""Does rounding a metamodel's trunk compound over a chain of DreamBooth versions?

    python -m research.trunk_chain_rounding [--dtypes float32 float16 bfloat16] [--n 32] [--steps N]
                                              [--learning-rate LR] [--out docs/research/precision/storage_rounding_chain.json]

`storage_rounding.py` measures what one rounding of one DreamBooth update loses. A metamodel taught by a
DreamBooth strategy trains every version from the trunk stored by the version before, so a trunk stored in a
lower precision than training works in is rounded once per concept. This teaches the continual benchmark's
four concepts (`continual.SEQUENCE`, strategy `seed_split`, the service's default steps and learning rate) to
one metamodel per dtype, on float32 services that differ only in what their trunk writes hold: each written
trunk is rounded to that dtype and back (exactly the values a trunk stored in it gives when loaded again), so
version k+1 trains from rounded version k, as a service that stored trunks as it served them did before the
float32 trunks (`pipelines.TRUNK_DTYPE`). The chains run side by side, one process of one torch thread each.

Per version:
- `update_error`: |rounded update - update| / |update| of that version's own training (its start is the
  rounded trunk before it; for the first, the float32 base, whose own rounding then counts too);
  `moved_lost`: the share of moved weights whose rounded value is their start;
- `from_float32`: |trunk - float32 chain's trunk| / |float32 chain's trunk - base| (0 for float32 itself):
  how far the chain has gone from where float32 storage took it, as a share of how far that went (both norms
  are in the JSON: `distance_from_float32`, `float32_from_base`);
- `from_float32_served`: the same with the float32 chain's trunk rounded to the dtype, as a service of that dtype
  serves it: what the rounded chain lost beyond the rounding of serving (0 after the first version, which
  trains from the same float32 base in both chains), so the measure of compounding;
- `fidelity_new`: the concept just learned, n images.
After the fourth: every concept's fidelity and its class prompt's leak (n images, seed 7).
Writes docs/research/precision/storage_rounding_chain.json.
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import tempfile
import time

import torch

from benchmarks import harness
from benchmarks import continual
from benchmarks.harness import concept_images
from research.storage_rounding import rounding_loss
from big import finetune
from big.weights import pipelines
from shapes_world.scorer import Scorer

def unet_state(module) -> dict:
    return {k: v.detach().float().clone() for k, v in module.state_dict().items()}


def run_chain(dtype_name: str, *, class_cache: str, n: int, steps: int | None, learning_rate: float | None, seed: int,
              threads: int = 1) -> dict:
    """One metamodel taught the sequence with every trunk write rounded to `dtype_name`; returns its rows, the
    final scores and each version's UNet weights (float32 tensors)."""
    torch.set_num_threads(threads)
    dtype = pipelines.DTYPES[dtype_name]
    scorer = Scorer()
    rows, trunks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        svc = harness.service(tmp, dtype="float32")
        base = unet_state(svc.base_pipe.unet)
        start = {"unet": base}
        original_save = finetune.write_version

        def rounding_save(staging, meta, *, unet=None, text_encoder=None, **kw):
            if unet is not None:  # a DreamBooth trunk: what a `dtype` file would hold
                rows.append(rounding_loss(unet_state(unet), start["unet"], dtype, start_is_stored=True))
                for module in (unet, text_encoder):  # (a no-op for float32)
                    pipelines.as_dtype(pipelines.as_dtype(module, dtype), torch.float32)
            original_save(staging, meta, unet=unet, text_encoder=text_encoder, **kw)

        finetune.write_version = rounding_save  # this worker process's own module
        try:
            shutil.copytree(class_cache, os.path.join(tmp, "class_images"), dirs_exist_ok=True)
            learned = []
            for i, (name, category, attrs) in enumerate(continual.SEQUENCE):
                params = {"category": category, "target_model": "meta", "metamodel_strategy": "seed_split",
                          "seed": seed + i}
                if steps:
                    params["max_train_steps"] = steps
                if learning_rate:
                    params["learning_rate"] = learning_rate
                images, captions = concept_images(attrs, 5, seed + 100 * i)
                if captions:
                    params["captions"] = captions
                t0 = time.time()
                r = svc.finetune("bench", images, params)
                train_s = time.time() - t0
                trunk = unet_state(svc.models.pipeline_for("meta", r["model_version"]).unet)
                start["unet"] = trunk
                trunks.append(trunk)
                learned.append((name, category, attrs, r["identifier"]))
                served = continual.Served(svc, "bench", "meta", r["model_version"])
                new = continual.score_concepts(served, scorer, learned[-1:], n=n, seed=seed + 7)[name]
                rows[-1].update(step=i + 1, concept=name, train_s=round(train_s, 1), fidelity_new=new["fidelity"])
                print(json.dumps({"dtype": dtype_name, **rows[-1]}), flush=True)
            final = continual.score_concepts(served, scorer, learned, n=n, seed=seed + 7)
        finally:
            finetune.write_version = original_save
        svc.close()
    return {"rows": rows, "fidelity_after_all": {c: s["fidelity"] for c, s in final.items()},
            "class_leak_after_all": {c: s["prior_leak"] for c, s in final.items()}, "base": base, "trunks": trunks}


def distance(a: dict, b: dict) -> float:
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=list(pipelines.DTYPES), choices=list(pipelines.DTYPES))
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, help="training steps per concept (default: the service's)")
    ap.add_argument("--learning-rate", type=float, help="default: the service's (1e-4 for the embedded model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/research/precision/storage_rounding_chain.json")
    a = ap.parse_args()
    if "float32" not in a.dtypes:
        ap.error("float32 is the chain the others are measured against")
    torch.set_num_threads(2)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as class_cache:
        svc = harness.service(tmp, dtype="float32")
        continual.save_class_images(svc, {c for _, c, _ in continual.SEQUENCE}, class_cache)
        defaults = {k: svc.finetune_defaults.get(k) for k in ("learning_rate", "max_train_steps")}
        svc.close()
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=len(a.dtypes), mp_context=ctx) as pool:
            futures = {d: pool.submit(run_chain, d, class_cache=class_cache, n=a.n, steps=a.steps,
                                  learning_rate=a.learning_rate, seed=a.seed)
                       for d in a.dtypes}
            chains = {d: f.result() for d, f in futures.items()}
    reference = chains["float32"]
    base = reference["base"]
    for name, chain in chains.items():
        for row, trunk, ref in zip(chain["rows"], chain["trunks"], reference["trunks"]):
            moved, gap = distance(ref, base), distance(trunk, ref)
            served_ref = {k: v.to(pipelines.DTYPES[name]).float() for k, v in ref.items()}
            row.update(distance_from_float32=gap, float32_from_base=moved, from_float32=gap / moved,
                       from_float32_served=distance(trunk, served_ref) / moved)
    report = {"strategy": "seed_split", "seed": a.seed, "n": a.n, "score_seed": a.seed + 7,
              "learning_rate": a.learning_rate or defaults["learning_rate"],
              "max_train_steps": a.steps or defaults["max_train_steps"],
              "wall_s": round(time.time() - t0, 1),
              "chains": {d: {k: v for k, v in c.items() if k not in ("base", "trunks")} for d, c in chains.items()}}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nlr {report['learning_rate']}, {report['max_train_steps']} steps a concept, n={a.n}")
    print(f"{'dtype':>9} {'version':>7} {'update lost':>12} {'moved lost':>11} {'from float32':>13} "
          f"{'(its norm)':>11} {'... as served':>14} {'fidelity new':>13}")
    for d, c in report["chains"].items():
        for row in c["rows"]:
            print(f"{d:>9} {row['step']:>7} {row['update_error']:>12.4f} {row['moved_lost']:>11.4f} "
                  f"{row['from_float32']:>13.4f} {row['distance_from_float32']:>11.4f} "
                  f"{row['from_float32_served']:>14.4f} {row['fidelity_new']:>13.2f}")
        print(f"{'':>9} after all four: fidelity {c['fidelity_after_all']}, leak {c['class_leak_after_all']}")
    print(f"wall {report['wall_s']} s")


if __name__ == "__main__":
    main()
