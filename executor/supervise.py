"""Keep a flow serving without a person: run `jina flow --uses flow.yml`, probe it every `--interval` seconds with
Jina's own readiness check (the gateway and the executor behind it), and when `--failures` probes in a row fail
(an executor killed or hung, the flow gone), or any of its processes has died (one of several serving replicas,
which the probe would not notice), stop what is left of it and start it again.

    python -m executor.supervise [--port 51000] [--interval 5] [--failures 3]

The Dockerfiles run this. A restart recovers state as any start does: versions stay as committed, queued jobs wait
in the registry, and a job that was running is run again once its lease has passed. SIGINT or SIGTERM stops the
flow and exits.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import tempfile
import threading
import time

import psutil

from executor.flow_process import REPO, FlowProcess

log = logging.getLogger("big.supervise")


def supervise(port: int, interval: float, failures: int, stop_grace: float, ready_timeout: float,
              stop: threading.Event, flow_yml: str = "flow.yml") -> None:
    workdir = tempfile.mkdtemp(prefix="big-supervise-")
    restarts = 0
    while not stop.is_set():
        started = time.time()
        flow = FlowProcess(workdir, port=port, log_to_file=False, flow_yml=flow_yml)
        try:
            client = flow.wait_ready(timeout=ready_timeout)
        except (RuntimeError, TimeoutError) as e:
            log.error("the flow did not start (%s); trying again", str(e)[:300])
            flow.stop(grace=stop_grace)
            stop.wait(interval)
            continue
        log.warning("serving on port %d (start %d, ready in %.1f s)", port, restarts, time.time() - started)
        processes = _processes(flow.proc.pid)  # its gateway and every executor replica
        missed = 0
        while not stop.wait(interval):
            dead = [p.pid for p in processes if not _alive(p)]
            if dead:
                # One of several replicas: the others still answer the probe, so the flow would serve on with
                # fewer replicas until a person noticed. Jina cannot start one replica of a running flow again.
                log.error("process %s of the flow died: restarting the flow", dead)
                break
            healthy = flow.proc.poll() is None and _ready(client)
            missed = 0 if healthy else missed + 1
            if missed >= failures:
                log.error("the flow failed %d probes in a row: restarting it", missed)
                break
        # A flow whose executor died ignores SIGINT for a minute: a short grace, then its process group is killed.
        flow.stop(grace=stop_grace)
        restarts += 1


def _processes(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if _alive(p)]
    except psutil.Error:
        return []


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _ready(client) -> bool:
    try:
        return bool(client.is_flow_ready(timeout=2.0))
    except Exception:  # noqa: BLE001 - any failure to answer is a failed probe
        return False


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=int(os.environ.get("BIG_PORT", 51000)))
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between probes")
    ap.add_argument("--failures", type=int, default=3, help="failed probes in a row that restart the flow")
    ap.add_argument("--stop-grace", type=float, default=5.0, help="seconds a stopping flow gets before SIGKILL")
    ap.add_argument("--ready-timeout", type=float, default=600.0, help="seconds a (re)starting flow may take")
    ap.add_argument("--flow", default=os.path.join(REPO, "flow.yml"),
                    help="the flow file (deploy/flow-serving.yml: serving replicas for separate workers)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # The flow runs from the repository root, as a user runs it there; --flow is relative to where it was typed.
    supervise(a.port, a.interval, a.failures, a.stop_grace, a.ready_timeout, stop,
              os.path.relpath(os.path.abspath(a.flow), REPO))


if __name__ == "__main__":
    main()
