"""The workspace on disk: model versions, instance images, the shared class-image cache.

Nothing a user sends (category, identifier, user id) becomes a raw path component: folders are
named by hashes. Every write goes to a temporary name in the same filesystem first and is moved
into place with os.replace, so a reader sees a whole file or folder, or none.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import time
import uuid

from PIL import Image

log = logging.getLogger(__name__)


def slug(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def atomic_write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def png_bytes(img: Image.Image, pnginfo=None) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=pnginfo)
    return buf.getvalue()


class Workspace:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        for sub in ("models", "instances", "class_images", "jobs", "tmp"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)

    @property
    def registry_path(self) -> str:
        return os.path.join(self.root, "registry.sqlite")

    # ------------------------------------------------------------------ model versions
    def model_dir(self, model_key: str) -> str:
        return os.path.join(self.root, "models", slug("model", model_key))

    def new_version_dir(self, model_key: str, version: int, tag: str) -> str:
        """A new folder for a version, named by its writer (`tag`: a job id) and by this run of it: two writers of
        one version number (a worker presumed dead and the one that took its job over, even two runs of one
        job) never share a folder; the registry records which one became the version."""
        return os.path.join(self.model_dir(model_key), f"v{version:04d}.{tag}.{uuid.uuid4().hex[:8]}")

    def new_staging_dir(self, tag: str = "x") -> str:
        """A fresh folder to write in before a move into place; `tag` (a job id) names whose it is, so that the
        worker that runs the job again can remove what an earlier, killed run left."""
        path = os.path.join(self.root, "tmp", f"{tag}.{uuid.uuid4().hex}")
        os.makedirs(path)
        return path

    @contextlib.contextmanager
    def staging(self, tag: str):
        """A fresh staging folder for the block to fill and move into place; removed if the block fails (a full or
        read-only volume), so nothing half-written is left in tmp/."""
        path = self.new_staging_dir(tag)
        try:
            yield path
        except BaseException:
            self.discard(path)
            raise

    def discard_unfinished(self, tag: str, live_version_dirs: set[str]) -> list[str]:
        """What writer `tag` left unfinished (staging folders, version folders never committed): a killed run of
        a job, removed by the worker that runs it again."""
        found = [path for writer, path in self._staging_dirs() if writer == tag]
        found += [path for writer, path in self._version_dirs() if writer == tag and path not in live_version_dirs]
        for path in found:
            self.discard(path)
        return found

    def publish_version(self, staging: str, model_key: str, version: int, tag: str) -> str:
        """Move a fully written staging folder to its version path (atomic rename)."""
        final = self.new_version_dir(model_key, version, tag)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(staging, final)
        return final

    def discard(self, path: str | None) -> None:
        """Remove a folder; what cannot be removed now is logged, and the next sweep (`clean_stale`) tries again."""
        def failed(_function, failed_path, exc_info):
            log.warning("could not remove %s (%s); the next sweep tries again", failed_path, exc_info[1])

        if path and os.path.exists(path):
            log.info("removing %s", path)
            shutil.rmtree(path, onerror=failed)

    def clean_stale(self, live_version_dirs: set[str], busy_tags: set[str] = frozenset(),
                    min_age_s: float = 0.0, active_jobs: set[str] | None = None) -> list[str]:
        """Remove staging leftovers, version folders the registry never committed and half-written files (a
        crash), and, given the jobs still queued or running (`active_jobs`), the inputs of every other job (one
        that ended while its inputs could not be removed); except what a running job (`busy_tags`) or a writer of
        the last `min_age_s` seconds may still be writing: other processes share this folder."""
        old = time.time() - min_age_s
        removed = [path for writer, path in self._staging_dirs() if writer not in busy_tags and _mtime(path) <= old]
        removed += [path for _, path in self._version_dirs() if path not in live_version_dirs and _mtime(path) <= old]
        if active_jobs is not None:
            keep = {self.job_dir(job_id) for job_id in active_jobs}
            jobs = os.path.join(self.root, "jobs")
            removed += [path for path in (os.path.join(jobs, n) for n in os.listdir(jobs))
                        if path not in keep and _mtime(path) <= old]
        for path in removed:
            self.discard(path)
        for path in self._unfinished_files():  # an atomic write's temporary file, left by a crash mid-write
            if _mtime(path) <= old:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                removed.append(path)
        return removed

    def _unfinished_files(self) -> list[str]:
        """`atomic_write_bytes`' temporary files in the folders written file by file (class images, instances)."""
        out = []
        for sub in ("class_images", "instances"):
            for folder, _, names in os.walk(os.path.join(self.root, sub)):
                out += [os.path.join(folder, n) for n in names if n.endswith(".tmp")]
        return out

    def _staging_dirs(self):
        """(writer tag, path) of each staging folder: named "<tag>.<uuid>"."""
        tmp = os.path.join(self.root, "tmp")
        return [(name.split(".", 1)[0], os.path.join(tmp, name)) for name in os.listdir(tmp)]

    def _version_dirs(self):
        """(writer tag, path) of each version folder: named "v0005.<tag>.<run>" ("v0005.<tag>" before runs were
        named, "v0005" before writers were)."""
        models = os.path.join(self.root, "models")
        return [(v.split(".")[1] if "." in v else None, os.path.join(models, m, v))
                for m in os.listdir(models) for v in os.listdir(os.path.join(models, m))]

    # ------------------------------------------------------------------ a queued job's inputs
    def job_dir(self, job_id: str) -> str:
        return os.path.join(self.root, "jobs", slug("job", job_id))

    def save_job_inputs(self, job_id: str, images: list[Image.Image]) -> None:
        """A job's instance images, written whole before the job is queued (a worker on another machine reads
        them); PNG, so the worker trains on exactly the pixels the request carried."""
        with self.staging(job_id) as staging:
            _save_pngs(staging, images)
            os.replace(staging, self.job_dir(job_id))

    def load_job_inputs(self, job_id: str) -> list[Image.Image]:
        d = self.job_dir(job_id)
        if not os.path.isdir(d):
            raise FileNotFoundError(f"job {job_id}: its stored inputs are gone")
        return _load_pngs(d)

    def delete_job_inputs(self, job_id: str) -> None:
        self.discard(self.job_dir(job_id))

    # ------------------------------------------------------------------ instance images
    def instance_dir(self, concept_id: str) -> str:
        return os.path.join(self.root, "instances", slug("concept", concept_id))

    def save_instances(self, concept_id: str, images: list[Image.Image],
                       captions: list[str | None] | None = None, tag: str = "x") -> str:
        final = self.instance_dir(concept_id)
        try:
            with self.staging(tag) as staging:
                _save_pngs(staging, images)
                if captions and any(captions):
                    with open(os.path.join(staging, "captions.json"), "w") as f:
                        json.dump(list(captions), f)
                os.replace(staging, final)
        except OSError:
            # Another run of the same job (one taken over from a worker presumed dead) wrote them: the same
            # inputs, and perhaps a committed concept's replay images, so never replaced (a rename onto a folder
            # with files fails).
            if not os.path.isdir(final):
                raise
        return final

    def load_instances(self, concept_id: str) -> list[Image.Image]:
        d = self.instance_dir(concept_id)
        return _load_pngs(d) if os.path.isdir(d) else []

    def load_captions(self, concept_id: str) -> list[str | None]:
        """Each instance image's caption (None where it had none); [] when the concept had no captions."""
        path = os.path.join(self.instance_dir(concept_id), "captions.json")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return json.load(f)

    def delete_instances(self, concept_id: str) -> None:
        self.discard(self.instance_dir(concept_id))

    # ------------------------------------------------------------------ class-image cache
    def class_image_dir(self, base_key: str, category: str, size: int) -> str:
        return os.path.join(self.root, "class_images", slug("class", base_key, category, str(size)))

    def load_class_images(self, base_key: str, category: str, size: int, n: int) -> list[Image.Image]:
        d = self.class_image_dir(base_key, category, size)
        out = []
        for i in range(n):
            p = os.path.join(d, f"{i:05d}.png")
            if not os.path.exists(p):
                break
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        return out

    def save_class_image(self, base_key: str, category: str, size: int, index: int, img: Image.Image) -> None:
        d = self.class_image_dir(base_key, category, size)
        atomic_write_bytes(os.path.join(d, f"{index:05d}.png"), png_bytes(img))
        meta = os.path.join(d, "category.json")
        if not os.path.exists(meta):
            atomic_write_json(meta, {"base": base_key, "category": category, "size": size})


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except FileNotFoundError:  # another process removed or moved it a moment ago
        return float("inf")


def _save_pngs(folder: str, images: list[Image.Image]) -> None:
    """0000.png, 0001.png, ... each on disk (fsync) before the folder is moved into place."""
    for i, img in enumerate(images):
        with open(os.path.join(folder, f"{i:04d}.png"), "wb") as f:
            f.write(png_bytes(img))
            f.flush()
            os.fsync(f.fileno())


def _load_pngs(folder: str) -> list[Image.Image]:
    out = []
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".png")):
        with Image.open(os.path.join(folder, name)) as im:
            out.append(im.convert("RGB"))
    return out
