"""BIG on several processes: training workers apart from serving replicas, over one registry and one store.

    python -m benchmarks.scale [--jobs 4] [--train-steps 60] [--clients 8] [--requests 5] [--steps 10]
                               [--images 2] [--lease 5] [--database-url auto] [--out reports/scale]

Three figures, each a ratio measured in this one run:
1. the wall time of `--jobs` private finetunes with two workers over one (each worker one torch thread);
2. /generate p50/p95 over gRPC under `--clients` concurrent clients while a job trains, over the same with no job:
   serving and training in one process (`role: all`, the embedded default); in two processes, the serving one on
   torch's default threads (every core); and in two processes with a core each (serve_threads = cores - 1, the
   worker's job on one thread);
3. the time from a worker's kill -9 to its job running again on the other worker, against the lease.
The database is PostgreSQL when one answers at 127.0.0.1:5432 (a database made for the run and dropped after),
else SQLite in the store; `--database-url` names another.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import threading
import time

from benchmarks import harness
from big.jobs import JobQueue
from big.storage.registry import Registry
from executor.flow_process import FlowProcess, WorkerProcess

LONG = 5000  # steps of a job that trains for as long as a measurement takes (cancelled after)


class Run:
    def __init__(self, a, tmp: str, url: str):
        self.a, self.tmp, self.url = a, tmp, url
        self.store = os.path.join(tmp, "store")
        self.env = {"BIG_WORKSPACE": self.store, "BIG_DATABASE_URL": url, "BIG_AUTH_MODE": "disabled",
                    "JINA_LOG_LEVEL": "ERROR"}
        # The submitting side, in this process: validates, stores the images and queues, as a replica does.
        self.svc = harness.service(self.store, role="serve", database_url=url)
        self.registry = Registry(url, root=self.store)
        self.queue = JobQueue(self.registry, poll_s=0.1)

    def worker(self) -> WorkerProcess:
        return WorkerProcess(os.path.join(self.tmp, "workers"), env=self.env,
                             args=("--threads", "1", "--lease", str(self.a.lease))).wait_ready()

    def submit(self, user: str, steps: int, seed: int = 0) -> str:
        params = {"category": "shape", "max_train_steps": steps, "num_class_images": 4, "wait": False}
        return self.svc.submit_finetune(user, harness.instance_images(seed=seed), params)[0]

    def wait_running(self, job_id: str) -> dict:
        while (job := self.registry.get_job(job_id))["status"] != "running" or job["step"] < 1:
            assert job["status"] in ("queued", "running"), job
            time.sleep(0.1)
        return job

    def cancel(self, job_id: str) -> None:
        self.queue.cancel(job_id)
        self.queue.wait(job_id, timeout=120)

    def close(self):
        self.svc.close()
        self.registry.close()


def finetunes(run: Run, workers: int) -> float:
    t0 = time.perf_counter()
    ids = [run.submit(f"w{workers}-user{i}", run.a.train_steps, seed=i) for i in range(run.a.jobs)]
    for job_id in ids:
        assert run.queue.wait(job_id)["status"] == "succeeded", run.registry.get_job(job_id)
    return time.perf_counter() - t0


def latencies(port: int, a) -> dict:
    from docarray import DocList
    from docarray.documents import ImageDoc, TextDoc
    from jina import Client

    params = {"num_images": a.images, "num_inference_steps": a.steps, "seed": 0}
    out, lock = [], threading.Lock()

    def client(i):
        c = Client(host=f"grpc://127.0.0.1:{port}")
        for r in range(a.requests):
            t0 = time.perf_counter()
            c.post("/generate", inputs=DocList[TextDoc]([TextDoc(text=f"a red star {i} {r}")]), parameters=params,
                   return_type=DocList[ImageDoc])
            with lock:
                out.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.sort()
    return {"p50_s": round(statistics.median(out), 3), "p95_s": round(out[min(len(out) - 1, int(0.95 * len(out)))], 3),
            "served": len(out)}


def idle_and_training(run: Run, port: int, user: str) -> dict:
    """Latencies with no job, then while one trains; the ratios busy over idle."""
    idle = latencies(port, run.a)
    job = run.submit(user, LONG)
    run.wait_running(job)
    busy = latencies(port, run.a)
    trained = run.registry.get_job(job)["step"]
    run.cancel(job)
    return {"idle": idle, "training": busy, "p50_ratio": round(busy["p50_s"] / idle["p50_s"], 2),
            "p95_ratio": round(busy["p95_s"] / idle["p95_s"], 2), "job_steps_meanwhile": trained}


def kill_to_rerun(run: Run, workers: list[WorkerProcess]) -> dict:
    job = run.submit("killed", LONG)
    holder = run.wait_running(job)["worker"]
    victim = next(w for w in workers if f":{w.proc.pid}:" in holder)
    victim.kill()
    t0 = time.perf_counter()
    while (row := run.registry.get_job(job))["status"] != "running" or row["worker"] == holder:
        time.sleep(0.05)
    rerun_s = time.perf_counter() - t0
    run.cancel(job)
    workers.remove(victim)
    return {"kill_to_running_again_s": round(rerun_s, 2), "lease_s": run.a.lease,
            "within_lease_plus_5s": rerun_s <= run.a.lease + 5}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=5, help="/generate calls per client, one after another")
    ap.add_argument("--steps", type=int, default=10, help="inference steps of each /generate")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--lease", type=float, default=5.0)
    ap.add_argument("--database-url", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="reports/scale")
    a = harness.parse_args(ap, argv, smoke=dict(jobs=2, train_steps=2, clients=2, requests=1, steps=2, images=1,
                                                lease=2.0))
    report = {k: getattr(a, k) for k in ("jobs", "train_steps", "clients", "requests", "steps", "images", "lease",
                                          "preset")}
    report["cpus"] = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        url = a.database_url
        if url == "auto":
            url = (stack.enter_context(harness.scratch_postgres("big_scale"))
                   or f"sqlite:///{tmp}/store/registry.sqlite")
        run = Run(a, tmp, url)
        report["database"] = run.registry.backend
        workers, flows = [], []
        try:
            run.svc.prior_class_images("shape", 4)  # made once, shared: no run pays for them
            workers.append(run.worker())
            one = finetunes(run, 1)
            workers.append(run.worker())
            two = finetunes(run, 2)
            report["finetunes"] = {"one_worker_s": round(one, 2), "two_workers_s": round(two, 2),
                                   "two_over_one": round(two / one, 2)}
            print("finetunes", report["finetunes"], flush=True)

            report["worker_kill"] = kill_to_rerun(run, workers)
            print("worker kill", report["worker_kill"], flush=True)

            cores = os.cpu_count() or 1
            configs = [("separate_processes", None), ("separate_processes_own_cores", max(cores - 1, 1))]
            for name, threads in configs[a.preset == "smoke":]:  # the smoke run skips the slow trap
                env = {**run.env, "BIG_ROLE": "serve", **({"BIG_SERVE_THREADS": str(threads)} if threads else {})}
                serving = FlowProcess(os.path.join(tmp, name), env=env)
                flows.append(serving)
                serving.wait_ready()
                report[name] = {"serve_threads": threads or "torch default", "worker_threads": 1,
                                **idle_and_training(run, serving.port, name)}
                print(name, report[name], flush=True)
                serving.stop()
                flows.remove(serving)
            for p in workers + flows:
                p.stop()
            workers, flows = [], []

            together = FlowProcess(os.path.join(tmp, "all"), env={**run.env, "BIG_ROLE": "all"})
            flows.append(together)
            together.wait_ready()
            report["one_process"] = idle_and_training(run, together.port, "together")
            print("one process", report["one_process"], flush=True)
        finally:
            for p in workers + flows:
                p.stop()
            run.close()
    harness.write_report(a.out, "scale", report)
    f = report["finetunes"]
    print(f"{a.jobs} finetunes: two workers {f['two_over_one']}x the wall time of one; /generate p50 while a job "
          f"trains over idle: one process {report['one_process']['p50_ratio']}x, separate processes "
          f"{report.get('separate_processes', {}).get('p50_ratio')}x"
          + f", separate processes with a core each {report['separate_processes_own_cores']['p50_ratio']}x"
          + f"; worker kill to its job running again {report['worker_kill']['kill_to_running_again_s']} s "
            f"(lease {a.lease} s)")
    return report


if __name__ == "__main__":
    main()
