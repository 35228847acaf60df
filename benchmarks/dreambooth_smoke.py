"""DreamBooth smoke benchmark on the embedded model, through the service's own finetune path.

    python -m benchmarks.dreambooth_smoke [--steps 200] [--lr 1e-4] [--threads 2]

5 rendered images of an unseen concept (an orange heart with a centre dot: a held-out colour x shape
pair plus a mark pretraining never showed), category "shape", prior preservation on. Prints wall time
of the finetune call (class images included, cold cache), concept fidelity, prior leakage, and the
base-prompt accuracy of the fine-tuned model against the base model on the same seeds (drift).
"""
import argparse
import json
import os
import tempfile
import time


from benchmarks import harness
from shapes_world import evaluate
from shapes_world.scorer import Scorer

CONCEPT = {"shape": "heart", "colour": "orange", "mark": "dot"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help="default: the model's finetune default")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--class-images", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base-model", default="embedded")
    ap.add_argument("--out", default="reports/dreambooth_smoke")
    a = harness.parse_args(ap, argv, smoke=dict(steps=5, class_images=4, n=4))
    os.makedirs(a.out, exist_ok=True)
    images = harness.scene_images(5, a.seed, style="plain", **CONCEPT)
    scorer = Scorer()
    with tempfile.TemporaryDirectory() as tmp:
        svc = harness.service(tmp, base_model=a.base_model)
        params = {"category": "shape", "target_model": "private", "method": "dreambooth", "seed": a.seed}
        for k, v in (("max_train_steps", a.steps), ("learning_rate", a.lr), ("num_class_images", a.class_images),
                     ("train_batch_size", a.batch)):
            if v is not None:
                params[k] = v
        t0 = time.time()
        r = svc.finetune("bench", images, params)
        wall = time.time() - t0
        job = svc.registry.get_job(r["job_id"])
        tuned = svc.models.pipeline_for(f"private:{r['concept_id']}", 1)
        sheet = []
        scores = evaluate.concept_scores(tuned, scorer, identifier=r["identifier"], category="shape", attrs=CONCEPT,
                                         n=a.n, keep_images=sheet)
        before = evaluate.base_accuracy(svc.base_pipe, scorer, n=a.n)
        after = evaluate.base_accuracy(tuned, scorer, n=a.n)
        svc.close()
    report = {
        "seed": a.seed, "threads": a.threads, "params": json.loads(job["params"]),
        "finetune_wall_s": round(wall, 1), "identifier": r["identifier"],
        "fidelity": scores["fidelity"], "per_attribute": scores["per_attribute"], "prior_leak": scores["prior_leak"],
        "n": a.n,
        "base_seen_before": before["seen"], "base_seen_after": after["seen"],
        "base_drift_points": {k: round(100 * (before["seen"][k] - after["seen"][k]), 1) for k in ("colour", "shape", "both")},
    }
    print(json.dumps(report, indent=1))
    harness.write_json(os.path.join(a.out, "dreambooth_smoke.json"), report)
    from big.generation.sheets import contact_sheet

    contact_sheet(images + [im for im, _ in sheet], ["instance"] * len(images) + [c for _, c in sheet], columns=7,
                  title=f"dreambooth smoke: fidelity {scores['fidelity']:.2f} in {wall:.0f}s").save(
        os.path.join(a.out, "dreambooth_smoke.png"))
    return report


if __name__ == "__main__":
    main()
