"""Training and serving on PostgreSQL while its connections are terminated ten times a second for 10 s
(`pg_terminate_backend`, what a restart or a failover does to them): the job training meanwhile succeeds on its
first attempt, and every /generate of a private concept and of the metamodel is answered, each request resolving
its model through the registry as a replica does."""
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from benchmarks.harness import POSTGRES_ADMIN_URL
from conftest import BASE_MODEL, SECRET, instance_images, postgres_database, terminate_connections


@pytest.fixture
def database():
    yield from postgres_database("big_serving")


def test_a_job_trains_and_generate_answers_while_the_registrys_connections_are_terminated(tmp_path, database):
    from big.service import BIGService, ServiceConfig

    short = {"max_train_steps": 4, "num_class_images": 4, "per_method": {"lora": {"max_train_steps": 4}},
             "per_strategy": {"adapters": {"max_train_steps": 4}}}
    svc = BIGService(ServiceConfig(workspace=str(tmp_path / "ws"), base_model=BASE_MODEL, database_url=database,
                                   auth={"mode": "hs256", "secret": SECRET}, finetune_defaults=short,
                                   generate_defaults={"num_inference_steps": 2}))
    private = svc.finetune("alice", instance_images(3), {"category": "shape"})
    meta = svc.finetune("alice", instance_images(3, seed=1), {"category": "shape", "target_model": "meta"})
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    stop, terminated = threading.Event(), []

    def terminate():
        while not stop.wait(0.1):
            terminated.append(terminate_connections(admin, make_url(database).database))

    training, _ = svc.submit_finetune("bob", instance_images(3, seed=2), {"category": "shape", "max_train_steps": 120,
                                                                          "wait": False})
    while svc.registry.get_job(training)["step"] < 1:
        time.sleep(0.05)
    killer = threading.Thread(target=terminate)
    killer.start()
    answered = []
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for target, concept in (("private", private), ("meta", meta)):
                images = svc.generate("alice", [f"a {concept['identifier']} shape"],
                                      {"target_model": target, "num_images": 1, "seed": len(answered)})
                answered.append((target, images[0].parameters["model_version"]))
        trained_meanwhile = svc.registry.get_job(training)["step"]
    finally:
        stop.set()
        killer.join()
    ended = svc.jobs.wait(training, timeout=300)
    svc.close()
    admin.dispose()
    print(f"\n{len(answered)} /generate answered and {trained_meanwhile} of the job's 120 steps trained in 10 s while "
          f"{sum(terminated)} registry connections were terminated; the job: {ended['status']}, attempt "
          f"{ended['attempts']}")
    assert (ended["status"], ended["attempts"]) == ("succeeded", 1)
    assert sum(terminated) >= 10, terminated  # the registry's connections were really cut, over and over
    assert {t for t, _ in answered} == {"private", "meta"} and ("meta", meta["model_version"]) in answered
