"""Turning request parameters and documents into checked values, or a clear BadRequest.

Jina sends parameters as a protobuf Struct: every number arrives as a float, so integers are cast
here (and a non-integral "integer" is an error, not a silent floor).
"""
from __future__ import annotations

import dataclasses
import io
import math
import re
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from big.generation import prompting, schedulers
from big.errors import BadRequest

TRAIN_TARGETS = ("private", "meta", "private_meta")
# How a metamodel keeps earlier concepts (benchmarks/continual.py compares them), as data:
#   naive       plain sequential DreamBooth: class images of the current category only
#   seed_split  the BIG recipe: prior batch split over categories and earlier instances (planner.py)
#   anchored    seed_split plus an L2 pull towards the weights before this concept (L2-SP)
#   replay      seed_split with twice the prior batch per step (more replay of earlier concepts and of
#               class images) and a light L2-SP anchor
#   balanced    replay, but each step's prior batch is drawn evenly over the plan's groups (each category's
#               class images, each earlier concept) instead of over the pooled images, so an early concept
#               keeps its share of every step however many concepts came after it
#   adapters    each concept its own LoRA (+ identifier embedding) over the unchanged trunk, applied to the
#               prompts that name it (metamodel.py); learned by method 'lora' with class images only
# `replay_earlier`: plan earlier concepts and other categories into the prior batch; `prior_batch_factor`:
# prior images per step as a multiple of the instance batch; `anchor_weight`: the L2-SP weight, which a
# request's own `anchor_weight` overrides; `finetune_defaults`: over the method's defaults (rank 4, because
# rank 1 learned the star-with-ring concept to 0.62-0.88 over three seeds and rank 4 to 1.00 on each); a
# model's `per_strategy` defaults come over those (the embedded model: 600 steps for adapters).
METAMODEL_STRATEGY_SETTINGS = {
    "naive": dict(replay_earlier=False, prior_batch_factor=1, anchor_weight=0.0),
    "seed_split": dict(replay_earlier=True, prior_batch_factor=1, anchor_weight=0.0),
    "anchored": dict(replay_earlier=True, prior_batch_factor=1, anchor_weight=1e-3),
    "replay": dict(replay_earlier=True, prior_batch_factor=2, anchor_weight=2e-4),
    "balanced": dict(replay_earlier=True, prior_batch_factor=2, anchor_weight=2e-4, balanced=True),
    "adapters": dict(replay_earlier=False, prior_batch_factor=1, anchor_weight=0.0, adapters=True,
                     finetune_defaults=dict(lora_rank=4)),
}
DEFAULT_METAMODEL_STRATEGY = "adapters"
METAMODEL_STRATEGIES = tuple(METAMODEL_STRATEGY_SETTINGS)
# How a concept is learned. A metamodel's strategy decides its method (adapters: LoRA; the others rewrite the
# whole trunk by DreamBooth); a private concept defaults to LoRA (megabytes, applied to the base per request).
METHODS = ("dreambooth", "lora", "textual_inversion")
CROPS = ("center", "focal")
MAX_HUE_COPIES = 7
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")  # diffusers' get_scheduler names
GENERATE_TARGETS = TRAIN_TARGETS + ("pretrained",)
_CATEGORY = re.compile(r"^[a-z][a-z0-9 \-]{0,31}$")
_WORD = re.compile(r"^[a-z][a-z0-9\-]{0,31}$")
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclasses.dataclass(frozen=True)
class Limits:
    min_images: int = 1
    max_images: int = 32
    min_image_side: int = 32
    max_train_steps: int = 5000
    min_learning_rate: float = 1e-8
    max_learning_rate: float = 1e-2
    max_num_images: int = 16
    max_inference_steps: int = 150
    max_guidance_scale: float = 50.0
    max_side: int = 1024
    max_num_class_images: int = 1000
    max_prompt_chars: int = 1000
    max_prompt_parts: int = 8  # `AND` parts: each is one more UNet pass per step
    max_part_weight: float = 10.0  # |weight| of an `AND` part (it multiplies the guidance scale)
    max_grid_images: int = 256  # /grid and /sweep: images in one request
    max_import_bytes: int = 64 * 1024 * 1024  # /import: one concept file
    max_export_bytes: int = 512 * 1024 * 1024  # /export: a DreamBooth concept is a whole UNet
    max_lora_rank: int = 128


