"""The workspace on disk: model versions, instance images, the shared class-image cache.

Nothing a user sends (category, identifier, user id) becomes a raw path component: folders are
named by hashes. Every write goes to a temporary name in the same filesystem first and is moved
into place with os.replace, so a reader sees a whole file or folder, or none.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid

from PIL import Image


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
        for sub in ("models", "instances", "class_images", "tmp"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)

    @property
    def registry_path(self) -> str:
        return os.path.join(self.root, "registry.sqlite")

    # ------------------------------------------------------------------ model versions
    def model_dir(self, model_key: str) -> str:
        return os.path.join(self.root, "models", slug("model", model_key))

    def version_dir(self, model_key: str, version: int) -> str:
        return os.path.join(self.model_dir(model_key), f"v{version:04d}")

    def new_staging_dir(self) -> str:
        path = os.path.join(self.root, "tmp", uuid.uuid4().hex)
        os.makedirs(path)
        return path

    def publish_version(self, staging: str, model_key: str, version: int) -> str:
        """Move a fully written staging folder to its version path (atomic rename)."""
        final = self.version_dir(model_key, version)
        if os.path.exists(final):
            raise FileExistsError(final)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(staging, final)
        return final

    def discard(self, path: str | None) -> None:
        if path and os.path.exists(path):
            shutil.rmtree(path, ignore_errors=True)

    def clean_stale(self, live_version_dirs: set[str]) -> list[str]:
        """Remove staging leftovers and version folders the registry never committed (a crash)."""
        removed = []
        tmp = os.path.join(self.root, "tmp")
        for name in os.listdir(tmp):
            self.discard(os.path.join(tmp, name))
            removed.append(os.path.join(tmp, name))
        models = os.path.join(self.root, "models")
        for m in os.listdir(models):
            for v in os.listdir(os.path.join(models, m)):
                path = os.path.join(models, m, v)
                if path not in live_version_dirs:
                    self.discard(path)
                    removed.append(path)
        return removed

    # ------------------------------------------------------------------ instance images
    def instance_dir(self, concept_id: str) -> str:
        return os.path.join(self.root, "instances", slug("concept", concept_id))

    def save_instances(self, concept_id: str, images: list[Image.Image],
                       captions: list[str | None] | None = None) -> str:
        staging = self.new_staging_dir()
        for i, img in enumerate(images):
            with open(os.path.join(staging, f"{i:04d}.png"), "wb") as f:
                f.write(png_bytes(img))
        if captions and any(captions):
            with open(os.path.join(staging, "captions.json"), "w") as f:
                json.dump(list(captions), f)
        final = self.instance_dir(concept_id)
        self.discard(final)
        os.replace(staging, final)
        return final

    def load_instances(self, concept_id: str) -> list[Image.Image]:
        d = self.instance_dir(concept_id)
        if not os.path.isdir(d):
            return []
        out = []
        for name in sorted(n for n in os.listdir(d) if n.endswith(".png")):
            with Image.open(os.path.join(d, name)) as im:
                out.append(im.convert("RGB"))
        return out

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
