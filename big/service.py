"""BIGService: the service behind every endpoint, one short method each, over the parts that do the work.

`executor.BIGExecutor` turns gRPC requests into calls of this class; tests, benchmarks and notebooks use it
directly. The parts: `models.ModelStore` (which weights serve), `finetune.Finetuner` (a training job),
`generate.Generator` (the render routes), `concepts.Concepts` (list, delete, export, import), `jobs.JobQueue`
(queue, wait, cancel) and, where this process trains (`config.role`), a `jobs.JobWorker`, over `storage` (the
store's folders and version folders, the registry and queue in one database shared by every process).
"""
from __future__ import annotations

import logging
from typing import Sequence

from PIL import Image

from big.admin import MetamodelKeeper
from big.auth import AuthConfig, Authenticator
from big.concepts import EXPORT_FORMATS, Concepts
from big.config import ServiceConfig, service_defaults
from big.errors import NotFound
from big.finetune import Finetuner
from big.generate import Generator
from big.generation.sampling import GeneratedImage, ImageSpec
from big.jobs import JobQueue, JobWorker, job_view
from big.models import ModelStore
from big.storage.registry import Registry, sqlite_url
from big.storage.workspace import Workspace
from big.training.identifiers import identifier_pool
from big.weights import pipelines
from big.weights.text import TextSide

log = logging.getLogger(__name__)