def given(params: dict, name: str, default):
    """The parameter's value, or `default` when it is absent or null: JSON clients send `"seed": null`
    for "not set", and a null must never reach the training or sampling code."""
    v = params.get(name)
    return default if v is None else v


def number(params: dict, name: str, default, lo, hi, *, integer: bool):
    v = given(params, name, default)
    if v is None:
        return None
    if isinstance(v, bool):  # Python counts True as 1: a client that sends a flag here has the wrong parameter
        raise BadRequest(f"{name} must be a number, got {v!r}")
    if not isinstance(v, (int, float)):
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise BadRequest(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(v):
        raise BadRequest(f"{name} must be finite")
    if integer:
        if float(v) != int(v):
            raise BadRequest(f"{name} must be an integer, got {v}")
        v = int(v)
    if not lo <= v <= hi:
        raise BadRequest(f"{name} must be within [{lo}, {hi}], got {v}")
    return v


def number_list(params: dict, name: str, default, lo, hi, *, integer: bool) -> list | None:
    """A list of numbers (or one number, taken as a list of one), each within [lo, hi]."""
    v = given(params, name, default)
    if v is None:
        return None
    items = v if isinstance(v, (list, tuple)) else [v]
    if not items:
        raise BadRequest(f"{name} must not be empty")
    return [number({name: x}, name, None, lo, hi, integer=integer) for x in items]


def flag(params: dict, name: str, default: bool) -> bool:
    """true/false, also as the strings and 0/1 a command line sends ("false" must not read as true)."""
    v = given(params, name, default)
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    raise BadRequest(f"{name} must be true or false, got {v!r}")


def category_of(params: dict) -> str:
    cat = params.get("category")
    if not isinstance(cat, str) or not cat.strip():
        raise BadRequest("category is required (e.g. 'dog', 'bottle', 'painting')")
    cat = " ".join(cat.lower().split())
    if not _CATEGORY.match(cat):
        raise BadRequest("category must be 1-32 characters of lowercase letters, digits, spaces or '-'")
    return cat


def target_of(params: dict, allowed: tuple[str, ...], default: str) -> str:
    t = given(params, "target_model", default)
    if t not in allowed:
        raise BadRequest(f"target_model must be one of {', '.join(allowed)}; got {t!r}")
    return t


@dataclasses.dataclass(frozen=True)
class FinetuneRequest:
    target: str
    category: str
    learning_rate: float
    max_train_steps: int
    num_class_images: int
    seed: int
    train_text_encoder: bool
    prior_loss_weight: float
    train_batch_size: int
    wait: bool
    metamodel_strategy: str
    anchor_weight: float | None  # None: the strategy's own
    train_identifier_embedding: bool
    embedding_learning_rate: float
    captions: tuple[str | None, ...] | None = None
    method: str = "dreambooth"
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_text_encoder: bool = False
    lora_targets: str = "attention"
    num_vectors: int = 1
    init_text: str | None = None
    overwrite: str | None = None  # textual inversion: retrain this existing word's embedding instead
    crop: str = "center"
    flip: bool = False
    hue_copies: int = 0  # hue-rotated copies of each image (a style that should not bind its images' colours)
    split_oversized: bool = False
    prompt_templates: tuple[str, ...] | None = None  # "[name]", "[filewords]", "[category]" are filled in
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    snr_gamma: float | None = None  # Min-SNR loss weighting; None: plain MSE

    def as_params(self) -> dict:
        return dataclasses.asdict(self)


def parse_finetune(params: dict, defaults: dict, limits: Limits) -> FinetuneRequest:
    target = target_of(params, TRAIN_TARGETS, "private")
    strategy = _choice(params, "metamodel_strategy", METAMODEL_STRATEGIES,
                       defaults.get("metamodel_strategy", DEFAULT_METAMODEL_STRATEGY))
    if target == "private":
        method = _choice(params, "method", METHODS, defaults.get("method", "lora"))
    else:  # a metamodel's strategy decides how it learns
        method = "lora" if METAMODEL_STRATEGY_SETTINGS[strategy].get("adapters") else "dreambooth"
        asked = _choice(params, "method", METHODS, method)
        if asked != method:
            raise BadRequest(f"metamodel_strategy {strategy!r} learns by method {method!r}, not {asked!r} "
                             f"(strategy 'adapters' learns LoRA adapters, the others DreamBooth)")
    # Each method's own defaults (learning rate, steps, class images) come before the shared ones.
    defaults = {**defaults, **defaults.get("per_method", {}).get(method, {})}
    if target != "private":  # then the strategy's own, then what the model's config sets for that strategy
        defaults.update(METAMODEL_STRATEGY_SETTINGS[strategy].get("finetune_defaults", {}))
        defaults.update(defaults.get("per_strategy", {}).get(strategy, {}))
    overwrite = params.get("overwrite")
    if overwrite is not None:
        overwrite = word_of(overwrite, "overwrite must be the one lowercase word whose embedding to retrain")
    if overwrite and method != "textual_inversion":
        raise BadRequest("overwrite is a textual_inversion mode")
    init_text = params.get("init_text")
    if init_text is not None and (not isinstance(init_text, str) or len(init_text) > 100):
        raise BadRequest("init_text must be a short text (at most 100 characters)")
    rank = number(params, "lora_rank", defaults.get("lora_rank", 4), 1, limits.max_lora_rank, integer=True)
    max_train_steps = number(params, "max_train_steps", defaults["max_train_steps"], 1, limits.max_train_steps,
                             integer=True)
    return FinetuneRequest(
        lr_scheduler=_choice(params, "lr_scheduler", LR_SCHEDULERS, defaults.get("lr_scheduler", "constant")),
        lr_warmup_steps=number(params, "lr_warmup_steps", min(defaults.get("lr_warmup_steps", 0), max_train_steps),
                               0, max_train_steps, integer=True),
        snr_gamma=number(params, "snr_gamma", defaults.get("snr_gamma"), 0.1, 1000.0, integer=False),
        method=method,
        lora_rank=rank,
        lora_alpha=number(params, "lora_alpha", float(rank), 1e-3, 1e4, integer=False),
        lora_text_encoder=flag(params, "lora_text_encoder", False),
        lora_targets=_choice(params, "lora_targets", ("attention", "attention_ff", "all"),
                             defaults.get("lora_targets", "attention")),
        num_vectors=number(params, "num_vectors", 1, 1, 16, integer=True) if not overwrite else
        _only_one_vector(params),
        init_text=init_text or None,
        overwrite=overwrite or None,
        crop=_choice(params, "crop", CROPS, "center"),
        flip=flag(params, "flip", False),
        hue_copies=number(params, "hue_copies", 0, 0, MAX_HUE_COPIES, integer=True),
        split_oversized=flag(params, "split_oversized", False),
        prompt_templates=templates_of(params),
        target=target,
        category=category_of(params),
        learning_rate=number(params, "learning_rate", defaults["learning_rate"], limits.min_learning_rate,
                              limits.max_learning_rate, integer=False),
        max_train_steps=max_train_steps,
        num_class_images=number(params, "num_class_images", defaults["num_class_images"], 0,
                                 limits.max_num_class_images, integer=True),
        seed=number(params, "seed", 0, 0, 2**31 - 1, integer=True),
        train_text_encoder=flag(params, "train_text_encoder", defaults.get("train_text_encoder", False)),
        prior_loss_weight=number(params, "prior_loss_weight", 1.0, 0.0, 10.0, integer=False),
        train_batch_size=number(params, "train_batch_size", defaults.get("train_batch_size", 4), 1, 64,
                                 integer=True),
        wait=flag(params, "wait", True),
        metamodel_strategy=strategy,
        anchor_weight=number(params, "anchor_weight", defaults.get("anchor_weight"), 0.0, 1e6,
                              integer=False),
        train_identifier_embedding=flag(params, "train_identifier_embedding",
                                         defaults.get("train_identifier_embedding", True)),
        embedding_learning_rate=number(params, "embedding_learning_rate",
                                        defaults.get("embedding_learning_rate", 1e-3), limits.min_learning_rate,
                                        1.0, integer=False),
        captions=captions_of(params),
    )


def word_of(value: Any, error: str) -> str:
    """A concept's word chosen by the caller (an overwritten word, an imported concept's identifier)."""
    if not isinstance(value, str) or not _WORD.match(value):
        raise BadRequest(error)
    return value


def _only_one_vector(params: dict) -> int:
    if number(params, "num_vectors", 1, 1, 16, integer=True) != 1:
        raise BadRequest("overwrite retrains one existing token: num_vectors must be 1")
    return 1


def templates_of(params: dict) -> tuple[str, ...] | None:
    """`prompt_template`: one template or a list ("a painting of [filewords] by [name]"), as in
    AUTOMATIC1111's template files; every image is taught with every template."""
    v = params.get("prompt_template")
    if v is None:
        return None
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not items or len(items) > 32 or \
            not all(isinstance(t, str) and t.strip() and len(t) <= 300 for t in items):
        raise BadRequest("prompt_template must be a template string or a list of at most 32 of them")
    if not all("[name]" in t for t in items):
        raise BadRequest("every prompt_template must contain [name], where the concept's word goes")
    return tuple(" ".join(t.split()) for t in items)


def captions_of(params: dict) -> tuple[str | None, ...] | None:
    """Optional per-image captions ("a red boat"): a list as long as the images, None or "" for none."""
    v = params.get("captions")
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not all(c is None or isinstance(c, str) for c in v):
        raise BadRequest("captions must be a list of strings, one per image")
    out = []
    for c in v:
        c = " ".join(c.split()) if c else ""
        if len(c) > 200:
            raise BadRequest("a caption is at most 200 characters")
        out.append(c or None)
    return tuple(out)


def _choice(params: dict, name: str, allowed: tuple[str, ...], default: str) -> str:
    v = given(params, name, default)
    if v not in allowed:
        raise BadRequest(f"{name} must be one of {', '.join(allowed)}; got {v!r}")
    return v


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    target: str
    identifier: str | None
    num_images: int
    num_inference_steps: int
    guidance_scale: float
    negative_prompt: str | None
    seed: int | None
    height: int
    width: int
    scheduler: str | None  # a key of schedulers.SAMPLERS; None: the model's own
    model_version: int | None  # None: the model's current version
    emphasis: str = prompting.DEFAULT_EMPHASIS  # one of prompting.EMPHASIS_MODES
    identifiers: tuple[str, ...] = ()  # private concepts named by the request (else found in the prompts)


def parse_generate(params: dict, defaults: dict, limits: Limits) -> GenerateRequest:
    neg = params.get("negative_prompt")
    if neg is not None and not isinstance(neg, str):
        raise BadRequest("negative_prompt must be a string")
    if neg is not None and len(neg) > limits.max_prompt_chars:  # it costs text-encoder passes as a prompt does
        raise BadRequest(f"negative_prompt longer than {limits.max_prompt_chars} characters")
    ident = params.get("identifier")
    idents = params.get("identifiers")
    if idents is not None and (not isinstance(idents, (list, tuple)) or len(idents) > 16):
        raise BadRequest("identifiers must be a list of at most 16 concept words")
    names = ([ident] if ident is not None else []) + list(idents or [])
    for name in names:
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_\-]{1,64}$", name):
            raise BadRequest("identifier must be the word /finetune returned (letters and digits)")
    h = number(params, "height", defaults["height"], 8, limits.max_side, integer=True)
    w = number(params, "width", defaults["width"], 8, limits.max_side, integer=True)
    if h % 8 or w % 8:
        raise BadRequest("height and width must be multiples of 8")
    return GenerateRequest(
        target=target_of(params, GENERATE_TARGETS, "pretrained"),
        identifier=ident,
        num_images=number(params, "num_images", 1, 1, limits.max_num_images, integer=True),
        num_inference_steps=number(params, "num_inference_steps", defaults["num_inference_steps"], 1,
                                    limits.max_inference_steps, integer=True),
        guidance_scale=number(params, "guidance_scale", defaults["guidance_scale"], 0.0,
                               limits.max_guidance_scale, integer=False),
        negative_prompt=neg,
        seed=number(params, "seed", None, 0, 2**31 - 1, integer=True),
        height=h,
        width=w,
        scheduler=schedulers.resolve(sched).key if (sched := given(params, "scheduler", defaults.get("scheduler")))
        else None,
        model_version=number(params, "model_version", None, 0, 2**31 - 1, integer=True),
        emphasis=emphasis_of(given(params, "emphasis", defaults.get("emphasis", prompting.DEFAULT_EMPHASIS))),
        identifiers=tuple(dict.fromkeys(names)),
    )


