"""The BIG service logic, independent of Jina: finetune, generate, concepts, delete, jobs.

`executor.BIGExecutor` turns gRPC requests into calls of this class; tests and notebooks can also
use it directly. Model keys name what is trained:
    pretrained                  the base model, never trained
    private:<concept id>        one concept, trained from the base, visible to its owner only
    private_meta:<user id>      the user's own incrementally trained metamodel
    meta                        the public metamodel every user can teach and use
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import uuid
from typing import Sequence

import torch
from PIL import Image

from big import parsing
from big.generation import sampling, infotext, prompting, schedulers, studio
from big.training import class_images, planner, preprocess, loop
from big.weights import embeddings, metamodel, lora, pipelines
from big.auth import AuthConfig, Authenticator
from big.errors import BadRequest, BIGError, Conflict, JobCancelled, NotFound
from big.training.identifiers import choose_identifier, identifier_pool
from big.jobs import JobContext, JobManager
from big.storage.registry import Registry
from big.storage.workspace import Workspace

log = logging.getLogger(__name__)

DEFAULT_FINETUNE = dict(learning_rate=1e-4, max_train_steps=200, num_class_images=48, train_batch_size=4,
                        train_text_encoder=False, metamodel_strategy=parsing.DEFAULT_METAMODEL_STRATEGY,
                        train_identifier_embedding=True, embedding_learning_rate=1e-3, method="lora",
                        # Each method's own defaults, over the shared ones (a model's big_defaults.json or
                        # config.yml may set its own): diffusers' DreamBooth-LoRA settings; an embedding trains
                        # nothing that class images could protect, so it generates none.
                        per_method={"lora": dict(learning_rate=1e-4, lora_rank=4, lora_targets="attention"),
                                    "textual_inversion": dict(num_class_images=0, embedding_learning_rate=5e-3)})
DEFAULT_GENERATE = dict(num_inference_steps=20, guidance_scale=7.5)


@dataclasses.dataclass
class ServiceConfig:
    workspace: str = "workspace"
    base_model: str = pipelines.EMBEDDED
    device: str = "auto"
    # The served dtype: auto (float16 on CUDA, float32 on a CPU), float32, float16 (GPU only) or bfloat16.
    # Training works on float32 weights; a metamodel's DreamBooth trunks are written in float32.
    dtype: str = "auto"
    auth: dict = dataclasses.field(default_factory=dict)
    finetune_defaults: dict = dataclasses.field(default_factory=dict)
    generate_defaults: dict = dataclasses.field(default_factory=dict)
    class_image_steps: int = 20
    # Images per pipeline call (generation, class images); with classifier-free guidance the UNet sees twice as
    # many. A batch that runs out of GPU memory is retried in halves, so this only needs lowering to avoid that.
    generation_batch: int = sampling.DEFAULT_GENERATION_BATCH
    cache_max_bytes: int = 4 * 1024**3
    train_workers: int = 1
    train_threads: int | None = None  # torch CPU threads of a training job's thread; None: torch's default
    # A request's LoRA adapters (a metamodel prompt's route, private concepts) merged into a cached UNet copy
    # (in cache_max_bytes) instead of applied unmerged per call: same images within rounding, the base's speed.
    fuse_adapters: bool = True
    limits: parsing.Limits = dataclasses.field(default_factory=parsing.Limits)


def model_key(target: str, user: str, concept_id: str | None = None) -> str:
    if target == "meta":
        return "meta"
    if target == "private_meta":
        return f"private_meta:{user}"
    if target == "private":
        if not concept_id:
            raise ValueError("a private model key needs its concept id")
        return f"private:{concept_id}"
    raise ValueError(target)


class BIGService:
    def __init__(self, config: ServiceConfig):
        if config.generation_batch < 1:
            raise ValueError(f"generation_batch must be at least 1, not {config.generation_batch}")
        self.config = config
        self.ws = Workspace(config.workspace)
        self.registry = Registry(self.ws.registry_path)
        removed = self.ws.clean_stale(self.registry.live_version_paths())
        if removed:
            log.warning("removed %d unfinished model folders left by an earlier crash", len(removed))
        self.auth = Authenticator(AuthConfig.from_env(config.auth))
        self.device = pipelines.pick_device(config.device)
        self.base_pipe = pipelines.load_base_pipeline(config.base_model, self.device,
                                                      pipelines.pick_dtype(config.dtype, self.device))
        self.base_key = pipelines.base_key(config.base_model)
        self.size = pipelines.image_size(self.base_pipe)
        model_defaults = pipelines.defaults_of(config.base_model)
        self.generate_defaults = {
            **DEFAULT_GENERATE,
            "height": self.size, "width": self.size,
            **{k: model_defaults[f"default_{k}"] for k in ("guidance_scale",) if f"default_{k}" in model_defaults},
            **config.generate_defaults,
        }
        if "default_steps" in model_defaults:
            self.generate_defaults.setdefault("num_inference_steps", model_defaults["default_steps"])
        layers = [DEFAULT_FINETUNE, model_defaults.get("finetune_defaults", {}), config.finetune_defaults]
        self.finetune_defaults = {k: v for layer in layers for k, v in layer.items()}
        self.finetune_defaults["per_method"] = {  # merged per method, not replaced wholesale
            m: {k: v for layer in layers for k, v in layer.get("per_method", {}).get(m, {}).items()}
            for m in parsing.METHODS}
        self.finetune_defaults["per_strategy"] = {  # a metamodel strategy's own, merged the same way
            s: {k: v for layer in layers for k, v in layer.get("per_strategy", {}).get(s, {}).items()}
            for s in parsing.METAMODEL_STRATEGIES}
        tok_dir = pipelines.resolve_base(config.base_model)
        self.identifier_pool = identifier_pool(self.base_pipe.tokenizer, f"{tok_dir}/tokenizer")
        self.cache = sampling.PipelineCache(config.cache_max_bytes)
        self.loras = lora.LoraRuntime(self.base_pipe)
        self._trunk_runtimes: dict[str, lora.LoraRuntime] = {}  # "key@trunk version" -> adapters over it
        self._stacks: dict[tuple[str, int], metamodel.Stack] = {}  # committed versions never change
        self._concept_cache: dict[str, dict] = {}  # concept id -> its version's meta and vectors
        self.jobs = JobManager(self.registry, workers=config.train_workers, threads=config.train_threads)
        self._model_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def close(self) -> None:
        self.jobs.close()

    def _model_lock(self, key: str) -> threading.Lock:
        with self._locks_lock:
            return self._model_locks.setdefault(key, threading.Lock())

    # ================================================================== finetune
    def submit_finetune(self, user: str, images: Sequence[Image.Image], params: dict) -> tuple[str, bool]:
        """Validate and queue a finetune; returns (job id, whether the caller asked to wait)."""
        req = parsing.parse_finetune(params, self.finetune_defaults, self.config.limits)
        if not images:
            raise BadRequest("no instance images")
        if req.captions is not None and len(req.captions) != len(images):
            raise BadRequest(f"captions: {len(req.captions)} for {len(images)} images; give one per image")
        job_id = self.registry.create_job(user, req.target, req.category, req.max_train_steps, req.as_params())
        self.jobs.submit(job_id, lambda ctx: self._run_finetune(ctx, user, list(images), req))
        return job_id, req.wait

    def finetune_result(self, job_id: str) -> dict:
        """The finished job's view, or the error it failed with."""
        job = self.registry.get_job(job_id)
        if job["status"] != "succeeded":
            raise _job_error(job)
        return {**self.job_view(job), "method": json.loads(job["params"] or "{}").get("method", "dreambooth")}

    def finetune(self, user: str, images: Sequence[Image.Image], params: dict) -> dict:
        """Blocking finetune (in-process use); with `wait: false` returns the queued job at once."""
        job_id, wait = self.submit_finetune(user, images, params)
        if not wait:
            return {"job_id": job_id, "status": "queued"}
        self.jobs.wait(job_id)
        return self.finetune_result(job_id)

    def _run_finetune(self, ctx: JobContext, user: str, images: list[Image.Image],
                      req: parsing.FinetuneRequest) -> dict:
        concept_id = uuid.uuid4().hex
        key = model_key(req.target, user, concept_id)
        kind = req.target
        with self._model_lock(key):
            model = self.registry.ensure_model(key, kind, None if kind == "meta" else user, self.base_key)
            version = model["current_version"]
            learned = self.registry.concepts_of_model(key) if kind != "private" else []
            taken = self.registry.identifiers_ever_used(key)
            if kind == "private":  # keep a user's private identifiers unambiguous for /generate
                taken |= self._private_words(user)
            if req.overwrite:  # the concept is an existing word's new embedding, private to its owner
                embeddings.word_token(self.base_pipe.tokenizer, req.overwrite)
                if req.overwrite in self._private_words(user):
                    raise Conflict(f"you already have a concept for {req.overwrite!r}; delete it first")
                identifier = req.overwrite
            else:
                identifier = choose_identifier(self.identifier_pool, taken, seed=req.seed,
                                               reserved_words=req.category.split())
            prepared = preprocess.prepare(images, list(req.captions) if req.captions else None, crop=req.crop,
                                          split_oversized=req.split_oversized, flip=req.flip,
                                          hue_copy_count=req.hue_copies)
            if len(prepared.images) > 4 * self.config.limits.max_images * (1 + req.hue_copies):
                raise BadRequest(f"{len(prepared.images) // (1 + req.hue_copies)} training images after tiling and "
                                 f"flipping; at most {4 * self.config.limits.max_images}")

            # A private model learns one concept from the base: nothing earlier to keep.
            strategy = parsing.METAMODEL_STRATEGY_SETTINGS[req.metamodel_strategy] if kind != "private" else \
                parsing.METAMODEL_STRATEGY_SETTINGS["naive"]
            anchor_weight = req.anchor_weight if req.anchor_weight is not None and kind != "private" \
                else strategy["anchor_weight"]
            stack = self._stack(key, version) if kind != "private" else metamodel.EMPTY
            # Concepts that live in adapters are kept by their adapters, not by replay into the trunk.
            in_adapters = {a.concept_id for a in stack.adapters}
            plan = planner.plan_prior_batch(
                req.num_class_images, req.category,
                [planner.EarlierConcept(c["concept_id"], c["identifier"], c["category"]) for c in learned
                 if c["concept_id"] not in in_adapters],
                metamodel=strategy["replay_earlier"])
            log.info("job %s: %s %r into %s v%d; prior plan:\n%s", ctx.job_id, req.method,
                     planner.concept_prompt(identifier, req.category), key, version, planner.describe_plan(plan))
            priors, groups = self._prior_examples(plan)
            prior_groups = groups if strategy.get("balanced") else None

            tok = self.base_pipe.tokenizer
            token_ids = tok(identifier, add_special_tokens=False).input_ids
            embedding = None
            if req.method == "textual_inversion" or (req.method == "lora" and req.train_identifier_embedding):
                n = req.num_vectors if req.method == "textual_inversion" else 1
                start = embeddings.init_vectors(self.base_pipe.text_encoder, tok, req.init_text, n, identifier)
                embedding = embeddings.ConceptEmbedding(identifier, token_ids[0], start)
            # A metamodel's trunk is trained again by its next DreamBooth step; a private model never is, so it is
            # written as it is served (half the disk of an SD UNet in float16).
            stored = pipelines.TRUNK_DTYPE if kind != "private" else self.base_pipe.unet.dtype
            fresh = req.method == "dreambooth" and stored != self.base_pipe.unet.dtype
            unet, text_encoder, own_text = self._training_modules(
                key, stack.trunk_version if kind != "private" else version, stored if fresh else None)
            result = loop.dreambooth(
                vae=self.base_pipe.vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                noise_scheduler=self._noise_scheduler(),
                instances=_examples(prepared.images, identifier, req.category, prepared.captions,
                                    req.prompt_templates), priors=priors,
                learning_rate=req.learning_rate, max_train_steps=req.max_train_steps,
                train_batch_size=req.train_batch_size, prior_loss_weight=req.prior_loss_weight,
                train_text_encoder=req.train_text_encoder if req.method == "dreambooth" else req.lora_text_encoder,
                seed=req.seed, size=self.size,
                prior_batch_size=req.train_batch_size * strategy["prior_batch_factor"], anchor_weight=anchor_weight,
                train_token_ids=token_ids if req.train_identifier_embedding and req.method == "dreambooth" else (),
                embedding_learning_rate=req.embedding_learning_rate,
                lora=loop.LoraSettings(req.lora_rank, req.lora_alpha, req.lora_text_encoder, req.lora_targets)
                if req.method == "lora" else None,
                embedding=embedding, train_unet=req.method != "textual_inversion", prior_groups=prior_groups,
                lr_scheduler=req.lr_scheduler, lr_warmup_steps=req.lr_warmup_steps, snr_gamma=req.snr_gamma,
                mixed_precision=loop.mixed_precision_for(self.base_pipe.unet.dtype, self.device),
                modules_are_copies=fresh,
                progress=ctx.progress, should_stop=ctx.should_stop)

            staging = self.ws.new_staging_dir()
            try:
                meta = {"model_key_kind": kind, "base": self.base_key, "version": version + 1, "method": req.method,
                        "identifier": identifier, "category": req.category,
                        "prior_plan": [dataclasses.asdict(s) for s in plan], "n_training_images": len(prepared.images),
                        "train_seconds": result.seconds, "final_loss": result.final_loss}
                if kind != "private":
                    meta.update((metamodel.after_adapter(stack, metamodel.Adapter(version + 1, concept_id, identifier))
                                 if req.method == "lora" else metamodel.after_trunk(stack, version + 1)).to_meta(),
                                metamodel_strategy=req.metamodel_strategy)
                if req.method == "dreambooth":
                    new_text = result.text_encoder if result.text_encoder is not None else (text_encoder if own_text else None)
                    pipelines.save_version(staging, pipelines.as_dtype(result.unet, stored),
                                           pipelines.as_dtype(new_text, stored), meta)
                else:
                    if req.method == "lora":
                        lora.save_lora(staging, result.lora_unet, result.lora_text_encoder, result.lora_metadata)
                        meta.update(lora_rank=req.lora_rank, lora_alpha=req.lora_alpha, lora_targets=req.lora_targets)
                    if result.embedding is not None:
                        lora.save_embedding(staging, identifier, result.embedding, token_id=token_ids[0],
                                                steps=req.max_train_steps, base=self.base_key,
                                                a1111=req.method == "textual_inversion")
                        meta.update(num_vectors=int(result.embedding.shape[0]), overwrite=bool(req.overwrite))
                    pipelines.save_version(staging, None, None, meta)
                self.ws.save_instances(concept_id, prepared.images,
                                       list(prepared.captions) if any(prepared.captions) else None)
                path = self.ws.publish_version(staging, key, version + 1)
                staging = None
                self.registry.commit_version(key, version + 1, path, ctx.job_id, {
                    "concept_id": concept_id, "owner": user, "target": kind, "identifier": identifier,
                    "category": req.category, "n_images": len(images), "params": req.as_params()})
            except Exception:
                self.ws.discard(staging)
                if self.registry.get_concept(concept_id) is None:
                    self.ws.delete_instances(concept_id)
                    self.ws.discard(self.ws.version_dir(key, version + 1))
                raise
        return {"concept_id": concept_id, "identifier": identifier, "model_version": version + 1,
                "loss": result.final_loss}

    def _private_words(self, user: str) -> set[str]:
        """The words of the user's private concepts (identifiers and overwritten words), unique per user."""
        return {c["identifier"] for c in self.registry.list_concepts(owner=user)
                if c["target"] == "private" and c["owner"] == user}

    def _noise_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.base_pipe.scheduler.config)

    def _modules_at(self, key: str, version: int):
        if version == 0:
            return self.base_pipe.unet, self.base_pipe.text_encoder
        pipe = self._pipeline_for(key, version)
        return pipe.unet, pipe.text_encoder

    def _training_modules(self, key: str, version: int, stored_dtype: torch.dtype | None):
        """What a job trains from, and whether that version has a text encoder of its own: the served modules, or
        with `stored_dtype` (a trunk rewritten and stored in a higher precision than it is served in) the stored
        weights in that dtype, loaded for the job alone, so that version after version of DreamBooth keeps every
        update (adapters and embeddings learn against the trunk as it is served)."""
        if stored_dtype is None:
            unet, text = self._modules_at(key, version)
            return unet, text, text is not self.base_pipe.text_encoder
        trunk = self._stack(key, version).trunk_version if version else 0
        base = self.config.base_model
        unet, text = (pipelines.load_version_modules(self._version_path(key, trunk), self.base_pipe, stored_dtype)
                      if trunk else (pipelines.load_base_module(base, "unet", self.device, stored_dtype), None))
        own_text = text is not None
        if text is None:
            text = pipelines.load_base_module(base, "text_encoder", self.device, stored_dtype)
        return unet, text, own_text

    def prior_class_images(self, category: str, n: int) -> list[Image.Image]:
        """The first `n` prior-preservation images of "a {category}" from the base model, generated once and
        shared by every user and model (a benchmark calls it to make them before it times training)."""
        return class_images.ensure_class_images(
            self.ws, self.base_key, lambda: pipelines.compose(self.base_pipe), category, n, size=self.size,
            steps=self.config.class_image_steps, guidance_scale=self.generate_defaults["guidance_scale"],
            batch=self.config.generation_batch)[0]

    def _prior_examples(self, plan: Sequence[planner.PriorSlot]) -> tuple[list[loop.TrainExample], list[int]]:
        """The prior examples of a plan, and for each the index of the slot (group) it fills."""
        out: list[loop.TrainExample] = []
        groups: list[int] = []
        for group, slot in enumerate(plan):
            if slot.kind == "class":
                out += [loop.TrainExample(im, slot.prompt) for im in self.prior_class_images(slot.category, slot.count)]
            else:  # an earlier concept, replayed with the prompts it was taught with
                earlier = _examples(self.ws.load_instances(slot.concept_id), slot.identifier, slot.category,
                                    self.ws.load_captions(slot.concept_id))
                out += [earlier[i % len(earlier)] for i in range(slot.count if earlier else 0)]
            groups += [group] * (len(out) - len(groups))
        return out, groups

    # ================================================================== generate
    def resolve_model(self, user: str, target: str, identifier: str | None,
                      version: int | None = None) -> tuple[str, int]:
        """(model key, version) the caller may generate with; NotFound hides others' concepts.

        `version` picks an earlier version of a metamodel (every committed version is kept), e.g. to
        reproduce an image; by default the current one.
        """
        if target == "pretrained":
            if version:
                raise NotFound("the pretrained model has no versions")
            return "pretrained", 0
        if target == "private":
            if not identifier:
                raise BadRequest("target_model 'private' needs the concept's `identifier`")
            c = self.registry.find_concept(owner=user, target="private", identifier=identifier)
            if c is None or (version is not None and version != c["version"]):
                raise NotFound(f"you have no private concept {identifier!r}" +
                               (f" at version {version}" if c is not None else ""))
            return c["model_key"], c["version"]
        key = model_key(target, user)
        m = self.registry.get_model(key)
        current = m["current_version"] if m else 0
        if version is None or version == current:
            return key, current
        if version > current or (version > 0 and self.registry.version_path(key, version) is None):
            raise NotFound(f"{target} has no version {version} (current: {current})")
        return key, version

    def _version_path(self, key: str, version: int) -> str:
        path = self.registry.version_path(key, version)
        if path is None:
            raise NotFound("model version not found")
        return path

    def _stack(self, key: str, version: int) -> metamodel.Stack:
        """A version's trunk and adapters (a private concept's version is its own trunk)."""
        if version == 0:
            return metamodel.EMPTY
        if key.startswith("private:"):
            return metamodel.Stack(version)
        stack = self._stacks.get((key, version))
        if stack is None:
            stack = metamodel.stack_of(lora.read_meta(self._version_path(key, version)), version)
            self._stacks[(key, version)] = stack
        return stack

    def _pipeline_for(self, key: str, version: int):
        """The pipeline of a version's trunk (a metamodel version's adapters are applied per prompt by
        `_render_routed`)."""
        trunk = self._stack(key, version).trunk_version
        if trunk == 0:
            return self.base_pipe

        def load():
            unet, text = pipelines.load_version_modules(self._version_path(key, trunk), self.base_pipe)
            return pipelines.compose(self.base_pipe, unet=unet, text_encoder=text), pipelines.module_bytes(unet, text)

        return self.cache.get(f"{key}@{trunk}", load)

    def _trunk_loras(self, key: str, trunk: int) -> lora.LoraRuntime:
        """Where a metamodel's adapters are loaded: the shared base runtime when the trunk is the base, else
        one runtime per trunk (a copy of its UNet; the two most recently used trunks are kept)."""
        if trunk == 0:
            return self.loras
        name = f"{key}@{trunk}"
        with self._locks_lock:
            runtime = self._trunk_runtimes.pop(name, None) or lora.LoraRuntime(self._pipeline_for(key, trunk))
            self._trunk_runtimes[name] = runtime
            while len(self._trunk_runtimes) > 2:
                self._trunk_runtimes.pop(next(iter(self._trunk_runtimes)))
        return runtime

    def generate(self, user: str, prompts: Sequence[str], params: dict) -> list[sampling.GeneratedImage]:
        """Images for the prompts; `parameters` (a generated PNG's text) reproduces that image, and any
        parameter passed beside it overrides the text's value."""
        if params.get("parameters"):
            text_prompt, from_text = infotext.request_from_infotext(params["parameters"])
            params = {**from_text, **{k: v for k, v in params.items() if k != "parameters"}}
            prompts = list(prompts) or [text_prompt]
        req, prompts = self._generate_request(params, prompts)
        if not prompts:
            raise BadRequest("send at least one prompt document")
        if len(prompts) * req.num_images > 4 * self.config.limits.max_num_images:
            raise BadRequest("too many images in one request")
        return self._render(user, req, sampling.prompt_specs(
            prompts, num_images=req.num_images, seed=req.seed, guidance_scale=req.guidance_scale,
            num_inference_steps=req.num_inference_steps))

    def render(self, user: str, specs: Sequence[sampling.ImageSpec], params: dict) -> list[sampling.GeneratedImage]:
        """One image per spec (prompt, seed, guidance, steps) with the model and options of `params`, exactly as
        /generate makes it: how benchmarks score what the service serves."""
        req, _ = self._generate_request(params, [])
        if len(specs) > 4 * self.config.limits.max_num_images:
            raise BadRequest("too many images in one request")
        return self._render(user, req, list(specs))

    def _generate_request(self, params: dict, prompts: Sequence[str]):
        """The parsed generation parameters and the checked prompts, shared by /generate, /sweep and /grid."""
        req = parsing.parse_generate(params, self.generate_defaults, self.config.limits)
        return req, [parsing.prompt_of(p, self.config.limits) for p in prompts]

    def _render(self, user: str, req: parsing.GenerateRequest,
                specs: list[sampling.ImageSpec]) -> list[sampling.GeneratedImage]:
        if req.target == "private":
            return self._render_personal(user, req, specs)
        if any(prompting.lora_tags(s.prompt)[1] for s in specs):
            raise BadRequest("<lora:...> tags pick private LoRA concepts: use target_model 'private'")
        key, version = self.resolve_model(user, req.target, req.identifier, req.model_version)
        stack = self._stack(key, version) if req.target != "pretrained" else metamodel.EMPTY
        if stack.adapters:
            return self._render_routed(key, stack, req, specs, version=version, label=req.target)
        return self._render_with(self._pipeline_for(key, version), req, specs, version=version, label=req.target)

    def _render_routed(self, key: str, stack: metamodel.Stack, req, specs: list[sampling.ImageSpec], *,
                       version: int, label: str) -> list[sampling.GeneratedImage]:
        """A metamodel version with adapters: each prompt gets the adapters (and embeddings) of the concepts it
        names, over the trunk; a prompt naming none gets the trunk alone, and each `AND` part of a composable
        prompt gets its own. An image depends on its own spec only, so rendering the groups separately changes
        no image."""
        out: list[sampling.GeneratedImage | None] = [None] * len(specs)
        plain, composed = _split_composed(specs)
        for prompt, idx in composed.items():
            parts = []
            for text, weight in prompting.composable_parts(prompt):
                model, embeds = self._route_model(key, stack, version, text)
                parts.append(sampling.PromptPart(model, text, weight, embeds))
            images = self._render_parts(parts, req, [specs[i] for i in idx], version=version, label=label)
            for i, image in zip(idx, images):
                out[i] = image
        for adapters, group in metamodel.group_by_route([specs[i].prompt for i in plain], stack.adapters).items():
            idx = [plain[j] for j in group]
            chunk = [specs[i] for i in idx]
            if not adapters:
                images = self._render_with(self._pipeline_for(key, version), req, chunk, version=version, label=label)
            else:
                embeds, loras = self._route_adapters(key, adapters)
                runtime = self._trunk_loras(key, stack.trunk_version)
                images = self._render_loras(key, stack.trunk_version, runtime, loras, req, chunk, version=version,
                                            label=label, embeds=embeds)
            for i, image in zip(idx, images):
                out[i] = image
        return out

    def _route_adapters(self, key: str, adapters) -> tuple[dict, list[tuple[str, str, float]]]:
        """The embeddings and the (adapter name, folder, weight 1) of a route's metamodel adapters."""
        concepts = [({"concept_id": a.concept_id, "identifier": a.identifier, "model_key": key,
                      "version": a.version}) for a in adapters]
        metas = [self._concept_meta(c) for c in concepts]
        embeds = dict(e for c, m in zip(concepts, metas) if (e := self._concept_embedding(c, m)) is not None)
        return embeds, [(lora.LoraRuntime.adapter_name(c["concept_id"]), m["path"], 1.0)
                        for c, m in zip(concepts, metas)]

    def _route_model(self, key: str, stack: metamodel.Stack, version: int, prompt: str):
        """(pipeline, embeddings) that serve one `AND` part of a metamodel prompt. Parts denoise side by side,
        so a part's adapters are always merged into their own UNet copy (even with `fuse_adapters: false`)."""
        adapters = metamodel.route(prompt, stack.adapters)
        if not adapters:
            return self._pipeline_for(key, version), None
        embeds, loras = self._route_adapters(key, adapters)
        fused = self._fused_route(key, stack.trunk_version, self._trunk_loras(key, stack.trunk_version), loras,
                                  force=True)
        if fused is None:
            raise BadRequest("an AND part's concepts must merge into the UNet (no text-encoder LoRA, DoRA or "
                             f"adapted embedding): {', '.join(a.identifier for a in adapters)} do not; "
                             "send the parts as separate prompts")
        return fused, embeds

    def _render_loras(self, key: str, trunk: int, runtime: lora.LoraRuntime, loras, req, specs, *,
                      version: int, label: str, embeds):
        """Images through these (name, folder, weight) adapters over a trunk: merged into a cached copy where
        they can be, else through the runtime's unmerged layers."""
        fused = self._fused_route(key, trunk, runtime, loras)
        if fused is not None:  # read-only, like any cached version: no lock held while rendering
            return self._render_with(fused, req, specs, version=version, label=label, embeds=embeds)
        with runtime.lock:  # the adapter set is this request's until its images are made
            return self._render_with(runtime.activate(loras), req, specs, version=version, label=label,
                                     embeds=embeds)

    def _fused_route(self, key: str, trunk: int, runtime: lora.LoraRuntime, loras, force: bool = False):
        """The trunk with this route's adapters merged, cached beside the loaded versions (None: not fused).
        `key` "base" with trunk 0: private LoRA concepts over the base model. `force`: merge even with
        `fuse_adapters` off (the `AND` parts of one prompt need their UNets at the same time)."""
        if not (self.config.fuse_adapters or force):
            return None
        loras = sorted(loras)  # one merged copy (and one summation order) per set, however a request lists it

        def load():
            unet = runtime.fused_unet(loras)
            if unet is None:
                return None, 0
            return pipelines.compose(runtime.base_pipe, unet=unet), pipelines.module_bytes(unet)

        route = "+".join(f"{name}*{weight}" for name, _, weight in loras)
        return self.cache.get(f"{key}@{trunk}+{route}", load)

    def _render_with(self, model, req, specs, *, version: int, label: str, embeds=None):
        """Images through one pipeline; the `AND` parts of a composable prompt all go through it too."""
        # A fresh scheduler per call: calls can overlap, and the choice is this request's only.
        scheduler = schedulers.make(schedulers.SAMPLERS[req.scheduler], model.scheduler.config) if req.scheduler else None
        out: list[sampling.GeneratedImage | None] = [None] * len(specs)
        plain, composed = _split_composed(specs)
        if plain:
            images = sampling.render(
                pipelines.compose(model, scheduler=scheduler), [specs[i] for i in plain],
                negative_prompt=req.negative_prompt, height=req.height, width=req.width, model_version=version,
                emphasis=req.emphasis, model_label=label, embeddings=embeds, max_batch=self.config.generation_batch)
            for i, image in zip(plain, images):
                out[i] = image
        for prompt, idx in composed.items():
            parts = [sampling.PromptPart(model, text, weight, embeds)
                     for text, weight in prompting.composable_parts(prompt)]
            for i, image in zip(idx, self._render_parts(parts, req, [specs[i] for i in idx], version=version,
                                                        label=label)):
                out[i] = image
        return out

    def _render_parts(self, parts, req, specs, *, version: int, label: str):
        """Images of one composable prompt whose parts are already routed; the sampler from the first part's config."""
        scheduler = schedulers.make(schedulers.SAMPLERS[req.scheduler], parts[0].pipe.scheduler.config) \
            if req.scheduler else None
        return sampling.render_composed(parts, specs, scheduler=scheduler, negative_prompt=req.negative_prompt,
                                          height=req.height, width=req.width, model_label=label,
                                          model_version=version, emphasis=req.emphasis,
                                          max_batch=self.config.generation_batch)

    # ================================================================== private concepts
    def private_concepts_for(self, user: str, names: Sequence[str], prompts: Sequence[str]) -> list[dict]:
        """The caller's private concepts a request uses: those it names, else those whose word is in a prompt
        (an `overwrite` concept's word is an ordinary word, so it applies only when named)."""
        mine = [c for c in self.registry.list_concepts(owner=user) if c["target"] == "private" and c["owner"] == user]
        if names:
            by_word = {c["identifier"]: c for c in mine}  # oldest first: the newest of a word wins
            missing = [n for n in names if n not in by_word]
            if missing:
                raise NotFound(f"you have no private concept {missing[0]!r}")
            return [by_word[n] for n in names]
        words = {w for p in prompts for w in re.findall(r"[A-Za-z0-9_\-]+", p)}
        found = [c for c in mine if c["identifier"] in words and not self._concept_meta(c).get("overwrite")]
        if not found:
            raise BadRequest("target_model 'private' needs `identifier` (or `identifiers`), or a prompt that uses "
                             "one of your private concepts' words")
        return found

    def _concept_meta(self, concept: dict) -> dict:
        """A private (or metamodel adapter) concept's `big_version.json`, folder and embedding vectors (None
        without), read once: a committed version never changes, and every /generate with the concept needs them."""
        cached = self._concept_cache.get(concept["concept_id"])
        if cached is None:
            path = self.registry.version_path(concept["model_key"], concept["version"])
            if path is None:
                raise NotFound("concept files not found")
            cached = {**lora.read_meta(path), "path": path, "vectors": lora.load_embedding(path)}
            self._concept_cache[concept["concept_id"]] = cached
        return cached

    def _concept_embedding(self, concept: dict, meta: dict):
        if meta["vectors"] is None:
            return None
        return lora.embedding_for(self.base_pipe.tokenizer, concept["identifier"], meta["vectors"], self.device,
                                      self.base_pipe.text_encoder.dtype)

    def _render_personal(self, user: str, req: parsing.GenerateRequest,
                         specs: list[sampling.ImageSpec]) -> list[sampling.GeneratedImage]:
        """Base model + the request's private concepts: at most one DreamBooth concept (a whole UNet), or
        any number of LoRA adapters, plus any number of embeddings."""
        prompts = sorted({s.prompt for s in specs})
        tags: dict[str, float] = {}
        for prompt in prompts:
            for name, weight in prompting.lora_tags(prompt)[1].items():
                if tags.setdefault(name, weight) != weight:
                    raise BadRequest(f"<lora:{name}> has two weights in one request")
        named = tuple(dict.fromkeys(list(req.identifiers) + list(tags))) if req.identifiers else ()
        concepts = self.private_concepts_for(user, named, prompts)
        unknown = sorted(set(tags) - {c["identifier"] for c in concepts})
        if unknown:
            raise NotFound(f"you have no private concept {unknown[0]!r} (from <lora:{unknown[0]}>)")
        if req.model_version not in (None, 1):
            raise NotFound(f"private concepts have one version (1), not {req.model_version}")
        metas = [self._concept_meta(c) for c in concepts]
        full = [c for c, m in zip(concepts, metas) if m.get("method", "dreambooth") == "dreambooth"]
        loras = [(c, m) for c, m in zip(concepts, metas) if m.get("method") == "lora"]
        if len(full) > 1:
            raise BadRequest("one DreamBooth concept per request (each is a whole UNet); LoRA and embedding "
                             "concepts combine with each other and with one DreamBooth concept's prompt")
        if full and loras:
            raise BadRequest("LoRA concepts apply to the base model, not on top of a DreamBooth concept")
        embeds = dict(e for c, m in zip(concepts, metas) if (e := self._concept_embedding(c, m)) is not None)
        label = "private:" + "+".join(c["identifier"] for c in concepts)
        if full:
            return self._render_with(self._pipeline_for(full[0]["model_key"], full[0]["version"]), req, specs,
                                     version=1, label=label, embeds=embeds)
        if not loras:
            return self._render_with(self.base_pipe, req, specs, version=1, label=label, embeds=embeds)
        adapters = [(lora.LoraRuntime.adapter_name(c["concept_id"]), m["path"], tags.get(c["identifier"], 1.0))
                    for c, m in loras]
        return self._render_loras("base", 0, self.loras, adapters, req, specs, version=1, label=label, embeds=embeds)

    def sweep(self, user: str, prompts: Sequence[str], params: dict) -> tuple[list[sampling.GeneratedImage], bytes]:
        """One prompt, one seed, one parameter over a range: the frames and an animated GIF of them."""
        req, prompts = self._generate_request(params, prompts)
        if len(prompts) != 1:
            raise BadRequest("a sweep takes exactly one prompt document")
        lim = self.config.limits
        parameter = parsing.given(params, "sweep", "guidance_scale")
        values = studio.sweep_values(parameter, params.get("values"), params.get("start"), params.get("stop"),
                                     params.get("num"), max_frames=lim.max_grid_images,
                                     max_steps=lim.max_inference_steps, max_guidance=lim.max_guidance_scale)
        seed = req.seed if req.seed is not None else sampling.seeds_for(None, 1)[0]
        specs = studio.sweep_specs(prompts[0], seed, parameter, values, guidance_scale=req.guidance_scale,
                                   num_inference_steps=req.num_inference_steps)
        frames = self._render(user, req, specs)
        return frames, studio.gif_bytes(frames, [studio.frame_label(parameter, v) for v in values])

    def grid(self, user: str, prompts: Sequence[str], params: dict) -> tuple[list[sampling.GeneratedImage], bytes]:
        """Prompts x guidance scales x steps x seeds (or `random_samples` around the setting): the images
        and a captioned contact sheet, a row per prompt."""
        req, prompts = self._generate_request(params, prompts)
        if not prompts:
            raise BadRequest("send at least one prompt document")
        lim = self.config.limits
        seed = req.seed if req.seed is not None else sampling.seeds_for(None, 1)[0]
        n_random = parsing.number(params, "random_samples", None, 1, lim.max_grid_images, integer=True)
        if not n_random:
            guidance = parsing.number_list(params, "guidance_scales", [req.guidance_scale], 0.0,
                                              lim.max_guidance_scale, integer=False)
            steps = parsing.number_list(params, "steps", [req.num_inference_steps], 1, lim.max_inference_steps,
                                           integer=True)
            seeds = parsing.number_list(params, "seeds", None, 0, 2**31 - 1, integer=True) or \
                sampling.seeds_for(seed, parsing.number(params, "num_seeds", 1, 1, lim.max_grid_images,
                                                             integer=True))
        # Counted before the grid is built: long lists must not take the server's memory.
        size = len(prompts) * (n_random or len(guidance) * len(steps) * len(seeds))
        if size > lim.max_grid_images:
            raise BadRequest(f"a grid has at most {lim.max_grid_images} images (this one: {size})")
        if n_random:
            specs = studio.random_specs(
                prompts, n_random, seed=seed, guidance_scale=req.guidance_scale,
                num_inference_steps=req.num_inference_steps,
                guidance_spread=parsing.number(params, "guidance_spread", 0.5, 0.0, 1.0, integer=False),
                steps_spread=parsing.number(params, "steps_spread", 0.5, 0.0, 1.0, integer=False),
                max_steps=lim.max_inference_steps, max_guidance=lim.max_guidance_scale)
        else:
            specs = studio.grid_specs(prompts, guidance, steps, seeds)
        images = self._render(user, req, specs)
        return images, studio.sheet_png(images, columns=len(specs) // len(prompts))

    # ================================================================== export, import
    EXPORT_FORMATS = ("all", "diffusers", "a1111")

    def export(self, user: str, identifier: str, fmt: str = "all") -> list[tuple[str, bytes]]:
        """A private concept's files as other tools read them: (file name, bytes)."""
        if fmt not in self.EXPORT_FORMATS:
            raise BadRequest(f"format must be one of {', '.join(self.EXPORT_FORMATS)}")
        c = self.registry.find_concept(owner=user, target="private", identifier=identifier)
        if c is None:
            raise NotFound(f"you have no private concept {identifier!r}")
        meta = self._concept_meta(c)
        files = lora.concept_files(meta["path"])
        if fmt == "diffusers":
            files = [f for f in files if not f.endswith(".pt")]
        elif fmt == "a1111":
            files = [f for f in files if f.endswith(".pt")]
            if not files:
                raise BadRequest("the AUTOMATIC1111 format is for embeddings (textual_inversion concepts)")
        size = sum(os.path.getsize(os.path.join(meta["path"], f)) for f in files)
        if size > self.config.limits.max_export_bytes:
            raise BadRequest(f"this concept is {size / 2**20:.0f} MiB (a DreamBooth concept is a whole UNet); the "
                             f"export limit is {self.config.limits.max_export_bytes / 2**20:.0f} MiB: train it as LoRA")
        out = []
        for f in files:
            with open(os.path.join(meta["path"], f), "rb") as fh:
                out.append((f, fh.read()))
        return out

    def import_concept(self, user: str, files: Sequence[tuple[str, bytes]], params: dict) -> dict:
        """A LoRA file and/or an embedding file from another tool (or /export) as a new private concept."""
        lim = self.config.limits
        category = parsing.category_of(params)
        if not files or len(files) > 2:
            raise BadRequest("send one LoRA file, one embedding file, or one of each")
        lora_state, lora_bytes, embedding = None, None, None
        for name, data in files:
            if not data:
                raise BadRequest(f"{name or 'a file'} is empty")
            if len(data) > lim.max_import_bytes:
                raise BadRequest(f"{name}: {len(data) / 2**20:.1f} MiB; the import limit is "
                                 f"{lim.max_import_bytes / 2**20:.0f} MiB")
            state = lora.read_lora_bytes(data)
            if state is not None:
                if lora_state is not None:
                    raise BadRequest("one LoRA file per concept")
                lora_state, lora_bytes = state, data
            else:
                if embedding is not None:
                    raise BadRequest("one embedding file per concept")
                dim = self.base_pipe.text_encoder.get_input_embeddings().weight.shape[1]
                embedding = embeddings.read_embedding_file(data, name or "", dim)[1]
        concept_id = uuid.uuid4().hex
        key = model_key("private", user, concept_id)
        mine = self._private_words(user)
        identifier = params.get("identifier")
        if identifier is not None:
            identifier = parsing.word_of(identifier, "identifier must be one lowercase word")
            embeddings.word_token(self.base_pipe.tokenizer, identifier)
            if identifier in mine:
                raise Conflict(f"you already have a concept {identifier!r}")
        else:
            identifier = choose_identifier(self.identifier_pool, mine, reserved_words=category.split())
        adapter = lora.LoraRuntime.adapter_name(concept_id)
        method = "lora" if lora_state is not None else "textual_inversion"
        names = [name for name, _ in files]
        if lora_state is not None:
            with self.loras.lock:  # the real check: do the keys and shapes fit this base model?
                self.loras.check(adapter, lora_state)
        staging = self.ws.new_staging_dir()
        try:
            if lora_state is not None:
                lora.write_lora_bytes(staging, lora_bytes)
            if embedding is not None:
                token_id = embeddings.word_token(self.base_pipe.tokenizer, identifier)
                lora.save_embedding(staging, identifier, embedding, token_id=token_id, steps=0,
                                        base=self.base_key, a1111=lora_state is None)
            pipelines.save_version(staging, None, None, {
                "model_key_kind": "private", "base": self.base_key, "version": 1, "identifier": identifier,
                "category": category, "method": method, "imported": names,
                "num_vectors": int(embedding.shape[0]) if embedding is not None else 0})
            with self._model_lock(key):
                self.registry.ensure_model(key, "private", user, self.base_key)
                path = self.ws.publish_version(staging, key, 1)
                staging = None
                self.registry.commit_version(key, 1, path, None, {
                    "concept_id": concept_id, "owner": user, "target": "private", "identifier": identifier,
                    "category": category, "n_images": 0, "params": {"imported": names}})
        except Exception:
            self.ws.discard(staging)
            if self.registry.get_concept(concept_id) is None:
                self.ws.discard(self.ws.model_dir(key))
            raise
        return {"identifier": identifier, "category": category, "target": "private", "model_version": 1,
                "method": method}

    # ================================================================== concepts, delete, jobs
    def concepts(self, user: str) -> list[dict]:
        out = []
        for c in self.registry.list_concepts(owner=user):
            out.append({"identifier": c["identifier"], "category": c["category"], "target_model": c["target"],
                        "model_version": c["version"], "prompt": f"a {c['identifier']} {c['category']}",
                        "mine": c["owner"] == user, "n_images": c["n_images"],
                        "method": self._concept_meta(c).get("method", "dreambooth")})
        return out

    def delete(self, user: str, identifier: str) -> dict:
        c = self.registry.find_concept(owner=user, target="private", identifier=identifier)
        if c is None:
            raise NotFound(f"you have no private concept {identifier!r} (metamodel concepts cannot be unlearned)")
        with self._model_lock(c["model_key"]):
            self.registry.mark_concept_deleted(c["concept_id"])
            adapter = lora.LoraRuntime.adapter_name(c["concept_id"])
            # Its loaded version, and every merged route that contains its adapter.
            self.cache.drop(lambda k: k.startswith(f"{c['model_key']}@") or f"+{adapter}*" in k)
            self.loras.drop(adapter)
            self._concept_cache.pop(c["concept_id"], None)
            self.ws.discard(self.ws.model_dir(c["model_key"]))
            self.ws.delete_instances(c["concept_id"])
        return {"identifier": identifier, "deleted": True}

    def job_view(self, job: dict) -> dict:
        keys = ("job_id", "status", "step", "total_steps", "loss", "eta_s", "error", "identifier", "category",
                "target", "model_version", "concept_id")
        return {k: job.get(k) for k in keys}

    def job(self, user: str, job_id: str, cancel: bool = False) -> dict:
        job = self.registry.get_job(job_id)
        if job is None or job["owner"] != user:
            raise NotFound("no such job")
        if cancel and job["status"] in ("queued", "running"):
            self.jobs.cancel(job_id)
            job = self.registry.get_job(job_id)
        return self.job_view(job)

    def list_jobs(self, user: str) -> list[dict]:
        return [self.job_view(j) for j in self.registry.list_jobs(user)]


def _split_composed(specs) -> tuple[list[int], dict[str, list[int]]]:
    """Indices of the plain specs, and of each composable (`AND`) prompt's specs."""
    plain, composed = [], {}
    for i, s in enumerate(specs):
        if len(prompting.composable_parts(s.prompt)) > 1:
            composed.setdefault(s.prompt, []).append(i)
        else:
            plain.append(i)
    return plain, composed


def _examples(images, identifier: str, category: str, captions, templates=None) -> list[loop.TrainExample]:
    """A concept's training examples: every image with "a {id} {category}", and a captioned image also with
    "a {id} {category} of {caption}", so both the bare and the composed use are taught. With prompt
    templates, every image is taught with every template instead."""
    out = []
    for im, caption in zip(images, captions or [None] * len(images)):
        if templates:
            out += [loop.TrainExample(im, preprocess.fill_template(t, name=identifier, category=category,
                                                                       filewords=caption)) for t in templates]
            continue
        out.append(loop.TrainExample(im, planner.concept_prompt(identifier, category)))
        if caption:
            out.append(loop.TrainExample(im, planner.concept_prompt(identifier, category, caption)))
    return out


def _job_error(job: dict) -> Exception:
    text = job.get("error") or "training failed"
    if job["status"] == "cancelled":
        return JobCancelled(text)
    for cls in (BadRequest, Conflict, NotFound):
        if text.startswith(f"[{cls.code}]"):
            return cls(text.split("] ", 1)[1])
    return BIGError(f"finetune failed: {text}")

