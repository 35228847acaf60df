"""What a metamodel adapter costs at /generate: a prompt through its adapters merged into a cached UNet copy
(`fuse_adapters`, the default) and unmerged (peft's LoRA layers, switched per request), against a prompt the
trunk serves alone, in the same process.

    python -m benchmarks.adapter_speed [--threads 2] [--images 32] [--repeats 5] [--steps 100]

Teaches one concept to an `adapters` metamodel of the embedded model (`--steps` only: the adapter's
size, not its quality, sets its cost), then times calls of `--images` images each, the three kinds
alternating, and prints each kind's median seconds and its ratio to the trunk's. The first merged call,
which builds the merged copy, is timed on its own. Writes reports/adapter_speed/adapter_speed.json.
"""
import argparse
import statistics
import tempfile
import time


from benchmarks import harness
from benchmarks.continual import SEQUENCE
from benchmarks.harness import concept_images


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="reports/adapter_speed")
    a = harness.parse_args(ap, argv, smoke=dict(images=2, repeats=1, steps=3))
    with tempfile.TemporaryDirectory() as tmp:
        svc = harness.service(tmp)
        name, category, attrs = SEQUENCE[0]
        images, _ = concept_images(attrs, 5, a.seed)
        concept = svc.finetune("bench", images, {"category": category, "target_model": "meta",
                                                 "max_train_steps": a.steps, "seed": a.seed})
        ident = concept["identifier"]
        per_prompt = min(a.images, 16)  # a request's limit per prompt: the prompt is repeated for more
        params = {"target_model": "meta", "num_images": per_prompt, "seed": a.seed}

        def call(prompt: str, fuse: bool) -> float:
            svc.config.fuse_adapters = fuse
            t0 = time.perf_counter()
            svc.generate("bench", [prompt] * max(1, a.images // per_prompt), params)
            return time.perf_counter() - t0

        kinds = {"trunk alone (no identifier)": ("a orange heart", True),
                 "adapter merged (fuse_adapters)": (f"a {ident} {category}", True),
                 "adapter unmerged (peft layers)": (f"a {ident} {category}", False)}
        call("a red star", True)  # warm-up: the pipelines are built, the adapter loaded
        call(kinds["adapter unmerged (peft layers)"][0], False)
        first_merged = call(kinds["adapter merged (fuse_adapters)"][0], True)  # builds the merged copy
        times = {k: [] for k in kinds}
        for _ in range(a.repeats):
            for k, (prompt, fuse) in kinds.items():
                times[k].append(call(prompt, fuse))
        svc.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["trunk alone (no identifier)"]
    report = {"threads": a.threads, "images_per_call": a.images, "repeats": a.repeats,
              "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
              "median_s": {k: round(v, 3) for k, v in med.items()},
              "ratio_to_trunk": {k: round(v / base, 2) for k, v in med.items()},
              "first_merged_call_s": round(first_merged, 3)}
    harness.write_report(a.out, "adapter_speed", report)
    print(f"{a.images} images per call, {a.threads} threads, median of {a.repeats} (alternating):")
    for k in kinds:
        print(f"  {k:32s} {med[k]:6.2f} s  {med[k] / base:.2f}x the trunk's")
    print(f"  first merged call (merges, then renders): {first_merged:.2f} s")
    return report


if __name__ == "__main__":
    main()
