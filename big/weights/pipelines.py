"""The base pipeline: loading it, its device and dtype, and pipelines composed over its modules.

A trained version (`storage.versions`) holds only what training changed; everything else is shared with the
loaded base pipeline, so a version costs the memory of its UNet, not of a whole pipeline.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os

import torch

from big.config import EMBEDDED, EMBEDDED_MODEL_DIR
from big.weights.text import is_xl

log = logging.getLogger(__name__)


def resolve_base(spec: str) -> str:
    """'embedded' -> the shipped shapes-world model; a folder -> itself; else a diffusers hub id."""
    if spec == EMBEDDED:
        return EMBEDDED_MODEL_DIR
    return spec


def base_key(spec: str) -> str:
    """A stable name for the base model, used to key caches shared between users.

    A folder's key covers its configs and a sample of every weight file's bytes: two fine-tunes of one
    architecture have the same configs and file sizes, and must not share class images.
    """
    path = resolve_base(spec)
    if os.path.isdir(path):
        h = hashlib.sha256()
        for sub in ("unet", "text_encoder", "text_encoder_2", "vae"):
            cfg = os.path.join(path, sub, "config.json")
            if os.path.exists(cfg):
                h.update(open(cfg, "rb").read())
            for root, dirs, files in os.walk(os.path.join(path, sub)):
                dirs.sort()
                for f in sorted(files):
                    if f != "config.json":
                        file = os.path.join(root, f)
                        _update_with_file_sample(h, file, label=os.path.relpath(file, path))
        return f"local-{h.hexdigest()[:16]}"
    return f"hub-{spec}"


def _update_with_file_sample(h, path: str, label: str, chunk: int = 1 << 16, samples: int = 16) -> None:
    """Hash a file's size and `samples` evenly spaced chunks: any retrained weights differ in every chunk,
    and a multi-GB checkpoint costs about 1 MiB of reading instead of a full pass."""
    size = os.path.getsize(path)
    h.update(f"{label}:{size}".encode())
    with open(path, "rb") as f:
        if size <= chunk * samples:
            h.update(f.read())
            return
        for i in range(samples):
            f.seek((size - chunk) * i // (samples - 1))
            h.update(f.read(chunk))


def pick_device(requested: str | None = None) -> torch.device:
    if requested and requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    """The served dtype: `auto` is float16 on CUDA (diffusers' usual choice) and float32 on a CPU.

    float16 is refused on a CPU: torch runs many of its CPU kernels slowly or not at all there, while
    bfloat16 has native kernels on CPUs with AVX512-BF16 or AMX (and far slower ones elsewhere: a warning
    says so where oneDNN cannot take it at all).
    """
    name = requested or "auto"
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: use one of auto, {', '.join(DTYPES)}")
    if name == "float16" and device.type == "cpu":
        raise ValueError("dtype 'float16' on a CPU: use 'bfloat16' (fast where the CPU has AVX512-BF16 or AMX) "
                         "or 'float32'")
    if name == "bfloat16" and device.type == "cpu" and not cpu_has_native_bfloat16():
        # Served as asked, but said loudly: an AVX2-only CPU generates many times slower in bfloat16 than in
        # float32 (docs/research/precision.md).
        log.warning(
            "dtype 'bfloat16' on a CPU without native bfloat16 kernels (capability %s; oneDNN's need AVX-512 and "
            "are fast with AVX512-BF16 or AMX): torch falls back to far slower ones; use 'float32' here",
            torch.backends.cpu.get_cpu_capability())
    return DTYPES[name]


def cpu_has_native_bfloat16() -> bool:
    """Whether torch's oneDNN kernels take bfloat16 on this CPU (they need AVX-512; AVX512-BF16 or AMX make them
    fast), rather than torch's far slower fallbacks; True where torch cannot tell, so that no false warning is
    given."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def pipeline_class(path: str):
    """StableDiffusionXLPipeline for an SDXL model (its model_index.json says so), else StableDiffusionPipeline."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    index = os.path.join(path, "model_index.json")
    if os.path.isdir(path):
        with open(index) as f:
            name = json.load(f).get("_class_name", "")
    else:
        name = DiffusionPipeline.load_config(path).get("_class_name", "")
    return StableDiffusionXLPipeline if "XL" in name else StableDiffusionPipeline


def load_base_pipeline(spec: str, device: torch.device, dtype: torch.dtype | None = None):
    from diffusers import StableDiffusionPipeline

    path = resolve_base(spec)
    dtype = dtype or pick_dtype("auto", device)
    cls = pipeline_class(path)
    # SD's safety checker is not a served module; SDXL's invisible watermark would change the pixels a PNG's
    # parameters reproduce.
    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False) \
        if cls is StableDiffusionPipeline else dict(add_watermarker=False)
    pipe = cls.from_pretrained(path, dtype=dtype, local_files_only=os.path.isdir(path), **extra)
    pipe.set_progress_bar_config(disable=True)
    # Served modules are never trained in place (training works on copies): no gradients into them.
    for module in served_modules(pipe):
        module.requires_grad_(False)
    return pipe.to(device)


def served_modules(pipe) -> list:
    """The pipeline's weights: UNet, text encoder(s), VAE."""
    return [m for m in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.vae)
            if m is not None]


