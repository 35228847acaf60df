"""/generate, /sweep and /grid: which weights each image goes through, and the images made through them.

A request names a target model. A metamodel version with adapters routes each prompt to the adapters of the
concepts it names (and each `AND` part to its own); `private` applies the caller's own concepts (one DreamBooth
UNet, or any LoRAs, plus any embeddings) to the base. An image depends on its own spec only, so rendering the
groups of a request separately changes no image.
"""
from __future__ import annotations

from typing import Sequence

from big import parsing
from big.config import ServiceConfig
from big.errors import BadRequest, BIGError, NotFound
from big.generation import infotext, prompting, sampling, schedulers, steps, studio
from big.generation.sampling import GeneratedImage, ImageSpec
from big.models import AdapterUse, ModelStore
from big.weights import metamodel, pipelines


def split_composed(specs) -> tuple[list[int], dict[str, list[int]]]:
    """Indices of the plain specs, and of each composable (`AND`) prompt's specs."""
    plain, composed = [], {}
    for i, s in enumerate(specs):
        if prompting.parse_prompt(s.prompt).composed:
            composed.setdefault(s.prompt, []).append(i)
        else:
            plain.append(i)
    return plain, composed


class Generator:
    def __init__(self, store: ModelStore, config: ServiceConfig, defaults: dict):
        self.store = store
        self.config = config
        self.defaults = defaults

    # ------------------------------------------------------------------ endpoints
    def request(self, params: dict, prompts: Sequence[str]):
        """The parsed generation parameters and the checked prompts, shared by /generate, /sweep and /grid."""
        req = parsing.parse_generate(params, self.defaults, self.config.limits)
        return req, [parsing.prompt_of(p, self.config.limits) for p in prompts]

    def generate(self, user: str, prompts: Sequence[str], params: dict) -> list[GeneratedImage]:
        """Images for the prompts; `parameters` (a generated PNG's text) reproduces that image, and any
        parameter passed beside it overrides the text's value."""
        req, specs = self._generate_specs(prompts, params)
        return self.render_specs(user, req, specs)

    def _generate_specs(self, prompts: Sequence[str], params: dict):
        if params.get("parameters"):
            text_prompt, from_text = infotext.request_from_infotext(params["parameters"])
            params = {**from_text, **{k: v for k, v in params.items() if k != "parameters"}}
            prompts = list(prompts) or [text_prompt]
        req, prompts = self.request(params, prompts)
        if not prompts:
            raise BadRequest("send at least one prompt document")
        if len(prompts) * req.num_images > self.config.limits.max_request_images:
            raise BadRequest("too many images in one request")
        return req, sampling.prompt_specs(prompts, num_images=req.num_images, seed=req.seed,
                                          guidance_scale=req.guidance_scale, num_inference_steps=req.num_inference_steps)

    def batch_key(self, user: str, prompts: Sequence[str], params: dict) -> tuple | None:
        """Requests of one key may share pipeline calls: the same model route (key and version), size, sampler,
        negative prompt and emphasis. None for a request served alone: private concepts (each user's own), a
        reproduction from a PNG text, or one that does not parse (it gets its error alone)."""
        if params.get("parameters"):
            return None
        try:
            req, prompts = self.request(params, prompts)
            if req.target == "private" or not prompts:
                return None
            key, version = self.store.resolve(user, req.target, req.identifier, req.model_version)
        except BIGError:
            return None
        return key, version, req.height, req.width, req.scheduler, req.negative_prompt, req.emphasis

    def generate_many(self, calls: Sequence[tuple[str, Sequence[str], dict]]) -> list:
        """Several /generate requests of one batch key through shared pipeline calls: each gets exactly the images
        it gets alone (an image depends on its own spec, never on its batch-mates), or its own error."""
        out: list = [None] * len(calls)
        batched = []
        for i, (user, prompts, params) in enumerate(calls):
            try:
                batched.append((i, user, *self._generate_specs(prompts, params)))
            except BIGError as e:
                out[i] = e
        if not batched:
            return out
        _, user, req, _ = batched[0]
        try:
            images = self.render_specs(user, req, [s for *_, specs in batched for s in specs])
        except BIGError:
            # One request's prompt was refused (a <lora:> tag, an AND part that cannot merge...): each alone, so
            # only that request hears of it.
            for i, user, req, specs in batched:
                try:
                    out[i] = self.render_specs(user, req, specs)
                except BIGError as e:
                    out[i] = e
            return out
        for i, _, _, specs in batched:
            out[i], images = images[:len(specs)], images[len(specs):]
        return out

    def render(self, user: str, specs: Sequence[ImageSpec], params: dict) -> list[GeneratedImage]:
        """One image per spec with the model and options of `params`, exactly as /generate makes it."""
        req, _ = self.request(params, [])
        if len(specs) > self.config.limits.max_request_images:
            raise BadRequest("too many images in one request")
        return self.render_specs(user, req, list(specs))

    def sweep(self, user: str, prompts: Sequence[str], params: dict) -> tuple[list[GeneratedImage], bytes]:
        """One prompt, one seed, one parameter over a range: the frames and an animated GIF of them."""
        req, prompts = self.request(params, prompts)
        if len(prompts) != 1:
            raise BadRequest("a sweep takes exactly one prompt document")
        sweep = parsing.parse_sweep(params, self.config.limits)
        seed = req.seed if req.seed is not None else sampling.seeds_for(None, 1)[0]
        specs = studio.sweep_specs(prompts[0], seed, sweep.parameter, list(sweep.values),
                                   guidance_scale=req.guidance_scale, num_inference_steps=req.num_inference_steps)
        frames = self.render_specs(user, req, specs)
        return frames, studio.gif_bytes(frames, [studio.frame_label(sweep.parameter, v) for v in sweep.values])

    def grid(self, user: str, prompts: Sequence[str], params: dict) -> tuple[list[GeneratedImage], bytes]:
        """Prompts x guidance scales x steps x seeds (or `random_samples` around the setting): the images
        and a captioned contact sheet, a row per prompt."""
        req, prompts = self.request(params, prompts)
        if not prompts:
            raise BadRequest("send at least one prompt document")
        lim = self.config.limits
        seed = req.seed if req.seed is not None else sampling.seeds_for(None, 1)[0]
        grid = parsing.parse_grid(params, req, lim)
        # Counted before the grid is built: long lists must not take the server's memory.
        size = len(prompts) * grid.images_per_prompt()
        if size > lim.max_grid_images:
            raise BadRequest(f"a grid has at most {lim.max_grid_images} images (this one: {size})")
        if grid.random_samples:
            specs = studio.random_specs(
                prompts, grid.random_samples, seed=seed, guidance_scale=req.guidance_scale,
                num_inference_steps=req.num_inference_steps, guidance_spread=grid.guidance_spread,
                steps_spread=grid.steps_spread, max_steps=lim.max_inference_steps, max_guidance=lim.max_guidance_scale)
        else:
            seeds = list(grid.seeds) if grid.seeds else sampling.seeds_for(seed, grid.num_seeds)
            specs = studio.grid_specs(prompts, grid.guidance_scales, grid.steps, seeds)
        images = self.render_specs(user, req, specs)
        return images, studio.sheet_png(images, columns=len(specs) // len(prompts))

    # ------------------------------------------------------------------ routes
    def render_specs(self, user: str, req: parsing.GenerateRequest, specs: list[ImageSpec]) -> list[GeneratedImage]:
        if req.target == "private":
            return self._private(user, req, specs)
        if any(prompting.parse_prompt(s.prompt).lora for s in specs):
            raise BadRequest("<lora:...> tags pick private LoRA concepts: use target_model 'private'")
        key, version = self.store.resolve(user, req.target, req.identifier, req.model_version)
        stack = self.store.stack(key, version) if req.target != "pretrained" else metamodel.EMPTY
        if stack.adapters:
            return self._routed(key, stack, req, specs, version=version, label=req.target)
        return self._with(self.store.pipeline_for(key, version), req, specs, version=version, label=req.target)

    def _routed(self, key: str, stack: metamodel.Stack, req, specs: list[ImageSpec], *, version: int,
                label: str) -> list[GeneratedImage]:
        """A metamodel version with adapters: each prompt gets the adapters (and embeddings) of the concepts it
        names, over the trunk; a prompt naming none gets the trunk alone, and each `AND` part its own."""
        out: list[GeneratedImage | None] = [None] * len(specs)
        plain, composed = split_composed(specs)
        for prompt, idx in composed.items():
            parts = []
            for text, weight in prompting.parse_prompt(prompt).parts:
                model, embeds = self._part_model(key, stack, version, text)
                parts.append(sampling.PromptPart(model, text, weight, embeds))
            for i, image in zip(idx, self._parts(parts, req, [specs[i] for i in idx], version=version, label=label)):
                out[i] = image
        words = [prompting.parse_prompt(specs[i].prompt).words for i in plain]
        for adapters, group in metamodel.group_by_route(words, stack.adapters).items():
            idx = [plain[j] for j in group]
            chunk = [specs[i] for i in idx]
            if not adapters:
                images = self._with(self.store.pipeline_for(key, version), req, chunk, version=version, label=label)
            else:
                embeds, uses = self._adapter_uses(key, adapters)
                images = self._with_adapters(key, stack.trunk_version, uses, req, chunk, version=version,
                                             label=label, embeds=embeds)
            for i, image in zip(idx, images):
                out[i] = image
        return out

    def _adapter_uses(self, key: str, adapters) -> tuple[dict, list[AdapterUse]]:
        """The embeddings and the adapter uses (weight 1) of a route's metamodel adapters."""
        concepts = [{"concept_id": a.concept_id, "identifier": a.identifier, "model_key": key,
                     "version": a.version} for a in adapters]
        return self._embeddings(concepts), [self.store.adapter_use(c) for c in concepts]

    def _embeddings(self, concepts: list[dict]) -> dict:
        found = (self.store.concept_embedding(c, self.store.concept(c)) for c in concepts)
        return dict(e for e in found if e is not None)

    def _part_model(self, key: str, stack: metamodel.Stack, version: int, prompt: str):
        """(pipeline, embeddings) that serve one `AND` part of a metamodel prompt. Parts denoise side by side,
        so a part's adapters are always merged into their own UNet copy (even with `fuse_adapters: false`)."""
        adapters = metamodel.route(prompting.parse_prompt(prompt).words, stack.adapters)
        if not adapters:
            return self.store.pipeline_for(key, version), None
        embeds, uses = self._adapter_uses(key, adapters)
        fused = self.store.fused_route(key, stack.trunk_version, self.store.trunk_loras(key, stack.trunk_version),
                                       uses, force=True)
        if fused is None:
            raise BadRequest("an AND part's concepts must merge into the UNet (no text-encoder LoRA, DoRA or "
                             f"adapted embedding): {', '.join(a.identifier for a in adapters)} do not; "
                             "send the parts as separate prompts")
        return fused, embeds

    def _with_adapters(self, key: str, trunk: int, uses: list[AdapterUse], req, specs, *, version: int, label: str,
                       embeds):
        """Images through these adapters over a trunk: merged into a cached copy where they can be, else through
        the runtime's unmerged layers (`key` "base" with trunk 0: private LoRA concepts)."""
        runtime = self.store.loras if key == "base" else self.store.trunk_loras(key, trunk)
        fused = self.store.fused_route(key, trunk, runtime, uses)
        if fused is not None:  # read-only, like any cached version: no lock held while rendering
            return self._with(fused, req, specs, version=version, label=label, embeds=embeds)
        # The adapter set is this request's until its images are made: no other call runs between its steps.
        with runtime.lock, steps.uninterrupted():
            return self._with(runtime.activate(uses), req, specs, version=version, label=label, embeds=embeds)

    def _with(self, model, req, specs, *, version: int, label: str, embeds=None):
        """Images through one pipeline; the `AND` parts of a composable prompt all go through it too."""
        # A fresh scheduler per call: calls can overlap, and the choice is this request's only.
        scheduler = schedulers.make(schedulers.SAMPLERS[req.scheduler], model.scheduler.config) if req.scheduler else None
        out: list[GeneratedImage | None] = [None] * len(specs)
        plain, composed = split_composed(specs)
        if plain:
            images = sampling.render(
                pipelines.compose(model, scheduler=scheduler), [specs[i] for i in plain],
                negative_prompt=req.negative_prompt, height=req.height, width=req.width, model_version=version,
                emphasis=req.emphasis, model_label=label, embeddings=embeds, max_batch=self.config.generation_batch)
            for i, image in zip(plain, images):
                out[i] = image
        for prompt, idx in composed.items():
            parts = [sampling.PromptPart(model, text, weight, embeds)
                     for text, weight in prompting.parse_prompt(prompt).parts]
            for i, image in zip(idx, self._parts(parts, req, [specs[i] for i in idx], version=version, label=label)):
                out[i] = image
        return out

    def _parts(self, parts, req, specs, *, version: int, label: str):
        """Images of one composable prompt whose parts are already routed; the sampler from the first part's config."""
        scheduler = schedulers.make(schedulers.SAMPLERS[req.scheduler], parts[0].pipe.scheduler.config) \
            if req.scheduler else None
        return sampling.render_composed(parts, specs, scheduler=scheduler, negative_prompt=req.negative_prompt,
                                        height=req.height, width=req.width, model_label=label,
                                        model_version=version, emphasis=req.emphasis,
                                        max_batch=self.config.generation_batch)

    # ------------------------------------------------------------------ private concepts
    def private_concepts_for(self, user: str, names: Sequence[str], prompts: Sequence[str]) -> list[dict]:
        """The caller's private concepts a request uses: those it names, else those whose word is in a prompt
        (an `overwrite` concept's word is an ordinary word, so it applies only when named)."""
        mine = self.store.private_concepts(user)
        if names:
            by_word = {c["identifier"]: c for c in mine}  # oldest first: the newest of a word wins
            missing = [n for n in names if n not in by_word]
            if missing:
                raise NotFound(f"you have no private concept {missing[0]!r}")
            return [by_word[n] for n in names]
        words = {w for p in prompts for w in prompting.parse_prompt(p).words}
        found = [c for c in mine if c["identifier"] in words and not self.store.concept(c).version.meta.overwrite]
        if not found:
            raise BadRequest("target_model 'private' needs `identifier` (or `identifiers`), or a prompt that uses "
                             "one of your private concepts' words")
        return found

    def _private(self, user: str, req: parsing.GenerateRequest, specs: list[ImageSpec]) -> list[GeneratedImage]:
        """Base model + the request's private concepts: at most one DreamBooth concept (a whole UNet), or
        any number of LoRA adapters, plus any number of embeddings."""
        prompts = sorted({s.prompt for s in specs})
        tags: dict[str, float] = {}
        for prompt in prompts:
            for name, weight in prompting.parse_prompt(prompt).lora:
                if tags.setdefault(name, weight) != weight:
                    raise BadRequest(f"<lora:{name}> has two weights in one request")
        named = tuple(dict.fromkeys(list(req.identifiers) + list(tags))) if req.identifiers else ()
        concepts = self.private_concepts_for(user, named, prompts)
        unknown = sorted(set(tags) - {c["identifier"] for c in concepts})
        if unknown:
            raise NotFound(f"you have no private concept {unknown[0]!r} (from <lora:{unknown[0]}>)")
        if req.model_version not in (None, 1):
            raise NotFound(f"private concepts have one version (1), not {req.model_version}")
        full = [c for c in concepts if self.store.concept(c).method == "dreambooth"]
        loras = [c for c in concepts if self.store.concept(c).method == "lora"]
        if len(full) > 1:
            raise BadRequest("one DreamBooth concept per request (each is a whole UNet); LoRA and embedding "
                             "concepts combine with each other and with one DreamBooth concept's prompt")
        if full and loras:
            raise BadRequest("LoRA concepts apply to the base model, not on top of a DreamBooth concept")
        embeds = self._embeddings(concepts)
        label = "private:" + "+".join(c["identifier"] for c in concepts)
        if full:
            return self._with(self.store.pipeline_for(full[0]["model_key"], full[0]["version"]), req, specs,
                              version=1, label=label, embeds=embeds)
        if not loras:
            return self._with(self.store.base_pipe, req, specs, version=1, label=label, embeds=embeds)
        uses = [self.store.adapter_use(c, tags.get(c["identifier"], 1.0)) for c in loras]
        return self._with_adapters("base", 0, uses, req, specs, version=1, label=label, embeds=embeds)