class BIGService:
    EXPORT_FORMATS = EXPORT_FORMATS

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.ws = Workspace(config.workspace)
        self.registry = Registry(config.database_url or sqlite_url(self.ws.registry_path), root=self.ws.root)
        self.auth = Authenticator(AuthConfig.from_env(config.auth, workspace=self.ws.root))
        self.device = pipelines.pick_device(config.device)
        self.base_pipe = pipelines.load_base_pipeline(config.base_model, self.device,
                                                      pipelines.pick_dtype(config.dtype, self.device))
        self.base_key = pipelines.base_key(config.base_model)
        self.size = pipelines.image_size(self.base_pipe)
        self.finetune_defaults, self.generate_defaults = service_defaults(
            config, pipelines.defaults_of(config.base_model), self.size)
        tokenizers = TextSide.of(self.base_pipe).tokenizers
        pool = identifier_pool(tokenizers[0], f"{pipelines.resolve_base(config.base_model)}/tokenizer",
                               others=tokenizers[1:])
        self.identifier_pool = pool
        self.models = ModelStore(config, self.registry, self.base_pipe, self.device)
        self.jobs = JobQueue(self.registry)
        self.finetuner = Finetuner(self.models, self.registry, self.ws, defaults=self.finetune_defaults,
                                   identifier_pool=pool, base_key=self.base_key, size=self.size,
                                   class_image_steps=config.class_image_steps,
                                   guidance_scale=self.generate_defaults["guidance_scale"])
        self.generator = Generator(self.models, config, self.generate_defaults)
        self.concept_store = Concepts(self.models, self.registry, self.ws, identifier_pool=pool,
                                      base_key=self.base_key)
        self.keeper = MetamodelKeeper(self.models, self.registry, self.ws, base_key=self.base_key)
        self.worker = self._start_worker() if config.trains else None

    def _start_worker(self) -> JobWorker:
        running = {j["job_id"] for j in self.registry.running_jobs()}
        # Other processes share the store: only what no running job owns and nobody wrote for a while goes.
        removed = self.ws.clean_stale(self.registry.live_version_paths(), busy_tags=running,
                                      min_age_s=2 * self.config.job_lease_s,
                                      active_jobs=self.registry.active_job_ids())
        if removed:
            log.warning("removed %d unfinished folders left by an earlier crash", len(removed))
        return JobWorker(self.registry, self.finetuner.run_job, slots=self.config.train_workers,
                         threads=self.config.train_threads, lease_s=self.config.job_lease_s,
                         poll_s=self.config.job_poll_s, max_attempts=self.config.max_job_attempts,
                         discard=self.finetuner.discard_inputs, before_rerun=self.finetuner.before_rerun)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
        self.registry.close()

    @property
    def cache(self):
        return self.models.cache

    @property
    def loras(self):
        return self.models.loras

    # ------------------------------------------------------------------ /finetune
    def submit_finetune(self, user: str, images: Sequence[Image.Image], params: dict) -> tuple[str, bool]:
        """Validate and queue a finetune; returns (job id, whether the caller asked to wait)."""
        return self.finetuner.submit(user, images, params)

    def finetune_result(self, job_id: str) -> dict:
        return self.finetuner.result(job_id)

    def finetune(self, user: str, images: Sequence[Image.Image], params: dict) -> dict:
        """Blocking finetune (in-process use); with `wait: false` returns the queued job at once."""
        job_id, wait = self.submit_finetune(user, images, params)
        if not wait:
            return {"job_id": job_id, "status": "queued"}
        self.jobs.wait(job_id)
        return self.finetune_result(job_id)

    def prior_class_images(self, category: str, n: int) -> list[Image.Image]:
        return self.finetuner.prior_class_images(category, n)

    # ------------------------------------------------------------------ /generate, /sweep, /grid
    def resolve_model(self, user: str, target: str, identifier: str | None, version: int | None = None):
        return self.models.resolve(user, target, identifier, version)

    def generate(self, user: str, prompts: Sequence[str], params: dict) -> list[GeneratedImage]:
        return self.generator.generate(user, prompts, params)

    def generate_many(self, calls: Sequence[tuple[str, Sequence[str], dict]]) -> list:
        """Concurrent /generate requests of one `generator.batch_key` in shared pipeline calls."""
        return self.generator.generate_many(calls)

    def render(self, user: str, specs: Sequence[ImageSpec], params: dict) -> list[GeneratedImage]:
        """One image per spec exactly as /generate makes it: how benchmarks score what the service serves."""
        return self.generator.render(user, specs, params)

    def sweep(self, user: str, prompts: Sequence[str], params: dict) -> tuple[list[GeneratedImage], bytes]:
        return self.generator.sweep(user, prompts, params)

    def grid(self, user: str, prompts: Sequence[str], params: dict) -> tuple[list[GeneratedImage], bytes]:
        return self.generator.grid(user, prompts, params)

    def private_concepts_for(self, user: str, names: Sequence[str], prompts: Sequence[str]) -> list[dict]:
        return self.generator.private_concepts_for(user, names, prompts)

    # ------------------------------------------------------------------ /concepts, /delete, /export, /import
    def concepts(self, user: str) -> list[dict]:
        return self.concept_store.list(user)

    def delete(self, user: str, identifier: str) -> dict:
        return self.concept_store.delete(user, identifier)

    def export(self, user: str, identifier: str, fmt: str = "all") -> list[tuple[str, bytes]]:
        return self.concept_store.export(user, identifier, fmt)

    def import_concept(self, user: str, files: Sequence[tuple[str, bytes]], params: dict) -> dict:
        return self.concept_store.import_(user, files, params)

    # ------------------------------------------------------------------ /admin (the caller's token was checked)
    def metamodel_concepts(self) -> list[dict]:
        return self.keeper.concepts()

    def retire(self, identifier: str) -> dict:
        return self.keeper.retire(identifier)

    def restore(self, identifier: str) -> dict:
        return self.keeper.restore(identifier)

    # ------------------------------------------------------------------ /jobs
    def job_view(self, job: dict) -> dict:
        return job_view(job)

    def job(self, user: str, job_id: str, cancel: bool = False) -> dict:
        job = self.registry.get_job(job_id)
        if job is None or job["owner"] != user:
            raise NotFound("no such job")
        if cancel and job["status"] in ("queued", "running"):
            self.jobs.cancel(job_id)
            job = self.registry.get_job(job_id)
            if job["status"] == "cancelled":  # it never ran: its stored images are not needed
                self.finetuner.discard_inputs(job)
        return job_view(job)

    def list_jobs(self, user: str) -> list[dict]:
        return [job_view(j) for j in self.registry.list_jobs(user)]
