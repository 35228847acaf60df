"""A small Python client for BIG, mirroring the original `client.post('/finetune', ...)` usage.

    from client_examples.big_client import BIGClient
    big = BIGClient("grpc://localhost:51000", token)
    concept = big.finetune("client_examples/sample_concept", category="shape", target_model="private")
    images = big.generate(f"a {concept.text} shape", target_model="private", identifier=concept.text)

Only jina and docarray are needed on the client side; the documents sent are docarray's standard
ImageDoc and TextDoc, and the answers extend them (see executor/documents.py).
"""
from __future__ import annotations

import glob
import io
import os
import uuid
from typing import Iterable

from docarray import DocList
from docarray.documents import ImageDoc, TextDoc
from jina import Client

try:  # the response types; a client without this repo can use ImageDoc/TextDoc instead
    from executor.documents import ConceptDoc, ConceptFileDoc, GeneratedImageDoc, JobDoc
except ImportError:  # pragma: no cover
    ConceptDoc, ConceptFileDoc, GeneratedImageDoc, JobDoc = TextDoc, TextDoc, ImageDoc, TextDoc

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_docs(paths: Iterable[str]) -> DocList[ImageDoc]:
    docs = []
    for p in paths:
        with open(p, "rb") as f:
            docs.append(ImageDoc(bytes_=f.read()))
    return DocList[ImageDoc](docs)


def images_in(folder: str) -> list[str]:
    files = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                   if p.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise FileNotFoundError(f"no images in {folder}")
    return files


class BIGClient:
    def __init__(self, host: str, token: str):
        self.host = host
        self.client = Client(host=host)
        self.token = token

    def _params(self, **kw) -> dict:
        params = {k: v for k, v in kw.items() if v is not None}
        return {"jwt": {"token": self.token}, **params}

    def finetune(self, folder: str, category: str, target_model: str = "private", captions_from: str = "sidecar",
                 idempotency_key: str | None = None, **kw) -> ConceptDoc:
        """Teach the images in `folder`. Captions (the `[filewords]` of a `prompt_template`) come from each
        image's sidecar `.txt` (`captions_from="sidecar"`), its file name ("filename": "a red boat (2).png"
        -> "a red boat"), or nowhere ("none"). `method`, `lora_rank`, `num_vectors`, `crop`, `flip`... pass
        through as parameters. `idempotency_key` (a new UUID per call unless given): sending the same call again
        with it gets the job the first one queued, never a second concept."""
        paths = images_in(folder)
        if captions_from not in ("sidecar", "filename", "none"):
            raise ValueError("captions_from is sidecar, filename or none")
        captions = [sidecar_caption(p) if captions_from == "sidecar" else
                    filename_caption(p) if captions_from == "filename" else None for p in paths]
        if any(captions) and "captions" not in kw:
            kw["captions"] = captions
        return self.client.post("/finetune", inputs=image_docs(paths), parameters=self._params(
            category=category, target_model=target_model, idempotency_key=idempotency_key or uuid.uuid4().hex, **kw),
            return_type=DocList[ConceptDoc])[0]

    def generate(self, prompts, target_model: str = "pretrained", **kw) -> DocList[GeneratedImageDoc]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.client.post("/generate", inputs=DocList[TextDoc]([TextDoc(text=p) for p in prompts]),
                                parameters=self._params(target_model=target_model, **kw),
                                return_type=DocList[GeneratedImageDoc])

    def sweep(self, prompt: str, sweep: str = "guidance_scale", target_model: str = "pretrained",
              **kw) -> DocList[GeneratedImageDoc]:
        """Frames of one prompt and seed with one parameter moved (values=[...] or start/stop/num); the last
        document is the animated GIF (kind "animation")."""
        return self.client.post("/sweep", inputs=DocList[TextDoc]([TextDoc(text=prompt)]), parameters=self._params(
            sweep=sweep, target_model=target_model, **kw), return_type=DocList[GeneratedImageDoc])

    def grid(self, prompts, target_model: str = "pretrained", split: int = 1, **kw) -> DocList[GeneratedImageDoc]:
        """Prompts x guidance_scales x steps x seeds; the last document is the contact sheet.

        `split` > 1 sends the prompts as that many concurrent requests, which a flow with several replicas
        of the executor serves in parallel; the sheet is then assembled here.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        parts = [prompts[i::split] for i in range(split) if prompts[i::split]]
        params = self._params(target_model=target_model, **kw)

        def post(part):
            return Client(host=self.host).post("/grid", inputs=DocList[TextDoc]([TextDoc(text=p) for p in part]),
                                               parameters=params, return_type=DocList[GeneratedImageDoc])

        if len(parts) == 1:
            return post(parts[0])
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(parts)) as pool:
            answers = list(pool.map(post, parts))
        by_prompt = {}
        for answer in answers:
            for d in answer:
                if d.kind == "image":
                    by_prompt.setdefault(d.text, []).append(d)
        images = [d for p in prompts for d in by_prompt.get(p, [])]
        sheet = contact_sheet_doc(images, columns=len(images) // len(prompts))
        return DocList[GeneratedImageDoc](images + [sheet])

    def concepts(self) -> DocList[ConceptDoc]:
        return self.client.post("/concepts", inputs=DocList[TextDoc](), parameters=self._params(),
                                return_type=DocList[ConceptDoc])

    def jobs(self, job_id: str | None = None, cancel: bool = False) -> DocList[JobDoc]:
        return self.client.post("/jobs", inputs=DocList[TextDoc](), parameters=self._params(
            job_id=job_id, cancel=cancel or None), return_type=DocList[JobDoc])

    def export(self, identifier: str, out_dir: str | None = None, format: str = "all") -> DocList[ConceptFileDoc]:
        """A private concept's files (LoRA, embeddings), written to `out_dir` if given."""
        docs = self.client.post("/export", inputs=DocList[TextDoc](), parameters=self._params(
            identifier=identifier, format=format), return_type=DocList[ConceptFileDoc])
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            for d in docs:
                with open(os.path.join(out_dir, os.path.basename(d.text)), "wb") as f:
                    f.write(d.bytes_)
        return docs

    def import_files(self, paths: Iterable[str], category: str, identifier: str | None = None,
                     idempotency_key: str | None = None) -> ConceptDoc:
        """A LoRA (.safetensors) and/or an embedding (.safetensors, .pt) as a new private concept; sent again with
        the same `idempotency_key` (a new UUID per call unless given), the concept the first call made."""
        docs = []
        for p in paths:
            with open(p, "rb") as f:
                docs.append(ConceptFileDoc(text=os.path.basename(p), bytes_=f.read()))
        return self.client.post("/import", inputs=DocList[ConceptFileDoc](docs), parameters=self._params(
            category=category, identifier=identifier, idempotency_key=idempotency_key or uuid.uuid4().hex),
            return_type=DocList[ConceptDoc])[0]

    def delete(self, identifier: str) -> None:
        self.client.post("/delete", inputs=DocList[TextDoc](), parameters=self._params(identifier=identifier),
                         return_type=DocList[ConceptDoc])


