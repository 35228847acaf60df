"""The Jina Executor: parse the request, call BIGService in a worker thread, wrap the answer.

Endpoints are `async def` so that Jina does not serialise them: a /generate call is served while a
/finetune call waits for its training job.
"""

import asyncio
import hashlib
import logging
from typing import Optional

from docarray import DocList
from docarray.documents import ImageDoc, TextDoc
from jina import Executor, requests

from big import parsing
from big.config import build_service_config
from big.errors import BadRequest
from big.scheduling import FairScheduler
from big.service import BIGService
from big.storage.workspace import png_bytes
from executor.decode import decode_instance_images
from executor.documents import ConceptDoc, ConceptFileDoc, GeneratedImageDoc, JobDoc, JobSecondsDoc

log = logging.getLogger(__name__)


class BIGExecutor(Executor):
    def __init__(self, metas: Optional[dict] = None, requests: Optional[dict] = None,
                 runtime_args: Optional[dict] = None, dynamic_batching: Optional[dict] = None, **settings):
        """`settings` is config.yml's `with:` block, every key a field of `big.config.ServiceConfig` (built by the
        same function as the worker's: the environment over the file, an unknown key refused by name); the rest
        is Jina's."""
        super().__init__(metas=metas, requests=requests, runtime_args=runtime_args,
                         dynamic_batching=dynamic_batching)
        config = build_service_config(settings)
        # All of /generate's torch work, and loading, runs on this one thread, the least served user's call first,
        # even between another call's denoising steps (big/scheduling.py). On a CPU, torch's OpenMP team belongs
        # to the thread that calls it: a second team (the main thread's, from loading) left idle beside the
        # serving thread's slows generation.
        self._generate_thread = FairScheduler(config.limits.max_queued_generations, window=config.batch_window_s)
        if config.serve_threads:
            # The serving thread's own OpenMP team. Beside a training worker on the same CPU, a team as large as
            # the machine waits at every barrier for a thread the worker holds (docs/scaling.md, "Measured").
            import torch

            self._generate_thread.submit("", torch.set_num_threads, config.serve_threads).result()
        self.service = self._generate_thread.submit("", BIGService, config).result()
        log.info("BIG ready (%s): base %s on %s in %s, workspace %s, registry on %s; settings %s", config.role,
                 config.base_model, self.service.device, self.service.base_pipe.unet.dtype, self.service.ws.root,
                 self.service.registry.backend, config.described())

    def _user(self, parameters: dict) -> str:
        return self.service.auth.user_from_parameters(parameters or {})

    @requests(on="/finetune")
    async def finetune(self, docs: DocList[ImageDoc], parameters: dict, **kwargs) -> DocList[ConceptDoc]:
        user = self._user(parameters)
        limits = self.service.config.limits
        images = decode_instance_images(docs, limits)
        job_id, wait = await asyncio.to_thread(self.service.submit_finetune, user, images, parameters)
        if not wait:
            return DocList[ConceptDoc]([ConceptDoc(text="", job_id=job_id, status="queued")])
        # Await the job's row (whichever worker runs it) without holding a thread between looks: the default pool
        # also serves /generate.
        done, unanswered_since = False, None
        while not done:  # through a registry that does not answer for a while too: the job goes on meanwhile
            done, unanswered_since = await asyncio.to_thread(self.service.jobs.poll, job_id, unanswered_since)
            if not done:
                await asyncio.sleep(0.2)
        r = self.service.finetune_result(job_id)
        return DocList[ConceptDoc]([ConceptDoc(
            text=r["identifier"], prompt=f"a {r['identifier']} {r['category']}", category=r["category"],
            target_model=r["target"], model_version=r["model_version"], job_id=r["job_id"], status=r["status"],
            mine=True, method=r.get("method"))])

    @requests(on="/export")
    async def export(self, docs: DocList[TextDoc], parameters: dict, **kwargs) -> DocList[ConceptFileDoc]:
        """A private concept's files (`identifier`; `format`: all, diffusers, a1111)."""
        user, ident = self._user(parameters), _identifier_of(parameters)
        files = await asyncio.to_thread(self.service.export, user, ident,
                                       parsing.given(parameters, "format", "all"))
        return DocList[ConceptFileDoc]([ConceptFileDoc(text=name, bytes_=data, identifier=ident,
                                                       sha256=hashlib.sha256(data).hexdigest()) for name, data in files])

    @requests(on="/import")
    async def import_(self, docs: DocList[ConceptFileDoc], parameters: dict, **kwargs) -> DocList[ConceptDoc]:
        """A LoRA and/or embedding file (`bytes_`, file name in `text`) as a new private concept of
        `category` (and `identifier`, if you want a particular word)."""
        user = self._user(parameters)
        files = [(d.text or "", d.bytes_ or b"") for d in docs]
        r = await self._on_generate_thread(user, self.service.import_concept, user, files, parameters)
        return DocList[ConceptDoc]([ConceptDoc(
            text=r["identifier"], prompt=f"a {r['identifier']} {r['category']}", category=r["category"],
            target_model="private", model_version=1, status="imported", mine=True, method=r["method"])])

    @requests(on="/generate")
    async def generate(self, docs: DocList[TextDoc], parameters: dict, **kwargs) -> DocList[GeneratedImageDoc]:
        user = self._user(parameters)
        prompts = [d.text for d in docs]
        key = await asyncio.to_thread(self.service.generator.batch_key, user, prompts, parameters)
        images = await self._on_generate_thread(user, self.service.generate, user, prompts, parameters,
                                                batch=(key, self.service.generate_many) if key else None)
        return DocList[GeneratedImageDoc]([_image_doc(g) for g in images])

    @requests(on="/sweep")
    async def sweep(self, docs: DocList[TextDoc], parameters: dict, **kwargs) -> DocList[GeneratedImageDoc]:
        """Frames of one prompt and seed with `sweep` (guidance_scale, num_inference_steps) moved over
        `values` or `start`/`stop`/`num`; the last document is the animated GIF."""
        user = self._user(parameters)
        frames, gif = await self._on_generate_thread(user, self.service.sweep, user, [d.text for d in docs],
                                                     parameters)
        parameter = parsing.given(parameters, "sweep", "guidance_scale")
        return DocList[GeneratedImageDoc]([_image_doc(g) for g in frames] + [GeneratedImageDoc(
            bytes_=gif, kind="animation", text=f"{parameter} sweep: {frames[0].prompt}", seed=frames[0].seed)])

    @requests(on="/grid")
    async def grid(self, docs: DocList[TextDoc], parameters: dict, **kwargs) -> DocList[GeneratedImageDoc]:
        """Prompts x `guidance_scales` x `steps` x `seeds`/`num_seeds` (or `random_samples`); the last
        document is the captioned contact sheet."""
        user = self._user(parameters)
        images, sheet = await self._on_generate_thread(user, self.service.grid, user, [d.text for d in docs],
                                                       parameters)
        return DocList[GeneratedImageDoc]([_image_doc(g) for g in images] + [GeneratedImageDoc(
            bytes_=sheet, kind="contact_sheet", text=f"grid of {len(images)} images")])

    async def _on_generate_thread(self, user: str, fn, *args, batch=None):
        return await asyncio.wrap_future(self._generate_thread.submit(user, fn, *args, batch=batch))

    @requests(on="/concepts")
    async def concepts(self, docs: DocList[TextDoc], parameters: dict, **kwargs) -> DocList[ConceptDoc]:
        user = self._user(parameters)
        rows = await asyncio.to_thread(self.service.concepts, user)
        return DocList[ConceptDoc]([ConceptDoc(text=c["identifier"], **{k: v for k, v in c.items() if k not in (
            "identifier", "n_images")}) for c in rows])

    @requests(on="/delete")
    async def delete(self, docs: DocList[TextDoc], parameters: dict, **kwargs) -> DocList[ConceptDoc]:
        user, ident = self._user(parameters), _identifier_of(parameters)
        await asyncio.to_thread(self.service.delete, user, ident)
        return DocList[ConceptDoc]([ConceptDoc(text=ident, status="deleted", target_model="private")])

    @requests(on="/admin")
    async def admin(self, docs: DocList[TextDoc], parameters: dict, **kwargs) -> DocList[ConceptDoc]:
        """The public metamodel's keeper (an admin token): `action` list (default), retire or restore."""
        self.service.auth.admin_from_parameters(parameters)
        action = parsing.given(parameters, "action", "list")
        if action == "list":
            rows = await asyncio.to_thread(self.service.metamodel_concepts)
        elif action in ("retire", "restore"):
            rows = [await asyncio.to_thread(getattr(self.service, action), _identifier_of(parameters))]
        else:
            raise BadRequest("action must be one of list, retire, restore")
        return DocList[ConceptDoc]([ConceptDoc(text=r["identifier"], target_model="meta", **{
            k: v for k, v in r.items() if k not in ("identifier", "kind")}) for r in rows])

    @requests(on="/jobs")
    async def jobs(self, docs: DocList[TextDoc], parameters: dict, **kwargs) -> DocList[JobDoc]:
        user = self._user(parameters)
        job_id = parameters.get("job_id")
        if job_id:
            cancel = parsing.flag(parameters, "cancel", False)
            rows = [await asyncio.to_thread(self.service.job, user, str(job_id), cancel)]
        else:
            rows = await asyncio.to_thread(self.service.list_jobs, user)
        return DocList[JobDoc]([JobDoc(text=j["job_id"], target_model=j["target"],
                                       seconds=JobSecondsDoc(**j["seconds"]) if j["seconds"] else None,
                                       **{k: j[k] for k in ("status", "step", "total_steps", "loss", "eta_s",
                                                            "error", "identifier", "category", "model_version")})
                                for j in rows])

    def close(self) -> None:
        self.service.close()
        self._generate_thread.close()
        super().close()


def _identifier_of(parameters: dict) -> str:
    ident = (parameters or {}).get("identifier")
    if not isinstance(ident, str) or not ident:
        raise BadRequest("pass the private concept's `identifier`")
    return ident


def _image_doc(g) -> GeneratedImageDoc:
    return GeneratedImageDoc(bytes_=png_bytes(g.image, g.png_info()), text=g.prompt, seed=g.seed, kind="image",
                             parameters=g.parameters_text(), target_model=g.parameters["model"],
                             model_version=g.parameters["model_version"])
