"""Batched serving: 8 clients sending /generate at once, served one request per pipeline call against concurrent
requests of one model route gathered into shared calls (big/scheduling.py, Generator.generate_many), on one
serving thread in one run; and a lone request's latency with and without the gathering window.

    python -m benchmarks.batching [--clients 8] [--requests 5] [--images 2] [--steps 10] [--threads 2]
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time

from benchmarks import harness
from big.scheduling import FairScheduler


def flood(sched, svc, a, batched: bool) -> float:
    """Images per second while `clients` threads each send `requests` requests, one after another."""
    def client(i):
        for k in range(a.requests):
            user, prompts = f"user{i}", [f"a red star {i} {k}"]
            params = {"num_images": a.images, "num_inference_steps": a.steps, "seed": 100 * i + k}
            batch = (svc.generator.batch_key(user, prompts, params), svc.generate_many) if batched else None
            sched.submit(user, svc.generate, user, prompts, params, batch=batch).result()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return a.clients * a.requests * a.images / (time.perf_counter() - t0)


def lone_latency(sched, svc, a, batched: bool) -> dict:
    times = []
    for k in range(a.lone):
        params = {"num_images": a.images, "num_inference_steps": a.steps, "seed": k}
        batch = (svc.generator.batch_key("lone", ["a blue circle"], params), svc.generate_many) if batched else None
        t0 = time.perf_counter()
        sched.submit("lone", svc.generate, "lone", ["a blue circle"], params, batch=batch).result()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"p50": round(times[len(times) // 2], 3), "p95": round(times[min(len(times) - 1, int(0.95 * len(times)))], 3)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=5, help="requests per client, one after another")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lone", type=int, default=20, help="lone requests timed for the window's cost")
    ap.add_argument("--window", type=float, default=0.005)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base-model", default="embedded", help="a diffusers folder (e.g. gpu.py --save-pipeline)")
    ap.add_argument("--out", default="reports/batching")
    a = harness.parse_args(ap, argv, smoke=dict(clients=2, requests=1, images=1, steps=2, lone=2))
    sched = FairScheduler(max_queued=64, window=a.window)
    report = {k: getattr(a, k) for k in ("clients", "requests", "images", "steps", "window", "threads", "preset",
                                         "base_model")}
    with tempfile.TemporaryDirectory() as tmp:
        svc = sched.submit("", lambda: harness.service(tmp, base_model=a.base_model)).result()
        flood(sched, svc, a, batched=False)  # warm-up
        # Alternating, so that drift in the machine's speed hits both alike.
        plain, batched = [], []
        for _ in range(2):
            plain.append(flood(sched, svc, a, batched=False))
            batched.append(flood(sched, svc, a, batched=True))
        report["images_per_s"] = {"one_request_per_call": round(max(plain), 2), "batched": round(max(batched), 2)}
        report["throughput_ratio"] = round(max(batched) / max(plain), 2)
        # Alternating too; a batchable lone request parses its key and waits the window.
        lone = {"plain": [], "batchable": []}
        for _ in range(2):
            lone["plain"].append(lone_latency(sched, svc, a, False))
            lone["batchable"].append(lone_latency(sched, svc, a, True))
        report["lone_latency_s"] = {k: {q: min(r[q] for r in v) for q in ("p50", "p95")} for k, v in lone.items()}
        svc.close()
    sched.close()
    harness.write_report(a.out, "batching", report)
    print(report)
    return report


if __name__ == "__main__":
    main()
