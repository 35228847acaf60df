"""BIG on several processes as a cluster runs it: two serving replicas (`jina flow`, role serve) and two training
workers (`python -m big.worker`) over one registry and one store folder, on PostgreSQL and on SQLite. Killed
with `kill -9`, they lose no job and leave no half-written version; a replica killed while a client waits for its
finetune leaves one job, and the client gets its concept."""
import collections
import os
import signal
import threading
import time

import psutil
import pytest
import sqlalchemy as sa
from docarray import DocList
from docarray.documents import TextDoc

from conftest import BASE_MODEL, SECRET, instance_images, pngs, postgres_database
from big.auth import mint_token
from big.storage.registry import Registry
from executor.documents import ConceptDoc, GeneratedImageDoc, JobDoc
from executor.flow_process import FlowProcess, WorkerProcess

LEASE_S = 4
FAST = {"category": "shape", "target_model": "meta", "max_train_steps": 8, "num_class_images": 4}


class Cluster:
    def __init__(self, tmp, url: str):
        self.tmp, self.url, self.ws = tmp, url, str(tmp / "store")
        self.env = {"BIG_BASE_MODEL": BASE_MODEL, "BIG_WORKSPACE": self.ws, "BIG_DATABASE_URL": url,
                    "BIG_JWT_SECRET": SECRET, "BIG_AUTH_MODE": "hs256", "JINA_LOG_LEVEL": "ERROR"}
        self.replicas: list[FlowProcess] = []
        self.workers: list[WorkerProcess] = []
        self.registry = None

    def add_replica(self, flow_yml: str | None = None) -> FlowProcess:
        """A serving replica: flow.yml with BIG_ROLE=serve, or a flow file that sets the role itself."""
        env = {**self.env, **({} if flow_yml else {"BIG_ROLE": "serve"})}
        replica = FlowProcess(str(self.tmp / f"replica{len(self.replicas)}"), env=env,
                              **({"flow_yml": flow_yml} if flow_yml else {}))
        self.replicas.append(replica)
        return replica

    def add_worker(self) -> WorkerProcess:
        worker = WorkerProcess(str(self.tmp / "workers"), env=self.env, args=("--threads", "1", "--lease", str(LEASE_S)))
        self.workers.append(worker)
        return worker

    def client(self, i: int):
        return self.replicas[i].wait_ready(timeout=240)

    def stop(self):
        for p in self.replicas + self.workers:
            try:
                p.stop()
            except Exception:  # noqa: BLE001 - already killed
                pass
        if self.registry is not None:
            self.registry.close()


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def cluster(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"cluster-{request.param}")
    if request.param == "postgresql":
        url = request.getfixturevalue("cluster_database")
    else:
        url = f"sqlite:///{tmp / 'store' / 'registry.sqlite'}"
    c = Cluster(tmp, url)
    try:
        c.add_replica(), c.add_replica(), c.add_worker(), c.add_worker()
        for w in c.workers:
            w.wait_ready(timeout=240)
        for i in range(2):
            c.client(i)
        c.registry = Registry(url, root=c.ws)
        yield c
    except (RuntimeError, TimeoutError) as e:
        pytest.fail(f"the cluster did not start: {e}")
    finally:
        c.stop()


@pytest.fixture(scope="module")
def cluster_database():
    yield from postgres_database("big_cluster")


def jwt(user):
    return {"jwt": {"token": mint_token(user, SECRET)}}


def finetune(client, user, seed, **params):
    return client.post("/finetune", inputs=pngs(instance_images(seed=seed)),
                       parameters={**jwt(user), **FAST, **params}, return_type=DocList[ConceptDoc])[0]


def generate(client, user, text):
    return client.post("/generate", inputs=DocList[TextDoc]([TextDoc(text=text)]), parameters={
        **jwt(user), "target_model": "meta", "num_inference_steps": 2, "seed": 1},
        return_type=DocList[GeneratedImageDoc])[0]


def jobs_of(client, user):
    return sorted((j.text, j.status) for j in client.post("/jobs", inputs=DocList[TextDoc](),
                                                         parameters=jwt(user), return_type=DocList[JobDoc]))


