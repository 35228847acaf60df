"""Image generation: cached pipelines, batched calls, reproducible seeds, PNGs that say how they were made."""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import logging
import secrets
import threading
from typing import Callable, Sequence, TypeVar

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from big.errors import OutOfMemory
from big.generation.infotext import format_infotext
from big.generation.prompting import DEFAULT_EMPHASIS, encode
from big.generation.schedulers import label_of_scheduler
from big.generation.steps import step_done
from big.weights.text import TextSide

log = logging.getLogger(__name__)
# Images per pipeline call (and per denoising loop of a composable prompt) unless the service is configured
# otherwise (`generation_batch`): with classifier-free guidance the UNet sees twice as many.
DEFAULT_GENERATION_BATCH = 16
T = TypeVar("T")


def seeded_generators(seeds) -> list[torch.Generator]:
    """One CPU generator per image. Noise drawn on the CPU (then moved to the model's device) is the same on
    every machine, so a seed, or a PNG's own text, gives the same image on a GPU host as on a CPU host, to
    within the device's float rounding; a CUDA generator draws other numbers from the same seed."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class PipelineCache:
    """LRU of loaded model versions, bounded by the bytes of the modules they do not share with the base."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: "collections.OrderedDict[str, tuple[object, int]]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, key: str, load: Callable[[], tuple[object, int]]):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:  # one loader per key; others wait and then hit the cache
            with self._lock:
                if key in self._items:
                    return self._items[key][0]
            value, size = load()
            with self._lock:
                self._items[key] = (value, size)
                self._evict()
                self._loading.pop(key, None)
            return value

    def drop(self, predicate: Callable[[str], bool]) -> None:
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                del self._items[key]

    def _evict(self) -> None:
        total = sum(s for _, s in self._items.values())
        while total > self.max_bytes and len(self._items) > 1:
            _, (_, s) = self._items.popitem(last=False)
            total -= s

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def entries(self) -> dict:
        """key -> cached value (None for a route known not to merge)."""
        with self._lock:
            return {k: v for k, (v, _) in self._items.items()}

    def __len__(self) -> int:
        return len(self._items)


def halving_on_out_of_memory(run: Callable[[list[T]], list], items: Sequence[T], *, what: str,
                             advice: str = "", vae=None) -> list:
    """`run(items)`, or where the accelerator runs out of memory, `run` on each half, and so on down to one item.

    Each image depends on its own seed and spec, never on its batch-mates, so a split changes no image: a
    request too large for the GPU's memory is served in smaller batches instead of failing (fewer images a call
    is what slicing the VAE's decoding would save, and more). One image that does not fit is tried once more with
    `vae` (when given) decoding in tiles, diffusers' way of decoding an image larger than its memory allows (the
    seams of the tiles are blended, so that image's pixels move slightly); then it raises `OutOfMemory`, saying
    what (`what`) did not fit and what might (`advice`)."""
    items = list(items)
    try:
        return run(items)
    except torch.OutOfMemoryError as e:
        reason = (str(e).splitlines() or ["out of memory"])[0]
    # Retried only after the except block: inside it, the traceback still holds the failed call's activations,
    # and the halves need that memory.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(items) == 1 and vae is not None and not vae.use_tiling:
        log.warning("%s: one image does not fit in the accelerator's memory; decoding it in tiles", what)
        with vae_tiling(vae):
            return halving_on_out_of_memory(run, items, what=what, advice=advice, vae=vae)
    if len(items) == 1:
        raise OutOfMemory(f"{what}: one image does not fit in the accelerator's memory ({reason})"
                          + (f"; {advice}" if advice else ""))
    half = len(items) // 2
    log.warning("%s: out of accelerator memory with %d images in one batch; retrying in batches of %d and %d "
                "(a lower `generation_batch` avoids the retry)", what, len(items), half, len(items) - half)
    return (halving_on_out_of_memory(run, items[:half], what=what, advice=advice, vae=vae)
            + halving_on_out_of_memory(run, items[half:], what=what, advice=advice, vae=vae))


@contextlib.contextmanager
def vae_tiling(vae):
    """The VAE decodes in tiles inside. Requests are served on one thread, so no other request decodes meanwhile; a
    class image a training job decodes at that moment is tiled too (it stays a valid prior image)."""
    vae.enable_tiling()
    try:
        yield
    finally:
        vae.disable_tiling()


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """Everything that decides one image, besides the model, the sampler and the size."""

    prompt: str
    seed: int
    guidance_scale: float
    num_inference_steps: int