# A metamodel's trained trunks are written in float32 whatever the served dtype (as diffusers' DreamBooth script
# writes its float32 master weights), and its next DreamBooth step trains from them: rounding a trunk to the
# served dtype loses a measured share of each update (docs/research/precision.md).
TRUNK_DTYPE = torch.float32


def load_base_module(spec: str, name: str, device: torch.device, dtype: torch.dtype):
    """The base model's `unet` or `text_encoder` in `dtype`, apart from the served pipeline: a service serving in
    a lower precision trains DreamBooth trunks from these float32 weights, not from its rounded served copies."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    path = resolve_base(spec)
    cls = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}[name]
    module = cls.from_pretrained(path, subfolder=name, dtype=dtype, local_files_only=os.path.isdir(path))
    return module.to(device).requires_grad_(False).eval()


def image_size(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def defaults_of(spec: str) -> dict:
    """Generation defaults the model ships with (a model folder's big_defaults.json, as the embedded model ships)."""
    p = os.path.join(resolve_base(spec), "big_defaults.json")
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return {}


@functools.lru_cache(maxsize=None)
def _per_image_guidance_pipeline_class(base_class):
    class PerImageGuidancePipeline(base_class):
        """Stable Diffusion (or SDXL) whose `guidance_scale` may also be one value per image (a [batch] tensor).

        diffusers applies `uncond + guidance_scale * (cond - uncond)` with whatever `guidance_scale` is, so a
        [batch, 1, 1, 1] tensor gives every image its own scale in one batched call (a guidance sweep or a
        grid is one call, not one per value). Only the on/off test needs to know about tensors; all values
        must then be > 1, as CFG is off at or below 1 (callers batch those separately).
        """

        @property
        def do_classifier_free_guidance(self):
            g = self._guidance_scale
            on = bool((g > 1).all()) if isinstance(g, torch.Tensor) else g > 1
            return on and self.unet.config.time_cond_proj_dim is None

    PerImageGuidancePipeline.__name__ = f"PerImageGuidance{base_class.__name__}"
    return PerImageGuidancePipeline


def compose(base_pipe, unet=None, text_encoder=None, scheduler=None, text_encoder_2=None):
    """A pipeline object over the base's modules with some replaced (no weights are copied)."""
    from diffusers import StableDiffusionXLPipeline

    comps = dict(base_pipe.components)
    for name, module in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if module is not None:
            comps[name] = module
    comps["scheduler"] = scheduler or type(base_pipe.scheduler).from_config(base_pipe.scheduler.config)
    if is_xl(base_pipe):
        pipe = _per_image_guidance_pipeline_class(StableDiffusionXLPipeline)(
            **comps, force_zeros_for_empty_prompt=base_pipe.config.force_zeros_for_empty_prompt, add_watermarker=False)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = _per_image_guidance_pipeline_class(StableDiffusionPipeline)(**comps, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def module_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())


def as_dtype(module, dtype):
    """`module` (None passes through) cast in place to `dtype`, left untouched when it already has it (it may be
    a served module). Through `half()` / `bfloat16()` / `float()`: diffusers warns on every dtype `to()` of a
    model that lists fp32-only modules, even none (as the embedded UNet does)."""
    if module is None or next(module.parameters()).dtype == dtype:
        return module
    casts = {torch.float16: module.half, torch.bfloat16: module.bfloat16, torch.float32: module.float}
    return casts[dtype]() if dtype in casts else module.to(dtype)