def wait_job(client, user, job_id, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.post("/jobs", inputs=DocList[TextDoc](), parameters={**jwt(user), "job_id": job_id},
                          return_type=DocList[JobDoc])[0]
        if job.status not in ("queued", "running"):
            return job
        time.sleep(0.5)
    raise TimeoutError(job_id)


def assert_nothing_half_written(c: Cluster):
    live = c.registry.live_version_paths()
    models = os.path.join(c.ws, "models")
    on_disk = {os.path.join(models, m, v) for m in os.listdir(models) for v in os.listdir(os.path.join(models, m))}
    assert on_disk == live, on_disk ^ live
    assert os.listdir(os.path.join(c.ws, "tmp")) == []
    active = {j["job_id"] for j in c.registry.running_jobs()}
    assert len(os.listdir(os.path.join(c.ws, "jobs"))) == len(active)


def test_four_users_teach_the_metamodel_at_once_on_two_replicas(cluster):
    clients = [cluster.client(0), cluster.client(1)]
    results, errors = {}, []

    def teach(i):
        try:
            results[i] = finetune(clients[i % 2], f"user{i}", seed=10 + i)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=teach, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(r.model_version for r in results.values()) == [1, 2, 3, 4]
    concepts = [c for c in clients[1].post("/concepts", inputs=DocList[TextDoc](), parameters=jwt("user0"),
                                           return_type=DocList[ConceptDoc]) if c.target_model == "meta"]
    assert sorted(c.text for c in concepts) == sorted(r.text for r in results.values())
    for i, r in results.items():  # every concept is served, by either replica, from the newest version
        img = generate(clients[(i + 1) % 2], f"user{i}", f"a {r.text} shape")
        assert img.model_version == 4
    assert cluster.registry.get_model("meta")["current_version"] == 4
    assert_nothing_half_written(cluster)


def test_a_killed_worker_s_job_is_finished_by_the_other_and_the_old_version_serves_meanwhile(cluster):
    client = cluster.client(0)
    before = cluster.registry.get_model("meta")["current_version"]
    job_id = finetune(client, "killer", seed=30, max_train_steps=60, wait=False).job_id
    deadline = time.time() + 120
    while (job := cluster.registry.get_job(job_id))["step"] < 2:
        assert time.time() < deadline and job["status"] in ("queued", "running"), job
        time.sleep(0.2)
    victim = next(w for w in cluster.workers if f":{w.proc.pid}:" in job["worker"])
    served, stop = [], threading.Event()

    def keep_generating():
        while not stop.is_set():
            served.append(generate(cluster.client(1), "watcher", "a red star").model_version)

    watcher = threading.Thread(target=keep_generating)
    watcher.start()
    victim.kill()
    killed_at = time.time()
    try:
        while (job := cluster.registry.get_job(job_id))["worker"] is None or f":{victim.proc.pid}:" in job["worker"]:
            assert time.time() - killed_at < LEASE_S + 30, job
            time.sleep(0.2)
        ended = wait_job(client, "killer", job_id)
    finally:
        stop.set()
        watcher.join()
    assert ended.status == "succeeded" and ended.model_version == before + 1
    assert cluster.registry.get_job(job_id)["attempts"] == 2
    # The previous version served the whole time, then the new one: never an error, never a gap.
    assert served and set(served) <= {before, before + 1} and served == sorted(served)
    assert_nothing_half_written(cluster)
    cluster.workers.remove(victim)
    cluster.add_worker().wait_ready(timeout=240)


def test_a_replica_started_later_touches_no_job_and_every_replica_answers_the_same(cluster):
    client = cluster.client(0)
    job_id = finetune(client, "later", seed=40, max_train_steps=60, wait=False).job_id
    while cluster.registry.get_job(job_id)["status"] == "queued":
        time.sleep(0.2)
    cluster.add_replica("deploy/flow-serving.yml")  # as deploy/ runs it: 2 executor replicas
    third = cluster.client(2)
    assert cluster.registry.get_job(job_id)["status"] in ("running", "succeeded")  # not failed by the newcomer
    assert wait_job(third, "later", job_id).status == "succeeded"
    views = [jobs_of(cluster.client(i), "later") for i in range(3)]
    assert views[0] == views[1] == views[2] and (job_id, "succeeded") in views[0]


def test_a_killed_replica_leaves_the_queue_intact_and_the_other_serving(cluster):
    doomed, other = cluster.client(0), cluster.client(1)
    queued = [finetune(doomed, "queuer", seed=50 + i, wait=False).job_id for i in range(2)]
    endless = finetune(doomed, "queuer", seed=52, max_train_steps=5000, wait=False).job_id
    cluster.replicas[0].kill()
    assert generate(other, "queuer", "a red star").model_version >= 1
    assert {j for j, _ in jobs_of(other, "queuer")} == {*queued, endless}
    for job_id in queued:
        assert wait_job(other, "queuer", job_id).status == "succeeded"
    # Cancelled through another replica than the one that queued it, wherever it stands.
    other.post("/jobs", inputs=DocList[TextDoc](), parameters={**jwt("queuer"), "job_id": endless, "cancel": True},
               return_type=DocList[JobDoc])
    assert wait_job(other, "queuer", endless).status == "cancelled"
    assert_nothing_half_written(cluster)


def waiting_executor(cluster: Cluster, flow: FlowProcess) -> int:
    """The pid of `flow`'s executor replica that is polling the registry (a `wait: true` call's, five times a
    second; the flow's other replica is idle), read off PostgreSQL's pg_stat_activity, where each BIG process names
    its connections by host and pid (every registry call ends with COMMIT, so the query text tells nothing)."""
    ours = {p.pid for p in psutil.Process(flow.proc.pid).children(recursive=True)}
    seen = collections.Counter()
    for _ in range(10):
        with cluster.registry.engine.connect() as conn:
            names = conn.execute(sa.text(
                "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name LIKE 'big %' AND query_start > now() - interval '1 second'")).scalars().all()
        seen.update(pid for pid in {int(n.rsplit(":", 1)[1]) for n in names} if pid in ours)
        time.sleep(0.3)
    if not seen:
        with cluster.registry.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT application_name, state, query_start, now(), left(query, 90) FROM "
                                        "pg_stat_activity WHERE datname = current_database()")).all()
        raise AssertionError(f"no executor replica of the flow ({sorted(ours)}) is polling the job: {rows}")
    (pid, looks), = seen.most_common(1)
    assert looks >= 7, seen
    return pid