def sidecar_caption(image_path: str) -> str | None:
    txt = os.path.splitext(image_path)[0] + ".txt"
    if os.path.exists(txt):
        with open(txt) as f:
            return " ".join(f.read().split()) or None
    return None


def filename_caption(image_path: str) -> str | None:
    """AUTOMATIC1111's [filewords]: the file name without extension, numbering and separators."""
    import re

    stem = os.path.splitext(os.path.basename(image_path))[0]
    stem = re.sub(r"^\d+[-_ ]+|\s*\(\d+\)$|[-_ ]+\d+$", "", stem)
    words = " ".join(re.sub(r"[_\-]+", " ", stem).split())
    return words or None


def contact_sheet_doc(images, columns: int):
    """A captioned PNG grid of generated-image documents, as a document of kind "contact_sheet"."""
    from PIL import Image

    from big.generation.sheets import contact_sheet

    pil = [Image.open(io.BytesIO(d.bytes_)).convert("RGB") for d in images]
    captions = [f"{d.text}\n{(d.parameters or '').splitlines()[-1][:60]}" for d in images]
    buf = io.BytesIO()
    contact_sheet(pil, captions, columns=max(1, columns)).save(buf, format="PNG")
    return GeneratedImageDoc(bytes_=buf.getvalue(), kind="contact_sheet", text=f"grid of {len(images)} images")


def save_images(docs, out_dir: str, sheet_name: str = "contact_sheet.png") -> list[str]:
    """Write each PNG (its generation parameters stay in the file) and a captioned contact sheet; a GIF or
    a sheet the server made (/sweep, /grid) is written as sweep.gif / grid.png beside them."""
    from PIL import Image

    from big.generation.sheets import contact_sheet

    os.makedirs(out_dir, exist_ok=True)
    paths, images, captions = [], [], []
    for i, d in enumerate(docs):
        kind = getattr(d, "kind", None) or "image"
        if kind != "image":
            path = os.path.join(out_dir, "sweep.gif" if kind == "animation" else "grid.png")
            with open(path, "wb") as f:
                f.write(d.bytes_)
            paths.append(path)
            continue
        path = os.path.join(out_dir, f"{i:03d}_seed{getattr(d, 'seed', None)}.png")
        with open(path, "wb") as f:
            f.write(d.bytes_)
        paths.append(path)
        images.append(Image.open(io.BytesIO(d.bytes_)).convert("RGB"))
        captions.append(f"{getattr(d, 'text', '')} (seed {getattr(d, 'seed', '?')})")
    if images:
        contact_sheet(images, captions, columns=min(8, len(images)), cell=128).save(os.path.join(out_dir, sheet_name))
    return paths
