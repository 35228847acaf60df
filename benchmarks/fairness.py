"""Fair shares of generation: a flooding user (8 threads, each sending /generate after /generate) and a polite one
(one request at a time), through the serving thread's scheduler, fair (big/scheduling.py) against first come first
served (the same thread, every call as one user's), in one run; the service in-process, as the Executor calls it.

    python -m benchmarks.fairness [--flood-threads 8] [--polite 20] [--think 2] [--steps 10] [--images 2]

The polite user sends its requests in two ways: back to back (it always has one request in, so a fair thread is
half its: each of its requests then takes two requests' time by arithmetic), and pausing `--think` times one
request's time after each answer, as a person looks at an image (it uses less of the thread than the flood).
Prints and writes the polite user's p50/p95 latency over the time of one request alone, measured just before each
scenario (the goal: p95 within 2x).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

from benchmarks import harness
from big.scheduling import FairScheduler


class FirstComeFirstServed:
    """The reference: the same thread, calls in arrival order whoever sent them (every call as one user's)."""

    def __init__(self, scheduler: FairScheduler):
        self.scheduler = scheduler

    def submit(self, user, fn, *args):
        return self.scheduler.submit("everyone", fn, *args)


def run(svc, scheduler, a, think_s: float, tag: str) -> dict:
    """One scenario; its users' names are its own, so no scenario inherits another's service on the thread."""
    params = {"num_images": a.images, "num_inference_steps": a.steps, "seed": 0}
    call = lambda user, p: scheduler.submit(user, svc.generate, user, [p], params).result()  # noqa: E731
    stop = threading.Event()
    served = {"flood": 0}

    def flood(i):
        while not stop.is_set():
            call(f"flood-{tag}", f"a red star {i}")
            served["flood"] += 1

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(a.flood_threads)]
    for t in threads:
        t.start()
    t_start = time.perf_counter()
    time.sleep(0.5)  # the flood's queue fills first
    latencies = []
    for i in range(a.polite):
        t0 = time.perf_counter()
        call(f"polite-{tag}", f"a blue circle {i}")
        latencies.append(time.perf_counter() - t0)
        time.sleep(think_s)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    in_order = [round(x, 3) for x in latencies]
    latencies.sort()
    return {"mean_call_s": round(wall / (served["flood"] + len(latencies)), 3),
            "polite_p50_s": round(statistics.median(latencies), 3),
            "polite_p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
            "flood_served": served["flood"], "polite_served": len(latencies), "polite_latencies_s": in_order}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flood-threads", type=int, default=8)
    ap.add_argument("--polite", type=int, default=20, help="the polite user's requests, one at a time")
    ap.add_argument("--think", type=float, default=2.0,
                    help="the pausing polite user's pause after each answer, in times one request alone")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="reports/fairness")
    a = harness.parse_args(ap, argv, smoke=dict(flood_threads=2, polite=2, steps=2, images=1))
    report = {"flood_threads": a.flood_threads, "polite": a.polite, "think": a.think, "steps": a.steps,
              "images": a.images, "threads": a.threads, "preset": a.preset}
    # One serving thread loads the model and makes every image, as in the Executor (torch's CPU threads belong to
    # the thread that calls it); both policies run on it.
    sched = FairScheduler(max_queued=64)
    with tempfile.TemporaryDirectory() as tmp:
        svc = sched.submit("", harness.service, tmp).result()
        params = {"num_images": a.images, "num_inference_steps": a.steps, "seed": 0}
        sched.submit("warm-up", svc.generate, "warm-up", ["a red star"], params).result()
        for polite in ("back_to_back", "pausing"):
            for name, scheduler in (("first_come_first_served", FirstComeFirstServed(sched)), ("fair", sched)):
                tag = f"{name}/{polite}"
                # The reference, measured just before its scenario: the machine's speed drifts over a run.
                alone = harness.median_seconds(lambda: sched.submit(
                    f"alone-{tag}", svc.generate, f"alone-{tag}", ["a blue circle"], params).result(), 7)
                r = run(svc, scheduler, a, 0.0 if polite == "back_to_back" else a.think * alone, tag)
                r["one_request_alone_s"] = round(alone, 3)
                r["polite_p95_over_alone"] = round(r["polite_p95_s"] / alone, 2)
                report[tag] = r
                print(tag, r, flush=True)
        svc.close()
    sched.close()
    harness.write_report(a.out, "fairness", report)
    ratio = lambda tag: f"{report[tag]['polite_p95_over_alone']}x"  # noqa: E731
    print(f"polite p95 over one request alone, first come first served -> fair: back to back "
          f"{ratio('first_come_first_served/back_to_back')} -> {ratio('fair/back_to_back')}; pausing {a.think:g} "
          f"requests' time {ratio('first_come_first_served/pausing')} -> {ratio('fair/pausing')}")
    return report


if __name__ == "__main__":
    main()
