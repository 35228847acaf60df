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


def test_commit_version_is_all_or_nothing(tmp_path, database_url):
    ws = Workspace(str(tmp_path))
    reg = Registry(database_url, root=ws.root)
    reg.ensure_model("meta", "meta", None, "base")
    staging = ws.new_staging_dir()
    path = ws.publish_version(staging, "meta", 1, "job")
    concept = dict(concept_id="c1", owner="u", target="meta", identifier="sks", category="dog", n_images=3)
    reg.commit_version("meta", 1, path, "job", concept)
    assert reg.get_model("meta")["current_version"] == 1
    assert reg.version_path("meta", 1) == path  # kept relative to the store's root, read back whole
    # A second commit of the same identifier fails and changes nothing.
    path2 = ws.publish_version(ws.new_staging_dir(), "meta", 2, "job2")
    with pytest.raises(Exception):
        reg.commit_version("meta", 2, path2, "job2", {**concept, "concept_id": "c2"})
    assert reg.get_model("meta")["current_version"] == 1
    assert [c["concept_id"] for c in reg.concepts_of_model("meta")] == ["c1"]
    # A stale version number (someone else moved the model on) is refused.
    with pytest.raises(RuntimeError, match="moved on"):
        reg.commit_version("meta", 5, path2, "job3", None)


def test_startup_removes_only_what_nobody_owns(tmp_path):
    ws = Workspace(str(tmp_path))
    reg = Registry(ws.registry_path)
    reg.ensure_model("meta", "meta", None, "base")
    good = ws.publish_version(ws.new_staging_dir(), "meta", 1, "a")
    reg.commit_version("meta", 1, good, None, None)
    crashed = ws.publish_version(ws.new_staging_dir(), "meta", 2, "b")  # written, never committed
    leftover = ws.new_staging_dir("c")
    busy = ws.new_staging_dir("running-job")  # another process's job is writing it now
    removed = ws.clean_stale(reg.live_version_paths(), busy_tags={"running-job"})
    assert crashed in removed and leftover in removed and os.path.isdir(good) and os.path.isdir(busy)
    recent = ws.new_staging_dir("d")  # perhaps a replica's import, this very moment
    assert recent not in ws.clean_stale(reg.live_version_paths(), min_age_s=60)


def test_two_runs_of_one_job_never_share_a_version_folder_and_a_rerun_removes_only_its_own(tmp_path):
    """A worker presumed dead and the one that took its job over publish the same version number under the same
    job id: two folders (the late one's move cannot fail on the other's); the rerun's cleanup of the job's leftovers
    spares the committed one."""
    ws = Workspace(str(tmp_path))
    reg = Registry(ws.registry_path)
    reg.ensure_model("meta", "meta", None, "base")
    first = ws.publish_version(ws.new_staging_dir("job"), "meta", 1, "job")
    reg.commit_version("meta", 1, first, "job", None)
    late = ws.publish_version(ws.new_staging_dir("job"), "meta", 1, "job")
    assert late != first and os.path.isdir(late)
    assert ws.discard_unfinished("job", reg.live_version_paths()) == [late] and os.path.isdir(first)


def test_a_concepts_instance_images_are_never_replaced_by_another_run(tmp_path):
    from PIL import Image

    ws = Workspace(str(tmp_path))
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    folder = ws.save_instances("c1", [red], tag="job")
    assert ws.save_instances("c1", [blue], tag="job") == folder  # a second run of the job: kept, not swapped
    assert ws.load_instances("c1")[0].getpixel((0, 0)) == (255, 0, 0)
    assert not os.listdir(os.path.join(ws.root, "tmp"))  # its staging folder removed


def test_a_failed_move_of_a_jobs_inputs_leaves_no_staging_folder(tmp_path, monkeypatch):
    """A volume that refuses the move (full, read-only): the error reaches the caller and tmp/ holds nothing of it
    (issue 45: leftovers that only a worker's start used to clean)."""
    from PIL import Image

    ws = Workspace(str(tmp_path))

    def refused(src, dst):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(OSError, match="Read-only"):
        ws.save_job_inputs("job", [Image.new("RGB", (8, 8))])
    with pytest.raises(OSError, match="Read-only"):
        ws.save_instances("c1", [Image.new("RGB", (8, 8))], tag="job")
    assert not os.listdir(os.path.join(ws.root, "tmp")) and not os.path.exists(ws.job_dir("job"))


def test_a_removal_that_fails_is_logged_not_ignored(tmp_path, monkeypatch, caplog):
    ws = Workspace(str(tmp_path))
    folder = ws.new_staging_dir("job")
    open(os.path.join(folder, "weights.bin"), "wb").close()
    real_unlink = os.unlink

    def busy(path, *a, **k):
        if path.endswith("weights.bin"):  # a file another process holds open (on some filesystems)
            raise PermissionError(13, "Permission denied", path)
        return real_unlink(path, *a, **k)

    monkeypatch.setattr(os, "unlink", busy)
    with caplog.at_level("WARNING", logger="big.storage.workspace"):
        ws.discard(folder)
    assert os.path.isdir(folder) and "next sweep tries again" in caplog.text
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert folder in ws.clean_stale(set())  # and the sweep does
    assert not os.path.exists(folder)


def test_the_sweep_removes_ended_jobs_inputs_and_half_written_files_but_not_what_is_in_use(tmp_path):
    from PIL import Image

    ws = Workspace(str(tmp_path))
    image = Image.new("RGB", (32, 32), "red")
    for job in ("queued", "ended", "new"):
        ws.save_job_inputs(job, [image])
    ws.save_class_image("base", "dog", 32, 0, image)
    class_dir = ws.class_image_dir("base", "dog", 32)
    crashed = os.path.join(class_dir, "00001.png.0123abcd.tmp")  # a crash mid-write
    open(crashed, "wb").close()
    hour_ago = os.path.getmtime(ws.job_dir("new")) - 3600
    for path in (ws.job_dir("queued"), ws.job_dir("ended"), crashed):
        os.utime(path, (hour_ago, hour_ago))
    removed = ws.clean_stale(set(), min_age_s=60, active_jobs={"queued"})
    assert sorted(removed) == sorted([ws.job_dir("ended"), crashed])
    assert os.path.isdir(ws.job_dir("queued")) and os.path.isdir(ws.job_dir("new"))  # in use, or just written
    assert sorted(os.listdir(class_dir)) == ["00000.png", "category.json"]