def test_a_replica_killed_while_a_client_waits_leaves_one_job_and_the_client_gets_its_concept(cluster):
    """Jina's gateway sends the call again to the flow's other executor replica, with the same request id, which
    BIG's gateway gives the call as its idempotency key: the retry finds the job the dead replica queued and waits
    for it (one job, one concept, the client's own)."""
    if cluster.registry.backend != "postgresql":
        pytest.skip("which replica waits is read off PostgreSQL's pg_stat_activity; SQLite has none")
    if len(cluster.replicas) < 3:  # run alone: the flow of two executor replicas, as deploy/ runs it
        cluster.add_replica("deploy/flow-serving.yml")
    flow, client = cluster.replicas[2], cluster.client(2)
    answer = {}

    def teach():
        # As a careful client does: a call that gets UNAVAILABLE (Jina's gateway found no replica in time, on a
        # loaded machine) is sent again with the same idempotency key, which must find the same job too.
        for attempt in range(3):
            try:
                answer["concept"] = finetune(client, "patient", seed=60, max_train_steps=200,
                                             idempotency_key="patient-1")
                answer.pop("error", None)
                return
            except ConnectionError as e:
                answer["error"], answer["retried"] = e, attempt + 1
                time.sleep(2)

    caller = threading.Thread(target=teach)
    caller.start()
    deadline = time.time() + 120
    while not (jobs := cluster.registry.list_jobs("patient")):
        assert time.time() < deadline and caller.is_alive(), answer
        time.sleep(0.1)
    os.kill(waiting_executor(cluster, flow), signal.SIGKILL)
    caller.join(300)
    assert not caller.is_alive() and "error" not in answer, answer
    (job,) = cluster.registry.list_jobs("patient")  # the retry queued nothing
    assert answer["concept"].job_id == job["job_id"] and job["status"] == "succeeded"
    assert [c["concept_id"] for c in cluster.registry.list_concepts(owner="patient") if c["owner"] == "patient"] \
        == [job["concept_id"]]
    assert_nothing_half_written(cluster)
