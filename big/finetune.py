"""One finetune job: the word, the prepared images, the prior plan, training, and the version committed.

A job runs under its model key's lock, trains from that key's current version, and publishes the next version
with one registry transaction; a failure at any point leaves the previous version serving and nothing of the
new one on disk.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
import uuid
from typing import Sequence

from PIL import Image

from big import failpoints, parsing
from big.errors import BadRequest, Conflict
from big.jobs import JobContext, job_error, job_view
from big.models import ModelStore, model_key
from big.storage.registry import Registry, RequestSeen
from big.storage.versions import EmbeddingWeights, LoraWeights, VersionMeta, publish, write_version
from big.storage.workspace import Workspace
from big.training import class_images, loop, memory, planner, preprocess
from big.training.identifiers import choose_identifier
from big.weights import embeddings, metamodel, pipelines
from big.weights.metamodel import METAMODEL_STRATEGY_SETTINGS

log = logging.getLogger(__name__)


def concept_examples(images, identifier: str, category: str, captions, templates=None) -> list[loop.TrainExample]:
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


def request_hash(req: parsing.FinetuneRequest, images: Sequence[Image.Image]) -> str:
    """What a retry of a /finetune request has in common with its first try: its parsed parameters and its images'
    pixels (sha256), so a key reused for another request is told apart. Whether the caller waits is no part of
    what is trained: a retry may wait where its first try did not."""
    trained = {k: v for k, v in req.as_params().items() if k != "wait"}
    h = hashlib.sha256(json.dumps(trained, sort_keys=True, default=str).encode())
    for im in images:
        h.update(f"{im.mode}:{im.size}".encode())
        h.update(im.tobytes())
    return h.hexdigest()


def refuse_text_encoder_training_on_xl(req: parsing.FinetuneRequest, params: dict) -> None:
    """SDXL's text encoders' own weights stay frozen (diffusers has no SDXL DreamBooth script that trains them; its
    SDXL DreamBooth-LoRA script trains LoRA on both, as `lora_text_encoder` does here): options that would train
    them are refused before the job is queued. A DreamBooth job's identifier embedding is on by default elsewhere
    and off here; asking for it is refused."""
    asked = []
    if req.method == "dreambooth" and req.train_text_encoder:
        asked.append("train_text_encoder")
    if req.method == "dreambooth" and params.get("train_identifier_embedding") is True:
        asked.append("train_identifier_embedding")
    if asked:
        raise BadRequest(f"{', '.join(asked)}: on an SDXL model the text encoders' own weights stay frozen; a "
                         "concept's word is learned by method 'lora' (its identifier embedding, and LoRA of both text "
                         "encoders with lora_text_encoder) or 'textual_inversion'")


class Finetuner:
    def __init__(self, store: ModelStore, registry: Registry, ws: Workspace, *, defaults: dict,
                 identifier_pool, base_key: str, size: int, class_image_steps: int, guidance_scale: float):
        self.store, self.registry, self.ws = store, registry, ws
        self.config = store.config
        self.defaults = defaults
        self.identifier_pool = identifier_pool
        self.base_key = base_key
        self.size = size
        self.class_image_steps = class_image_steps
        self.guidance_scale = guidance_scale

    @property
    def base_pipe(self):
        return self.store.base_pipe

    def submit(self, user: str, images: Sequence[Image.Image], params: dict) -> tuple[str, bool]:
        """Validate, store the images and queue a finetune (a row of the registry that any worker may run);
        returns (job id, whether the caller asked to wait)."""
        req = parsing.parse_finetune(params, self.defaults, self.config.limits)
        if self.store.text_side.xl:
            refuse_text_encoder_training_on_xl(req, params)
        if not images:
            raise BadRequest("no instance images")
        if req.captions is not None and len(req.captions) != len(images):
            raise BadRequest(f"captions: {len(req.captions)} for {len(images)} images; give one per image")
        key = parsing.request_key_of(params)
        request_key = None
        if key is not None:
            request_key = (key, request_hash(req, images), self.config.request_key_ttl_s)
            try:  # before the quota, which the first try's job already counts in
                self.registry.seen_request(user, *request_key)
            except RequestSeen as seen:
                return self._seen(seen, key), req.wait
        if req.target == "private":  # the jobs already queued for it will add theirs too
            self.store.check_quota(user, new_concepts=1 + self.registry.count_jobs(user, target="private"))
        job_id, concept_id = uuid.uuid4().hex, uuid.uuid4().hex
        self.ws.save_job_inputs(job_id, list(images))
        try:
            self.registry.create_job(user, req.target, req.category, req.max_train_steps, req.as_params(),
                                     job_id=job_id, model_key=model_key(req.target, user, concept_id),
                                     concept_id=concept_id, max_active=self.config.limits.max_jobs_per_user,
                                     request_key=request_key)
        except RequestSeen as seen:  # the same key's first try was queued a moment ago, on another replica
            self.ws.delete_job_inputs(job_id)
            return self._seen(seen, key), req.wait
        except BaseException:
            self.ws.delete_job_inputs(job_id)
            raise
        return job_id, req.wait

    def _seen(self, seen: RequestSeen, key: str) -> str:
        """The job of a request sent again with its idempotency key; a Conflict if the key named another request."""
        if not seen.same:
            raise Conflict(f"idempotency_key {key!r} was already used for another /finetune request (other images "
                           "or parameters); send a new key with each new request")
        log.info("job %s: a retry of the request that queued it (idempotency key) gets it again", seen.answer)
        return seen.answer

    def run_job(self, ctx: JobContext, job: dict) -> dict:
        """Run a claimed job (on whichever worker claimed it) from what the registry and the store hold."""
        done = self.registry.get_concept(job["concept_id"])
        if done is not None:  # committed by an earlier run (one from before a commit ended its job itself)
            return {"concept_id": done["concept_id"], "identifier": done["identifier"],
                    "model_version": done["version"]}
        req = parsing.FinetuneRequest.from_params(json.loads(job["params"]))
        with ctx.timed("load"):
            images = self.ws.load_job_inputs(job["job_id"])
        return self.run(ctx, job["owner"], images, req, job["concept_id"])

    def discard_inputs(self, job: dict) -> None:
        self.ws.delete_job_inputs(job["job_id"])

    def before_rerun(self, job: dict) -> None:
        """A job taken over from a worker that died: remove what that run left half-written (its concept's
        instance images too, unless a version holds the concept)."""
        left = self.ws.discard_unfinished(job["job_id"], self.registry.live_version_paths())
        if self.registry.get_concept(job["concept_id"]) is None:
            self.ws.delete_instances(job["concept_id"])
        if left:
            log.warning("job %s: removed %d folders an earlier run of it left unfinished", job["job_id"], len(left))

    def result(self, job_id: str) -> dict:
        """The finished job's view, or the error it failed with."""
        job = self.registry.get_job(job_id)
        if job["status"] != "succeeded":
            raise job_error(job)
        return {**job_view(job), "method": json.loads(job["params"] or "{}").get("method", "dreambooth")}

    def _identifier(self, user: str, key: str, kind: str, req: parsing.FinetuneRequest) -> str:
        taken = self.registry.identifiers_ever_used(key)
        if kind == "private":  # keep a user's private identifiers unambiguous for /generate
            taken |= self.store.private_words(user)
        if not req.overwrite:
            return choose_identifier(self.identifier_pool, taken, seed=req.seed, reserved_words=req.category.split())
        # The concept is an existing word's new embedding, private to its owner.
        embeddings.word_token_everywhere(self.store.text_side.tokenizers, req.overwrite)
        if req.overwrite in self.store.private_words(user):
            raise Conflict(f"you already have a concept for {req.overwrite!r}; delete it first")
        return req.overwrite

    def run(self, ctx: JobContext, user: str, images: list[Image.Image], req: parsing.FinetuneRequest,
            concept_id: str) -> dict:
        kind = req.target
        key = model_key(kind, user, concept_id)
        # Across workers the registry lets one job of a key run at a time; this lock keeps an /import or an
        # admin action of this process from committing between (they run where the key's version is read).
        with self.store.lock(key):
            with ctx.timed("load"):
                version = self.registry.ensure_model(key, kind, None if kind == "meta" else user,
                                                     self.base_key)["current_version"]
                identifier = self._identifier(user, key, kind, req)
                prepared = preprocess.prepare(images, list(req.captions) if req.captions else None, crop=req.crop,
                                              split_oversized=req.split_oversized, flip=req.flip,
                                              hue_copy_count=req.hue_copies)
                limit = self.config.limits.max_prepared_images
                if len(prepared.images) > limit * (1 + req.hue_copies):
                    raise BadRequest(f"{len(prepared.images) // (1 + req.hue_copies)} training images after "
                                     f"tiling and flipping; at most {limit}")
                stack = self.store.stack(key, version) if kind != "private" else metamodel.EMPTY
            result, plan, written, fit = self._train(ctx, key, kind, version, stack, identifier, prepared, req)
            failpoints.reached("trained", ctx.job_id)
            meta = VersionMeta(
                model_key_kind=kind, base=self.base_key, version=version + 1, method=req.method,
                identifier=identifier, category=req.category, prior_plan=[dataclasses.asdict(s) for s in plan],
                n_training_images=len(prepared.images), train_seconds=result.seconds, final_loss=result.final_loss,
                optimizer=fit.optimizer, gradient_checkpointing=fit.gradient_checkpointing)
            if kind != "private":
                new_stack = metamodel.after_adapter(stack, metamodel.Adapter(version + 1, concept_id, identifier)) \
                    if req.method == "lora" else metamodel.after_trunk(stack, version + 1)
                meta.trunk_version, meta.adapters = new_stack.trunk_version, new_stack.to_meta()["adapters"]
                meta.metamodel_strategy = req.metamodel_strategy
            if req.method == "lora":
                meta.lora_rank, meta.lora_alpha, meta.lora_targets = req.lora_rank, req.lora_alpha, req.lora_targets
            if result.embedding is not None and req.method != "dreambooth":
                meta.num_vectors, meta.overwrite = int(result.embedding.shape[0]), bool(req.overwrite)
            self._commit(ctx, user, key, kind, version + 1, concept_id, meta, written, prepared, len(images), req)
        return {"concept_id": concept_id, "identifier": identifier, "model_version": version + 1,
                "loss": result.final_loss}

    def _train(self, ctx, key, kind, version, stack, identifier, prepared, req):
        """Train the concept; returns (TrainResult, prior plan, the weights to write, the memory plan it ran with)."""
        # A private model learns one concept from the base: nothing earlier to keep.
        strategy = METAMODEL_STRATEGY_SETTINGS[req.metamodel_strategy if kind != "private" else "naive"]
        anchor_weight = req.anchor_weight if req.anchor_weight is not None and kind != "private" \
            else strategy["anchor_weight"]
        learned = self.registry.concepts_of_model(key) if kind != "private" else []
        in_adapters = {a.concept_id for a in stack.adapters}  # kept by their adapters, not by replay into the trunk
        plan = planner.plan_prior_batch(
            req.num_class_images, req.category,
            [planner.EarlierConcept(c["concept_id"], c["identifier"], c["category"]) for c in learned
             if c["concept_id"] not in in_adapters],
            metamodel=strategy["replay_earlier"])
        log.info("job %s: %s %r into %s v%d; prior plan:\n%s", ctx.job_id, req.method,
                 planner.concept_prompt(identifier, req.category), key, version, planner.describe_plan(plan))
        with ctx.timed("class_images"):
            priors, groups = self.prior_examples(plan)
        text = self.store.text_side
        tok = text.tokenizer
        token_ids = tok(identifier, add_special_tokens=False).input_ids
        embedding = None
        if req.method == "textual_inversion" or (req.method == "lora" and req.train_identifier_embedding):
            n = req.num_vectors if req.method == "textual_inversion" else 1
            start = [embeddings.init_vectors(encoder, t, req.init_text, n, identifier)
                     for t, encoder in zip(text.tokenizers, text.encoders)]
            embedding = embeddings.ConceptEmbedding(identifier, token_ids[0], *start)
        # A metamodel's trunk is trained again by its next DreamBooth step; a private model never is, so it is
        # written as it is served (half the disk of an SD UNet in float16).
        stored = pipelines.TRUNK_DTYPE if kind != "private" else self.base_pipe.unet.dtype
        fresh = req.method == "dreambooth" and stored != self.base_pipe.unet.dtype
        trunk = stack.trunk_version if kind != "private" else version

        def train(plan: memory.MemoryPlan):
            # Loaded per try: a fresh copy is trained in place, and a try that ran out of memory may have moved it.
            with ctx.timed("load"):
                unet, text_encoder, own_text = self.store.training_modules(key, trunk, stored if fresh else None)
            with ctx.timed("train"):
                result = loop.dreambooth(
                    vae=self.base_pipe.vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                    noise_scheduler=self.store.noise_scheduler(),
                    instances=concept_examples(prepared.images, identifier, req.category, prepared.captions,
                                               req.prompt_templates), priors=priors,
                    learning_rate=req.learning_rate, max_train_steps=req.max_train_steps,
                    train_batch_size=req.train_batch_size, prior_loss_weight=req.prior_loss_weight,
                    train_text_encoder=req.train_text_encoder if req.method == "dreambooth" else req.lora_text_encoder,
                    seed=req.seed, size=self.size,
                    prior_batch_size=req.train_batch_size * strategy["prior_batch_factor"], anchor_weight=anchor_weight,
                    train_token_ids=token_ids if req.train_identifier_embedding and req.method == "dreambooth"
                    and not text.xl else (),
                    embedding_learning_rate=req.embedding_learning_rate,
                    lora=loop.LoraSettings(req.lora_rank, req.lora_alpha, req.lora_text_encoder, req.lora_targets)
                    if req.method == "lora" else None,
                    embedding=embedding, train_unet=req.method != "textual_inversion",
                    prior_groups=groups if strategy.get("balanced") else None,
                    lr_scheduler=req.lr_scheduler, lr_warmup_steps=req.lr_warmup_steps, snr_gamma=req.snr_gamma,
                    mixed_precision=loop.mixed_precision_for(self.base_pipe.unet.dtype, self.store.device),
                    modules_are_copies=fresh, progress=ctx.progress, should_stop=ctx.should_stop,
                    text_encoder_2=text.encoders[1] if text.xl else None,
                    tokenizer_2=text.tokenizers[1] if text.xl else None,
                    gradient_checkpointing=plan.gradient_checkpointing, eight_bit_adam=plan.eight_bit_adam)
            return result, text_encoder, own_text

        trained = 0  # LoRA's and an embedding's parameters are megabytes: nothing to plan for
        if req.method == "dreambooth":
            trained = sum(p.numel() for p in self.base_pipe.unet.parameters()) + (
                sum(p.numel() for p in self.base_pipe.text_encoder.parameters()) if req.train_text_encoder else 0)
        tries = memory.plans(trained, self.store.device, optimizer=self.config.optimizer,
                             gradient_checkpointing=self.config.gradient_checkpointing)
        (result, text_encoder, own_text), fit = memory.run_within_memory(train, tries, what=f"job {ctx.job_id}")
        if req.method == "dreambooth":
            new_text = result.text_encoder if result.text_encoder is not None else (text_encoder if own_text else None)
            written = dict(unet=pipelines.as_dtype(result.unet, stored), text_encoder=pipelines.as_dtype(new_text, stored))
        else:
            written = dict(
                lora=LoraWeights(result.lora_unet, result.lora_text_encoder, result.lora_metadata,
                                 text_encoder_2=result.lora_text_encoder_2)
                if req.method == "lora" else None,
                embedding=EmbeddingWeights(identifier, result.embedding, token_ids[0], req.max_train_steps,
                                           a1111=req.method == "textual_inversion", vectors_2=result.embedding_2)
                if result.embedding is not None else None)
        return result, plan, written, fit

    def _commit(self, ctx, user, key, kind, version, concept_id, meta, written, prepared, n_images, req) -> None:
        """Publish the version's files and make it current in one transaction; the concept's instance images are
        kept for later replay only if it is."""
        def write(folder):
            write_version(folder, meta, **written)
            self.ws.save_instances(concept_id, prepared.images,
                                   list(prepared.captions) if any(prepared.captions) else None, tag=ctx.job_id)

        start = time.perf_counter()

        def commit(path):
            ctx.seconds.add("commit", time.perf_counter() - start)  # the files are written; one transaction is left
            failpoints.reached("published", ctx.job_id)
            self.registry.commit_version(
                key, version, path, ctx.job_id, {
                    "concept_id": concept_id, "owner": user, "target": kind, "identifier": meta.identifier,
                    "category": req.category, "n_images": n_images, "params": req.as_params()},
                worker=ctx.worker, job_result={"concept_id": concept_id, "identifier": meta.identifier,
                                               "model_version": version, "loss": meta.final_loss,
                                               "seconds": ctx.seconds.encoded()})

        try:
            publish(self.ws, key, version, write, commit, tag=ctx.job_id)
        except BaseException:
            # Only while this run still holds the job are the images its own: once the lease has passed, the
            # worker that took the job over writes (or has committed) the same concept's. When the registry is
            # what failed, they stay for the job's next run to replace.
            with contextlib.suppress(Exception):
                ours = ctx.worker is None or self.registry.job_is(ctx.job_id, ctx.worker, "running")
                if ours and self.registry.get_concept(concept_id) is None:
                    self.ws.delete_instances(concept_id)
            raise

    def prior_class_images(self, category: str, n: int) -> list[Image.Image]:
        """The first `n` prior-preservation images of "a {category}" from the base model, generated once and
        shared by every user and model (a benchmark calls it to make them before it times training)."""
        return class_images.ensure_class_images(
            self.ws, self.base_key, lambda: pipelines.compose(self.base_pipe), category, n, size=self.size,
            steps=self.class_image_steps, guidance_scale=self.guidance_scale, batch=self.config.generation_batch)[0]

    def prior_examples(self, plan: Sequence[planner.PriorSlot]) -> tuple[list[loop.TrainExample], list[int]]:
        """The prior examples of a plan, and for each the index of the slot (group) it fills."""
        out: list[loop.TrainExample] = []
        groups: list[int] = []
        for group, slot in enumerate(plan):
            if slot.kind == "class":
                out += [loop.TrainExample(im, slot.prompt) for im in self.prior_class_images(slot.category, slot.count)]
            else:  # an earlier concept, replayed with the prompts it was taught with
                earlier = concept_examples(self.ws.load_instances(slot.concept_id), slot.identifier, slot.category,
                                           self.ws.load_captions(slot.concept_id))
                out += [earlier[i % len(earlier)] for i in range(slot.count if earlier else 0)]
            groups += [group] * (len(out) - len(groups))
        return out, groups
