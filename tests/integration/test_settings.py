"""Every documented setting reaches both roles: the serving Executor (built by Jina from a config file, as a flow
builds it) and the training worker (`python -m big.worker --config FILE`, a process). The settings come from the
tables of docs/configuration.md and docs/scaling.md (a new row is covered without editing this file): each row's
example is set in the file and, where the row names a variable, in the environment instead."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from big.config import ConfigError, ServiceConfig, build_service_config
from executor.flow_process import REPO

TABLES = ("docs/configuration.md", "docs/scaling.md")
# What a worker is whatever its file says: `python -m big.worker` runs jobs (documented in the role's row).
WORKER_OWN = {"role": "train"}


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    env: str | None
    example: object
    where: str


def documented() -> list[Setting]:
    """The rows of each page's `| setting (environment) | default | example | what |` table."""
    out = []
    for page in TABLES:
        lines = open(os.path.join(REPO, page)).read().splitlines()
        head = next(i for i, l in enumerate(lines) if l.startswith("| setting (environment) | default | example |"))
        for n, line in enumerate(lines[head + 2:], start=head + 3):
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            names = [t for t in re.findall(r"`([^`]+)`", cells[0]) if not t.startswith("BIG_")]
            env = re.findall(r"\(`(BIG_\w+)`\)", cells[0])
            examples = re.findall(r"`([^`]+)`", cells[2])
            assert len(examples) == len(names), f"{page}:{n}: one example per setting, got {cells[2]!r}"
            assert len(names) == 1 or not env, f"{page}:{n}: a row with a variable names one setting"
            for name, example in zip(names, examples):
                out.append(Setting(name, env[0] if env else None, yaml.safe_load(example), f"{page}:{n}"))
    return out


SETTINGS = documented()


def test_the_tables_cover_every_setting_and_agree():
    names = {s.name for s in SETTINGS}
    fields = {f.name for f in dataclasses.fields(ServiceConfig)}
    assert names == fields, f"documented but no setting: {names - fields}; a setting not documented: {fields - names}"
    for name in names:
        rows = {(s.env, json.dumps(s.example, sort_keys=True)) for s in SETTINGS if s.name == name}
        assert len(rows) == 1, f"{name}: the pages disagree: {rows}"
    from big.config import ENV_OVERRIDES

    assert {s.name: s.env for s in SETTINGS if s.env} == ENV_OVERRIDES


def expected(setting: Setting, role: str):
    """What the process's settings should say: the example, as `ServiceConfig.described()` shows it (limits in
    full, secrets as ***)."""
    if role == "worker" and setting.name in WORKER_OWN:
        return WORKER_OWN[setting.name]
    return build_service_config({setting.name: setting.example}, environ={}).described()[setting.name]


def config_file(folder, settings: dict) -> str:
    """A config.yml as a deployment writes one: the repository's with `with:` replaced."""
    text = yaml.safe_load(open(os.path.join(REPO, "config.yml")))
    text["with"] = settings
    path = os.path.join(folder, "config.yml")
    with open(path, "w") as f:
        yaml.safe_dump(text, f)
    return path


def start_worker(folder, config: str, env: dict) -> tuple[subprocess.Popen, str]:
    log = os.path.join(folder, f"worker-{time.time_ns()}.log")
    proc = subprocess.Popen([sys.executable, "-m", "big.worker", "--config", config], cwd=folder,
                            env={**os.environ, **env}, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, log


def worker_settings(proc: subprocess.Popen, log: str, timeout: float = 300) -> dict:
    """The settings the worker logged at start, once it is ready; then it is stopped as an operator stops it."""
    deadline = time.time() + timeout
    try:
        while "BIG worker ready" not in open(log).read():
            assert proc.poll() is None, f"the worker exited {proc.returncode}:\n{open(log).read()[-3000:]}"
            assert time.time() < deadline, open(log).read()[-3000:]
            time.sleep(0.3)
        line = next(l for l in open(log) if " ready: " in l and "; settings " in l)
        return json.loads(line.split("; settings ", 1)[1])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def executor_settings(config: str) -> dict:
    """The settings of the BIGExecutor that Jina builds from `config`, as a flow's executor is built."""
    from jina import Executor

    # serve_threads sets torch's threads for this whole process: tests/conftest.py gives the next test the suite's.
    executor = Executor.load_config(config)
    try:
        assert executor._generate_thread.window == executor.service.config.batch_window_s
        return executor.service.config.described()
    finally:
        executor.close()


def deployment(folder) -> str:
    """A deployment's folder: relative examples (a store, a SQLite file, models/) resolve in it."""
    os.makedirs(folder)
    os.symlink(os.path.join(REPO, "models"), os.path.join(folder, "models"))
    return str(folder)


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    for name in [s.env for s in SETTINGS if s.env] + ["BIG_AUTH_MODE", "BIG_JWT_SECRET"]:
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_each_documented_setting_reaches_the_service_and_the_worker(scratch, monkeypatch):
    by_file, by_env = deployment(scratch / "file"), deployment(scratch / "env")
    in_file = config_file(by_file, {s.name: s.example for s in SETTINGS})
    # The same examples from the environment, over a file that sets none of them.
    env = {s.env: (json.dumps(s.example) if isinstance(s.example, (dict, list)) else str(s.example))
           for s in SETTINGS if s.env}
    from_env = config_file(by_env, {})
    workers = [start_worker(by_file, in_file, {}), start_worker(by_env, from_env, env)]
    monkeypatch.chdir(by_file)
    served = executor_settings(in_file)
    with monkeypatch.context() as m:
        m.chdir(by_env)
        for k, v in env.items():
            m.setenv(k, v)
        served_env = executor_settings(from_env)
    trained, trained_env = (worker_settings(*w) for w in workers)
    missed = []
    for s in SETTINGS:
        for role, got in (("executor", served), ("worker", trained)):
            if got[s.name] != expected(s, role):
                missed.append(f"{s.where} {s.name} in config.yml -> {role}: {got[s.name]!r}")
        if s.env:
            for role, got in (("executor", served_env), ("worker", trained_env)):
                if got[s.name] != expected(s, role):
                    missed.append(f"{s.where} {s.name} from {s.env} -> {role}: {got[s.name]!r}")
    assert not missed, "\n".join(missed)
    print(f"\n{len({s.name for s in SETTINGS})} documented settings reached the Executor and the worker from "
          f"config.yml, {len(env)} from the environment")


def test_a_misspelt_setting_stops_both_roles_naming_it(scratch):
    scratch = deployment(scratch / "deployment")
    bad = config_file(scratch, {"job_pol_s": 1.0, "limits": {"max_imagess": 3}})
    with pytest.raises(ConfigError, match=r"unknown setting 'job_pol_s' \(did you mean 'job_poll_s'\?\)"):
        build_service_config(yaml.safe_load(open(bad))["with"])
    from jina import Executor

    with pytest.raises(Exception) as e:
        Executor.load_config(bad)
    assert "job_pol_s" in str(e.value) or "job_pol_s" in repr(e.value.__cause__)
    r = subprocess.run([sys.executable, "-m", "big.worker", "--config", bad], cwd=scratch, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "unknown setting 'job_pol_s'" in r.stderr, r.stderr[-2000:]
    wrong = config_file(scratch, {"job_poll_s": "often"})
    r = subprocess.run([sys.executable, "-m", "big.worker", "--config", wrong], cwd=scratch, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "setting 'job_poll_s' must be a number, not 'often'" in r.stderr, r.stderr[-2000:]
