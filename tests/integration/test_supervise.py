"""`python -m executor.supervise` as a container runs it: `kill -9` of the executor is followed by a working
service again, with no person involved."""
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


def executor_process(supervisor: psutil.Process, registry: str) -> psutil.Process:
    """The flow's executor: the process that holds the workspace's registry open."""
    for p in supervisor.children(recursive=True):
        try:
            if any(f.path == registry for f in p.open_files()):
                return p
        except psutil.Error:
            continue
    raise AssertionError("no executor process holds the registry")


def test_a_killed_executor_is_restarted_without_a_person(tmp_path):
    port, ws = free_port(), str(tmp_path / "workspace")
    env = {**os.environ, "BIG_WORKSPACE": ws, "BIG_JWT_SECRET": SECRET, "BIG_AUTH_MODE": "hs256",
           "JINA_LOG_LEVEL": "ERROR"}
    with open(tmp_path / "supervise.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "executor.supervise", "--port", str(port), "--interval", "1",
                                 "--failures", "2", "--stop-grace", "3"], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client, token = Client(host=f"grpc://127.0.0.1:{port}"), mint_token("alice", SECRET)
        wait_serving(client, token, 240)
        assert healthy(port)  # the Dockerfiles' HEALTHCHECK command
        executor = executor_process(psutil.Process(proc.pid), os.path.join(ws, "registry.sqlite"))
        executor.send_signal(signal.SIGKILL)
        assert not generates(client, token) and not healthy(port)
        recovered = wait_serving(client, token, 240)
        print(f"serving again {recovered:.1f} s after kill -9 of the executor")
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        print(open(tmp_path / "supervise.log").read()[-2000:])
