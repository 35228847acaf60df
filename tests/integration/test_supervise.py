"""`python -m executor.supervise` as a container runs it, on `deploy/flow-serving.yml` (two serving replicas):
`kill -9` of one replica, which Jina's readiness probe does not notice (the other replica answers it), is followed
by the flow serving again with both replicas, with no person involved."""
import os
import signal
import subprocess
import sys
import time

import psutil
from docarray import DocList
from docarray.documents import ImageDoc, TextDoc
from jina import Client

from conftest import SECRET
from big.auth import mint_token
from executor.flow_process import REPO, free_port


def generates(client, token) -> bool:
    try:
        out = client.post("/generate", inputs=DocList[TextDoc]([TextDoc(text="a red star")]),
                          parameters={"jwt": {"token": token}, "num_inference_steps": 2}, return_type=DocList[ImageDoc])
        return len(out) == 1
    except Exception:  # noqa: BLE001 - not serving (yet)
        return False


def wait_serving(client, token, timeout: float) -> float:
    t0 = time.time()
    while not generates(client, token):
        assert time.time() - t0 < timeout, "not serving"
        time.sleep(0.5)
    return time.time() - t0


def healthy(port: int) -> bool:
    jina = os.path.join(os.path.dirname(sys.executable), "jina")
    return subprocess.run([jina, "ping", "flow", f"grpc://127.0.0.1:{port}", "--timeout", "3000"],
                          capture_output=True, timeout=60).returncode == 0


def replica_processes(supervisor: psutil.Process, registry: str) -> list[psutil.Process]:
    """The flow's executor replicas: the processes that hold the workspace's registry open."""
    out = []
    for p in supervisor.children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any(f.path == registry for f in p.open_files()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_a_killed_replica_is_restarted_without_a_person(tmp_path):
    port, ws = free_port(), str(tmp_path / "workspace")
    env = {**os.environ, "BIG_WORKSPACE": ws, "BIG_JWT_SECRET": SECRET, "BIG_AUTH_MODE": "hs256",
           "JINA_LOG_LEVEL": "ERROR"}
    with open(tmp_path / "supervise.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "executor.supervise", "--port", str(port), "--interval", "1",
                                 "--failures", "2", "--stop-grace", "3", "--flow", "deploy/flow-serving.yml"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client, token = Client(host=f"grpc://127.0.0.1:{port}"), mint_token("alice", SECRET)
        wait_serving(client, token, 300)
        assert healthy(port)  # the Dockerfiles' HEALTHCHECK command
        registry, supervisor = os.path.join(ws, "registry.sqlite"), psutil.Process(proc.pid)
        first = replica_processes(supervisor, registry)
        assert len(first) == 2
        killed = time.time()
        first[0].send_signal(signal.SIGKILL)
        while {p.pid for p in replica_processes(supervisor, registry)} & {p.pid for p in first}:
            assert time.time() - killed < 120, "the supervisor did not notice the dead replica"
            time.sleep(0.2)
        noticed = time.time() - killed
        wait_serving(client, token, 300)
        while len(replica_processes(supervisor, registry)) < 2:
            assert time.time() - killed < 300, "the flow did not come back with both replicas"
            time.sleep(0.5)
        print(f"kill -9 of one replica: the flow restarted {noticed:.1f} s later, serving again with both replicas "
              f"{time.time() - killed:.1f} s after the kill")
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        print(open(tmp_path / "supervise.log").read()[-2000:])
