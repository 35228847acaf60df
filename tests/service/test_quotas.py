"""Per-user limits: a user's queued jobs, private concepts and stored bytes each end with a clear QuotaExceeded,
and nothing of the refused request is kept."""
import dataclasses

import pytest

from conftest import instance_images
from big.errors import QuotaExceeded

FAST = {"category": "shape", "max_train_steps": 6, "num_class_images": 2}


def limit(service, **kw):
    service.config.limits = dataclasses.replace(service.config.limits, **kw)


def test_jobs_concepts_and_bytes_per_user_are_bounded(service):
    limit(service, max_jobs_per_user=1)
    first, _ = service.submit_finetune("alice", instance_images(3), {**FAST, "max_train_steps": 60, "wait": False})
    with pytest.raises(QuotaExceeded, match="1 training jobs queued or running; at most 1"):
        service.submit_finetune("alice", instance_images(3), FAST)
    other, _ = service.submit_finetune("bob", instance_images(3), {**FAST, "wait": False})  # another user's share
    service.jobs.wait(first)
    service.jobs.wait(other)
    limit(service, max_jobs_per_user=4, max_private_concepts_per_user=1)
    with pytest.raises(QuotaExceeded, match="1 private concepts; at most 1"):
        service.finetune("alice", instance_images(3), FAST)
    files = service.export("alice", service.concepts("alice")[0]["identifier"])
    with pytest.raises(QuotaExceeded, match="private concepts"):
        service.import_concept("alice", files, {"category": "shape"})
    limit(service, max_private_concepts_per_user=200, max_stored_bytes_per_user=1000)
    with pytest.raises(QuotaExceeded, match="MiB; at most 0 MiB"):
        service.import_concept("alice", files, {"category": "shape"})
    assert len([c for c in service.concepts("alice") if c["mine"]]) == 1  # nothing of the refused ones was kept
