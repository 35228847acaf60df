"""Does an existing durable queue fit BIG's jobs? The two checks that decided it (docs/scaling.md, "Why a table of
our own"), run against the libraries themselves in a venv of their own (they are not BIG's requirements):

    python3.11 -m venv /tmp/fit && /tmp/fit/bin/pip install dbos==3.4.0 procrastinate==3.10.0
    /tmp/fit/bin/python research/queue_fit.py

1. DBOS Transact on SQLite: two worker processes (executor ids A and B) on one partitioned queue; A takes a job
   and is killed with SIGKILL. Does B run the job? (BIG needs a dead GPU worker's job to move to a live one.)
2. Procrastinate: can it open the embedded default's database (SQLite, no server)?
Prints what happened, with times.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

WORKER = r'''
import os, sys, time
from dbos import DBOS, SetEnqueueOptions
db, executor, marks, enqueue = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
DBOS(config={"name": "fit", "system_database_url": db, "executor_id": executor, "run_admin_server": False})

@DBOS.step()
def train(seconds):
    with open(os.path.join(marks, f"{executor}-{time.time():.2f}"), "w"):
        pass
    time.sleep(seconds)

@DBOS.workflow()
def job(seconds):
    train(seconds)

DBOS.launch()
# One running job per partition (a model key) across every executor: the metamodel's single writer.
queue = DBOS.register_queue("training", partition_concurrency=1, polling_interval_sec=0.2)
if enqueue:
    with SetEnqueueOptions(queue_partition_key="meta"):
        queue.enqueue(job, 600)
print("ready", flush=True)
while True:
    time.sleep(1)
'''


def dbos_dead_worker(tmp: str, watch_s: float = 30.0) -> dict:
    script, marks = os.path.join(tmp, "worker.py"), os.path.join(tmp, "marks")
    os.makedirs(marks)
    with open(script, "w") as f:
        f.write(WORKER)
    db = f"sqlite:///{tmp}/dbos.sqlite"
    start = lambda executor, enqueue: subprocess.Popen(  # noqa: E731
        [sys.executable, script, db, executor, marks, "1" if enqueue else "0"], stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(tmp, f"{executor}.log"), "a"))
    a = start("A", True)
    deadline = time.time() + 120
    while not any(m.startswith("A-") for m in os.listdir(marks)):
        assert time.time() < deadline and a.poll() is None, open(os.path.join(tmp, "A.log")).read()[-2000:]
        time.sleep(0.2)
    b = start("B", False)
    time.sleep(5)  # B is up and polling the queue
    a.send_signal(signal.SIGKILL)
    a.wait()
    killed = time.time()
    while time.time() - killed < watch_s and not any(m.startswith("B-") for m in os.listdir(marks)):
        time.sleep(0.5)
    b_ran = any(m.startswith("B-") for m in os.listdir(marks))
    waited = time.time() - killed
    a2 = start("A", False)  # the dead executor's id comes back: its pending workflow is recovered
    deadline = time.time() + 120
    while len([m for m in os.listdir(marks) if m.startswith("A-")]) < 2 and time.time() < deadline:
        time.sleep(0.5)
    a_again = len([m for m in os.listdir(marks) if m.startswith("A-")]) >= 2
    for p in (a2, b):
        p.kill()
        p.wait()
    return {"live_worker_B_ran_the_job_within_s": waited if b_ran else None, "watched_s": round(waited, 1),
            "job_ran_again_when_executor_A_restarted": a_again}


def procrastinate_on_sqlite() -> str:
    import procrastinate

    connectors = sorted(n for n in dir(procrastinate) if n.endswith("Connector"))
    return f"connectors in procrastinate {procrastinate.__version__ if hasattr(procrastinate, '__version__') else ''}: " \
           + ", ".join(connectors)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        result = {"dbos": dbos_dead_worker(tmp), "procrastinate": procrastinate_on_sqlite()}
        for name in ("A", "B"):
            with open(os.path.join(tmp, f"{name}.log")) as f:
                result[f"dbos_{name}_log_tail"] = f.read()[-1500:]
    print(json.dumps(result, indent=1))