@dataclasses.dataclass
class GeneratedImage:
    image: Image.Image
    prompt: str
    seed: int
    parameters: dict

    def parameters_text(self) -> str:
        """AUTOMATIC1111-style 'parameters' text: other tools read it, and /generate reproduces from it."""
        p = self.parameters
        return format_infotext(self.prompt, p.get("negative_prompt"), {
            "Steps": p["num_inference_steps"], "Sampler": p["scheduler"], "CFG scale": p["guidance_scale"],
            "Seed": self.seed, "Size": f"{p['width']}x{p['height']}", "Model": p["model"],
            "Model version": p["model_version"], "Emphasis": p.get("emphasis", DEFAULT_EMPHASIS),
            **({"Dtype": p["dtype"]} if p.get("dtype") else {})})

    def png_info(self) -> PngInfo:
        info = PngInfo()
        info.add_text("parameters", self.parameters_text())
        return info


def seeds_for(seed: int | None, n: int) -> list[int]:
    base = seed if seed is not None else secrets.randbelow(2**31 - n)
    return [base + i for i in range(n)]


def batches(specs: list[ImageSpec], max_batch: int) -> list[list[int]]:
    """Indices of specs that can share one pipeline call, each list at most `max_batch` long.

    One call needs one step count; guidance may differ per image when classifier-free guidance is on for
    all of them (> 1), while a scale at or below 1 (guidance off) batches only with the same scale.
    """
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(specs):
        cfg_on = s.guidance_scale > 1
        groups.setdefault((s.num_inference_steps, cfg_on, None if cfg_on else s.guidance_scale), []).append(i)
    return [idx[k : k + max_batch] for idx in groups.values() for k in range(0, len(idx), max_batch)]


@torch.no_grad()
def render(pipe, specs: list[ImageSpec], *, negative_prompt: str | None, height: int, width: int,
           model_label: str, model_version: int, max_batch: int = DEFAULT_GENERATION_BATCH,
           emphasis: str = DEFAULT_EMPHASIS, embeddings: dict | None = None) -> list[GeneratedImage]:
    """One image per spec, in the specs' order; each image depends on its spec only, not on its batch."""
    out: list[GeneratedImage | None] = [None] * len(specs)
    common = dict(negative_prompt=negative_prompt, height=height, width=width, model_label=model_label,
                  model_version=model_version, scheduler_label=label_of_scheduler(pipe.scheduler), emphasis=emphasis,
                  dtype=dtype_name(pipe.unet.dtype))

    def call(chunk: list[ImageSpec]) -> list[Image.Image]:
        # A generator per image makes each image depend on its own seed only, not on its batch-mates.
        gens = seeded_generators(s.seed for s in chunk)
        # Emphasis and long prompts are encoded here; plain prompts encode exactly as the pipeline would.
        text = TextSide.of(pipe)
        conditioning = encode(text, [s.prompt for s in chunk], [negative_prompt or ""] * len(chunk), pipe.device,
                              dtype=text.dtype, emphasis=emphasis, embeddings=embeddings)
        scales = {s.guidance_scale for s in chunk}
        guidance = chunk[0].guidance_scale if len(scales) == 1 else torch.tensor(
            [s.guidance_scale for s in chunk], device=pipe.device, dtype=pipe.unet.dtype).view(-1, 1, 1, 1)
        return pipe(
            **conditioning.pipeline_kwargs(),
            num_inference_steps=chunk[0].num_inference_steps, guidance_scale=guidance, height=height, width=width,
            generator=gens, callback_on_step_end=_offer_step,
        ).images

    for idx in batches(specs, max_batch):
        chunk = [specs[i] for i in idx]
        images = halving_on_out_of_memory(call, chunk, what=f"{height}x{width} images",
                                          advice="ask for a smaller height and width", vae=pipe.vae)
        for i, s, im in zip(idx, chunk, images):
            out[i] = GeneratedImage(im, s.prompt, s.seed, _parameters(s, **common))
    return out


def _offer_step(pipe, step, timestep, callback_kwargs) -> dict:
    """The pipeline's step callback: another user's call may run here (the pipeline object and its scheduler are
    this call's own, `pipelines.compose`), and the step's tensors are left as they are."""
    step_done()
    return {}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parameters(spec: ImageSpec, *, negative_prompt, height, width, model_label, model_version, scheduler_label,
                emphasis, dtype) -> dict:
    """What an image's PNG parameters text records besides its prompt and seed. `dtype`: the UNet's, which the
    text records but a request cannot choose (a service serves one): the same text on a service of another
    dtype makes the image again only to that dtype's rounding."""
    return {"negative_prompt": negative_prompt, "height": height, "width": width, "model": model_label,
            "model_version": model_version, "scheduler": scheduler_label, "emphasis": emphasis, "dtype": dtype,
            "guidance_scale": spec.guidance_scale, "num_inference_steps": spec.num_inference_steps}


@dataclasses.dataclass(frozen=True)
class PromptPart:
    """One `AND` part of a composable prompt and the pipeline that denoises it (its own adapters' route)."""

    pipe: object
    text: str
    weight: float
    embeddings: dict | None = None


