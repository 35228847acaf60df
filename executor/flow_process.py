"""Run `jina flow --uses flow.yml` as a child process and stop it without leaving executors behind.

Used by the integration tests and the gRPC benchmark, and usable from a notebook or a script that wants the
service in a separate process. Stopping matters: `jina flow` shuts its executor processes down on SIGINT,
but on SIGTERM the main process exits and leaves them running (checked with jina 3.33.1), still holding
memory, CPU and the model. So `stop()` sends SIGINT and then kills whatever is left of the process group.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flow_yaml_on_port(port: int, flow_yml: str = os.path.join(REPO, "flow.yml")) -> str:
    """The repo's flow.yml with another gRPC port and an absolute `uses:` path, as YAML text."""
    text = open(flow_yml).read()
    if "port: 51000" not in text or "uses: config.yml" not in text:
        raise ValueError(f"{flow_yml} no longer has 'port: 51000' and 'uses: config.yml' to rewrite")
    return text.replace("port: 51000", f"port: {port}").replace(
        "uses: config.yml", f"uses: {os.path.join(REPO, 'config.yml')}")


def child_env(env: Optional[Dict[str, str]]) -> Dict[str, str]:
    """This process's environment with `env` over it; the child imports config.yml's py_modules, executor/ and
    big/ from the repo, wherever it was started."""
    full = {**os.environ, **(env or {})}
    full["PYTHONPATH"] = REPO + os.pathsep + full.get("PYTHONPATH", "")
    return full


def log_tail(path: str, n: int) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


class FlowProcess:
    """`jina flow` in its own session (process group), with its output in a log file."""

    def __init__(self, workdir: str, env: Optional[Dict[str, str]] = None, port: Optional[int] = None,
                 log_to_file: bool = True, flow_yml: str = os.path.join(REPO, "flow.yml")):
        os.makedirs(workdir, exist_ok=True)
        self.port = port or free_port()
        self.log_path = os.path.join(workdir, "flow.log")
        text = flow_yaml_on_port(self.port, flow_yml)
        flow_yml = os.path.join(workdir, "flow.yml")
        with open(flow_yml, "w") as f:
            f.write(text)
        full_env = child_env(env)
        # A spawn start method set by a parent (our tests set it) is fine for jina; leave it to the caller.
        # The `jina` script beside this interpreter, as a user would type it; an interpreter without one
        # beside it (packages installed with --target or --user) runs the same CLI as `python -m jina`.
        script = os.path.join(os.path.dirname(sys.executable), "jina")
        jina = [script] if os.path.exists(script) else [sys.executable, "-m", "jina"]
        # A supervisor's flow writes to the supervisor's own output (a container's log), tests' to a file.
        self._log = open(self.log_path, "w") if log_to_file else None
        self.proc = subprocess.Popen([*jina, "flow", "--uses", flow_yml], cwd=REPO, env=full_env,
                                     stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
                                     start_new_session=True)

    @property
    def host(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 3000) -> str:
        if self._log is None:
            return "(the flow's output is the supervisor's)"
        return log_tail(self.log_path, n)

    def wait_ready(self, timeout: float = 300.0):
        from jina import Client

        client = Client(host=self.host)
        deadline = time.time() + timeout
        # Wait for the port first: jina's readiness probe logs an error for every refused connection.
        while not self._port_open() or not client.is_flow_ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"jina flow exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.time() > deadline:
                self.stop()
                raise TimeoutError(f"jina flow not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)
        return client

    def _port_open(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def kill(self) -> None:
        """kill -9 of the flow's every process (gateway, executor): a replica that dies without a word."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def stop(self, grace: float = 20.0):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # executors the main process did not take down
        except ProcessLookupError:
            pass
        self.proc.wait()
        if self._log:
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class WorkerProcess:
    """`python -m big.worker` (a training worker) as a child process, with its output in a log file."""

    def __init__(self, workdir: str, env: Optional[Dict[str, str]] = None, args: tuple = ()):
        os.makedirs(workdir, exist_ok=True)
        self.log_path = os.path.join(workdir, f"worker-{time.time_ns()}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "big.worker", "--config", os.path.join(REPO, "config.yml"),
                                      *args], cwd=REPO, env=child_env(env), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, n: int = 3000) -> str:
        return log_tail(self.log_path, n)

    def wait_ready(self, timeout: float = 300.0) -> "WorkerProcess":
        deadline = time.time() + timeout
        while "BIG worker ready" not in self.log_tail(100_000):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.time() > deadline:
                self.stop()
                raise TimeoutError(f"the worker was not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.3)
        return self

    def kill(self) -> None:
        """kill -9: no chance to say goodbye (its job's lease is what tells the others)."""
        self.proc.kill()
        self.proc.wait()

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
