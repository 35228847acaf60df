"""How many CPU threads a training job should use: the same /finetune job with the service's `train_threads`
unset (torch's default) and set, alternating, as a server runs it.

    python -m benchmarks.train_threads [--threads 2] [--steps 150] [--repeats 2] [--settings default 1]

Each job runs in a fresh process (torch's thread settings outlive a job) whose main thread first serves a
/generate, as a running server's serving thread has, so that its OpenMP team exists beside the job
thread's. Each job: 5 images of a new concept, the shapes-world embedded model, class images already made. Jobs: a metamodel `adapters` step (rank-4 LoRA +
identifier embedding) and a `naive` DreamBooth step. Prints each job's seconds and, per job kind, the ratio
of each setting's median time to the first setting's.
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import tempfile
import time

import torch

from benchmarks import harness
from benchmarks.continual import SEQUENCE, save_class_images
from benchmarks.harness import concept_images


def timed_job(setting, strategy: str, steps: int, seed: int, class_cache: str, threads: int,
              defaults: dict) -> float:
    """One job in a fresh process (torch's thread settings are per process): the main thread first serves
    a /generate, then the job runs."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(class_cache, os.path.join(tmp, "class_images"))
        svc = harness.service(tmp, train_threads=setting, finetune_defaults=defaults)
        svc.generate("bench", ["a red circle", "a blue striped painting of a star"], {"num_images": 4})
        images, _ = concept_images(SEQUENCE[0][2], 5, seed)
        params = {"category": "shape", "target_model": "meta", "metamodel_strategy": strategy, "seed": seed,
                  "max_train_steps": steps}
        t0 = time.perf_counter()
        svc.finetune("bench", images, params)
        seconds = time.perf_counter() - t0
        svc.close()
    return seconds


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the main (serving) thread")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--settings", nargs="+", default=["default", "1"])
    ap.add_argument("--class-images", type=int, default=None, help="class images per job (default: the model's)")
    a = harness.parse_args(ap, argv, smoke=dict(steps=3, repeats=1, settings=["1"], class_images=4))
    defaults = {"num_class_images": a.class_images} if a.class_images else {}
    settings = [None if s == "default" else int(s) for s in a.settings]
    with tempfile.TemporaryDirectory() as class_cache:
        with tempfile.TemporaryDirectory() as tmp:  # the serving thread's work: class images on the main thread
            svc = harness.service(tmp, finetune_defaults=defaults)
            save_class_images(svc, {"shape"}, class_cache)
            svc.close()
        times: dict[tuple[str, str], list[float]] = {}
        ctx = multiprocessing.get_context("spawn")
        for r in range(a.repeats):
            for strategy in ("adapters", "naive"):
                for setting in settings:
                    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                        s = pool.submit(timed_job, setting, strategy, a.steps, r, class_cache, a.threads,
                                                defaults).result()
                    times.setdefault((strategy, str(setting or "default")), []).append(s)
                    print(json.dumps({"repeat": r, "strategy": strategy, "train_threads": setting or "default",
                                      "seconds": round(s, 2)}), flush=True)
    print(f"\n{a.steps} steps, main thread {a.threads} threads, {os.cpu_count()} cores; median of {a.repeats}")
    names = [str(s or "default") for s in settings]
    for strategy in ("adapters", "naive"):
        ref = statistics.median(times[(strategy, names[0])])
        cells = ", ".join(f"{n}: {statistics.median(times[(strategy, n)]):.1f} s "
                          f"({statistics.median(times[(strategy, n)]) / ref:.2f}x)" for n in names)
        print(f"{strategy:9s} {cells}")
    return {f"{k[0]}/{k[1]}": statistics.median(v) for k, v in times.items()}


if __name__ == "__main__":
    main()
