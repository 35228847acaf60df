"""Image generation: cached pipelines, batched calls, reproducible seeds, PNGs that say how they were made."""
from __future__ import annotations

import collections
import dataclasses
import secrets
import threading
from typing import Callable

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .infotext import format_infotext
from .prompting import DEFAULT_EMPHASIS, encode_prompts
from .schedulers import label_of_scheduler


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

    def __len__(self) -> int:
        return len(self._items)


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
            "Model version": p["model_version"], "Emphasis": p.get("emphasis", DEFAULT_EMPHASIS)})

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
           model_label: str, model_version: int, max_batch: int = 16,
           emphasis: str = DEFAULT_EMPHASIS, embeddings: dict | None = None) -> list[GeneratedImage]:
    """One image per spec, in the specs' order; each image depends on its spec only, not on its batch."""
    out: list[GeneratedImage | None] = [None] * len(specs)
    common = dict(negative_prompt=negative_prompt, height=height, width=width, model=model_label,
                  model_version=model_version, scheduler=label_of_scheduler(pipe.scheduler), emphasis=emphasis)
    # A generator per image makes each image depend on its own seed only, not on its batch-mates.
    gen_device = "cpu" if pipe.device.type == "mps" else pipe.device
    for idx in batches(specs, max_batch):
        chunk = [specs[i] for i in idx]
        gens = [torch.Generator(device=gen_device).manual_seed(s.seed) for s in chunk]
        # Emphasis and long prompts are encoded here; plain prompts encode exactly as the pipeline would.
        embeds, negative_embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, [s.prompt for s in chunk],
                                                 [negative_prompt or ""] * len(chunk), pipe.device,
                                                 dtype=pipe.text_encoder.dtype, emphasis=emphasis,
                                                 embeddings=embeddings)
        scales = {s.guidance_scale for s in chunk}
        guidance = chunk[0].guidance_scale if len(scales) == 1 else torch.tensor(
            [s.guidance_scale for s in chunk], device=pipe.device, dtype=pipe.unet.dtype).view(-1, 1, 1, 1)
        images = pipe(
            prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
            num_inference_steps=chunk[0].num_inference_steps, guidance_scale=guidance, height=height, width=width,
            generator=gens,
        ).images
        for i, s, im in zip(idx, chunk, images):
            out[i] = GeneratedImage(im, s.prompt, s.seed, {
                **common, "guidance_scale": s.guidance_scale, "num_inference_steps": s.num_inference_steps})
    return out


def prompt_specs(prompts: list[str], *, num_images: int, seed: int | None, guidance_scale: float,
                 num_inference_steps: int) -> list[ImageSpec]:
    """`num_images` per prompt; image k of prompt i uses seed `seed + i*num_images + k`."""
    return [ImageSpec(p, s, guidance_scale, num_inference_steps) for i, p in enumerate(prompts)
            for s in seeds_for(None if seed is None else seed + i * num_images, num_images)]
