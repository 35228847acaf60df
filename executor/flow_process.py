"""Run `jina flow --uses flow.yml` as a child process, as a user runs it (from the repository root, the flow file by
its relative path, BIG as installed), and stop it without leaving executors behind.

Used by the integration tests and the gRPC benchmark, and usable from a notebook or a script that wants the
service in a separate process. Stopping matters: `jina flow` shuts its executor processes down on SIGINT,
but on SIGTERM the main process exits and leaves them running (checked with jina 3.33.1), still holding
memory, CPU and the model. So `stop()` sends SIGINT and then kills whatever is left of the process group.
"""
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flow_file_on_port(flow_yml: str, port: int) -> str:
    """`flow_yml` (relative to the repository root) as `jina flow --uses` should be given it to serve on `port`:
    the file itself where it already names that port, else a copy beside it (`.<name>.port<port>.yml`, so
    relative `uses:` paths and Jina's search paths resolve as for the file) with only the port changed; where that
    folder is read-only (an image's /app), a copy in a temporary folder (relative `uses:` paths resolve from the
    repository root, the flow's working directory)."""
    text = open(os.path.join(REPO, flow_yml)).read()
    ports = re.findall(r"^  port: (\d+)$", text, flags=re.M)
    if len(ports) != 1:
        raise ValueError(f"{flow_yml} has no single `port:` line under `with:` to serve another port from")
    if int(ports[0]) == port:
        return flow_yml
    folder, name = os.path.split(flow_yml)
    text = text.replace(f"  port: {ports[0]}\n", f"  port: {port}\n", 1)
    copy_name = f".{os.path.splitext(name)[0]}.port{port}.yml"
    try:
        with open(os.path.join(REPO, folder, copy_name), "w") as f:
            f.write(text)
        return os.path.join(folder, copy_name)
    except PermissionError:
        copy = os.path.join(tempfile.mkdtemp(prefix="big-flow-"), copy_name)
        with open(copy, "w") as f:
            f.write(text)
        return copy


def child_env(env: Optional[Dict[str, str]]) -> Dict[str, str]:
    """This process's environment with `env` over it (no PYTHONPATH added: BIG is installed, as for a user)."""
    return {**os.environ, **(env or {})}


def log_tail(path: str, n: int) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


class FlowProcess:
    """`jina flow` in its own session (process group), with its output in a log file."""

    def __init__(self, workdir: str, env: Optional[Dict[str, str]] = None, port: Optional[int] = None,
                 log_to_file: bool = True, flow_yml: str = "flow.yml"):
        """`flow_yml` is relative to the repository root, where the flow runs, as a user runs it from there."""
        os.makedirs(workdir, exist_ok=True)
        self.port = port or free_port()
        self.log_path = os.path.join(workdir, "flow.log")
        self._given, self.flow_yml = flow_yml, flow_file_on_port(flow_yml, self.port)
        # A spawn start method set by a parent (our tests set it) is fine for jina; leave it to the caller.
        # The `jina` script beside this interpreter, as a user would type it; an interpreter without one
        # beside it (packages installed with --target or --user) runs the same CLI as `python -m jina`.
        script = os.path.join(os.path.dirname(sys.executable), "jina")
        jina = [script] if os.path.exists(script) else [sys.executable, "-m", "jina"]
        # A supervisor's flow writes to the supervisor's own output (a container's log), tests' to a file.
        self._log = open(self.log_path, "w") if log_to_file else None
        self.proc = subprocess.Popen([*jina, "flow", "--uses", self.flow_yml], cwd=REPO, env=child_env(env),
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
        if self.flow_yml != self._given:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(REPO, self.flow_yml))
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
        # As the docs print it: `python -m big.worker` from the repository root, config.yml by default.
        self.proc = subprocess.Popen([sys.executable, "-m", "big.worker", *args], cwd=REPO, env=child_env(env),
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

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