@torch.no_grad()
def render_composed(parts: list[PromptPart], specs: list[ImageSpec], *, scheduler=None, negative_prompt: str | None,
                    height: int, width: int, model_label: str, model_version: int,
                    max_batch: int = DEFAULT_GENERATION_BATCH,
                    emphasis: str = DEFAULT_EMPHASIS) -> list[GeneratedImage]:
    """Images of one composable prompt (every spec has the same `AND` prompt): at each step every part's
    pipeline predicts the noise for its text and for the negative prompt, and

        eps = mean_i uncond_i + sum_i weight_i * guidance * (cond_i - uncond_i)

    AUTOMATIC1111's rule, with each part's own unconditional prediction because parts may run through
    different UNets. One part of weight 1 is exactly the pipeline's classifier-free guidance; guidance at or
    below 1 is applied by the same formula (the pipeline would switch guidance off there). The first part's
    pipeline supplies the scheduler's config, the latents and the VAE."""
    out: list[GeneratedImage | None] = [None] * len(specs)
    label = label_of_scheduler(scheduler or parts[0].pipe.scheduler)
    # One denoising loop per step count and guidance scale (both are scalars in it).
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(specs):
        groups.setdefault((s.num_inference_steps, s.guidance_scale), []).append(i)
    for (steps, guidance), same in groups.items():
        for k in range(0, len(same), max_batch):
            idx = same[k : k + max_batch]
            chunk = [specs[i] for i in idx]
            images = halving_on_out_of_memory(
                lambda sub: _denoise_composed(parts, sub, steps, guidance, scheduler, negative_prompt, height, width,
                                              emphasis),
                chunk, what=f"{height}x{width} images of a composable prompt",
                advice="ask for a smaller height and width, or fewer AND parts", vae=parts[0].pipe.vae)
            for i, s, im in zip(idx, chunk, images):
                out[i] = GeneratedImage(im, s.prompt, s.seed, _parameters(
                    s, negative_prompt=negative_prompt, height=height, width=width, model_label=model_label,
                    model_version=model_version, scheduler_label=label, emphasis=emphasis,
                    dtype=dtype_name(parts[0].pipe.unet.dtype)))
    return out


def _denoise_composed(parts, chunk, steps, guidance, scheduler, negative_prompt, height, width, emphasis):
    lead = parts[0].pipe
    n = len(chunk)
    # A fresh scheduler: it keeps per-call state (timesteps, step index), and calls can overlap.
    scheduler = type(scheduler or lead.scheduler).from_config((scheduler or lead.scheduler).config)
    scheduler.set_timesteps(steps, device=lead.device)
    gens = seeded_generators(s.seed for s in chunk)
    # As the pipeline's prepare_latents, but scaled by this scheduler's initial sigma (the pipeline's own
    # scheduler may be another sampler).
    shape = (n, lead.unet.config.in_channels, height // lead.vae_scale_factor, width // lead.vae_scale_factor)
    latents = randn_tensor(shape, generator=gens, device=lead.device, dtype=lead.unet.dtype)
    latents = latents * scheduler.init_noise_sigma
    # Ancestral samplers draw noise at every step: from the images' own generators, as the pipeline does.
    step_kwargs = {"generator": gens} if "generator" in inspect.signature(scheduler.step).parameters else {}
    terms = []
    for part in parts:
        text = TextSide.of(part.pipe)
        c = encode(text, [part.text] * n, [negative_prompt or ""] * n, lead.device, dtype=text.dtype,
                   emphasis=emphasis, embeddings=part.embeddings)
        pooled = None if c.pooled is None else torch.cat([c.negative_pooled, c.pooled])
        terms.append((part.pipe.unet, torch.cat([c.negative_states, c.states]), part.weight,
                      text.unet_kwargs(pooled, height, width)))
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps = 0
        for unet, states, weight, extra in terms:
            uncond_eps, cond_eps = unet(x, t, encoder_hidden_states=states, **extra).sample.chunk(2)
            eps = eps + uncond_eps / len(terms) + weight * guidance * (cond_eps - uncond_eps)
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
        step_done()
    vae = lead.vae
    # SDXL's VAE overflows in float16: its pipeline casts the shared VAE to float32 for the decode and back, and so
    # does this (requests are served on one thread; a class image decoded meanwhile on a training thread is the
    # same race diffusers' own pipeline has there).
    upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    return lead.image_processor.postprocess(images, output_type="pil")


def prompt_specs(prompts: list[str], *, num_images: int, seed: int | None, guidance_scale: float,
                 num_inference_steps: int) -> list[ImageSpec]:
    """`num_images` per prompt; image k of prompt i uses seed `seed + i*num_images + k`."""
    return [ImageSpec(p, s, guidance_scale, num_inference_steps) for i, p in enumerate(prompts)
            for s in seeds_for(None if seed is None else seed + i * num_images, num_images)]
