import os

import pytest

from big.storage.registry import Registry
from big.storage.workspace import Workspace, atomic_write_bytes, slug


def test_paths_never_contain_user_text(tmp_path):
    ws = Workspace(str(tmp_path))
    d = ws.class_image_dir("base", "../../../etc/passwd", 32)
    assert os.path.dirname(os.path.dirname(d)) == str(tmp_path) and ".." not in d
    assert slug("a", "b") != slug("ab")


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(str(target), b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(str(target), b"new")
    assert target.read_bytes() == b"old"


def test_commit_version_is_all_or_nothing(tmp_path):
    ws = Workspace(str(tmp_path))
    reg = Registry(ws.registry_path)
    reg.ensure_model("meta", "meta", None, "base")
    staging = ws.new_staging_dir()
    path = ws.publish_version(staging, "meta", 1)
    concept = dict(concept_id="c1", owner="u", target="meta", identifier="sks", category="dog", n_images=3)
    reg.commit_version("meta", 1, path, "job", concept)
    assert reg.get_model("meta")["current_version"] == 1
    # A second commit of the same identifier fails and changes nothing.
    path2 = ws.publish_version(ws.new_staging_dir(), "meta", 2)
    with pytest.raises(Exception):
        reg.commit_version("meta", 2, path2, "job2", {**concept, "concept_id": "c2"})
    assert reg.get_model("meta")["current_version"] == 1
    assert [c["concept_id"] for c in reg.concepts_of_model("meta")] == ["c1"]
    # A stale version number (someone else moved the model on) is refused.
    with pytest.raises(RuntimeError, match="moved on"):
        reg.commit_version("meta", 5, path2, "job3", None)


def test_startup_removes_uncommitted_versions_and_fails_orphaned_jobs(tmp_path):
    ws = Workspace(str(tmp_path))
    reg = Registry(ws.registry_path)
    reg.ensure_model("meta", "meta", None, "base")
    good = ws.publish_version(ws.new_staging_dir(), "meta", 1)
    reg.commit_version("meta", 1, good, None, None)
    crashed = ws.publish_version(ws.new_staging_dir(), "meta", 2)  # written, never committed
    leftover = ws.new_staging_dir()
    job = reg.create_job("u", "meta", "dog", 10, {})
    reg.update_job(job, status="running", step=4, eta_s=12.5)

    reg2 = Registry(ws.registry_path)  # "restart"
    removed = ws.clean_stale(reg2.live_version_paths())
    assert crashed in removed and leftover in removed and os.path.isdir(good)
    assert reg2.get_job(job)["status"] == "failed"
    assert reg2.get_job(job)["eta_s"] == 0.0 and reg2.get_job(job)["step"] == 4  # the progress made stays


@pytest.mark.parametrize("threads", [1, 2])
def test_a_job_runs_with_the_configured_torch_threads_and_the_caller_keeps_its_own(tmp_path, threads):
    import torch

    from big.jobs import JobManager

    reg = Registry(str(tmp_path / "registry.sqlite"))
    caller = torch.get_num_threads()
    seen = {}

    def job(ctx):
        seen["threads"] = torch.get_num_threads()
        return {}

    jobs = JobManager(reg, threads=threads)
    job_id = reg.create_job("u", "meta", "shape", 1, {})
    jobs.submit(job_id, job)
    assert jobs.wait(job_id, timeout=30)["status"] == "succeeded"
    assert seen["threads"] == threads
    assert torch.get_num_threads() == caller
    jobs.close()