def emphasis_of(value: Any) -> str:
    mode = value.strip().lower() if isinstance(value, str) else value
    if mode not in prompting.EMPHASIS_MODES:
        raise BadRequest(f"emphasis must be one of {', '.join(prompting.EMPHASIS_MODES)}")
    return mode


def prompt_of(text: Any, limits: Limits) -> str:
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("each document needs a non-empty `text` prompt")
    if len(text) > limits.max_prompt_chars:
        raise BadRequest(f"prompt longer than {limits.max_prompt_chars} characters")
    parts = prompting.composable_parts(text.strip())
    if len(parts) > limits.max_prompt_parts:
        raise BadRequest(f"a prompt has at most {limits.max_prompt_parts} AND parts (this one: {len(parts)})")
    for part, weight in parts:
        if not part:
            raise BadRequest("an AND part is empty: write `a qzq painting AND a sks dog :1.5`")
        if not abs(weight) <= limits.max_part_weight:
            raise BadRequest(f"an AND part's weight must be within +-{limits.max_part_weight:g} (got {weight:g})")
    return text.strip()


def decode_image(doc: Any, index: int, limits: Limits) -> Image.Image:
    """An RGB PIL image from a docarray ImageDoc-like document (bytes_, blob, tensor); never a URL."""
    data = getattr(doc, "bytes_", None) or getattr(doc, "blob", None)
    tensor = getattr(doc, "tensor", None)
    if data:
        if len(data) > MAX_IMAGE_BYTES:
            raise BadRequest(f"image {index}: larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB")
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise BadRequest(f"image {index}: more than {MAX_IMAGE_PIXELS} pixels")
                im.load()
                img = im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise BadRequest(f"image {index}: not a readable image ({type(e).__name__})") from None
    elif tensor is not None:
        arr = np.asarray(tensor)
        if arr.ndim != 3:
            raise BadRequest(f"image {index}: tensor must be HxWxC or CxHxW")
        if arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = np.transpose(arr, (1, 2, 0))
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        img = Image.fromarray(arr[..., :3], "RGB")
    elif getattr(doc, "url", None) or getattr(doc, "uri", None):
        raise BadRequest(f"image {index}: send the image bytes; remote URLs are not fetched")
    else:
        raise BadRequest(f"image {index}: no image data (set `bytes_` or `tensor`)")
    if min(img.size) < limits.min_image_side:
        raise BadRequest(f"image {index}: {img.width}x{img.height} is below the minimum side of "
                         f"{limits.min_image_side} px")
    return img


def decode_instance_images(docs, limits: Limits) -> list[Image.Image]:
    n = len(docs) if docs is not None else 0
    if n < limits.min_images:
        raise BadRequest("no instance images: send 3-10 images of your object or style as documents")
    if n > limits.max_images:
        raise BadRequest(f"too many images ({n}); at most {limits.max_images}")
    return [decode_image(d, i, limits) for i, d in enumerate(docs)]
