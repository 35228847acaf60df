"""Turning a request's parameters into typed, checked values, or a clear BadRequest naming the parameter.

Parameters travel as a protobuf Struct: every number arrives as a float, so integers are cast here (and a
non-integral "integer" is an error, not a silent floor). Each request is parsed once, here; what follows works
on the typed values.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

from big.config import METHODS, Limits, finetune_defaults_for
from big.errors import BadRequest
from big.generation import prompting, schedulers
from big.weights.metamodel import DEFAULT_METAMODEL_STRATEGY, METAMODEL_STRATEGIES, method_of_strategy

TRAIN_TARGETS = ("private", "meta", "private_meta")
GENERATE_TARGETS = TRAIN_TARGETS + ("pretrained",)
CROPS = ("center", "focal")
MAX_HUE_COPIES = 7
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")  # diffusers' get_scheduler names
_CATEGORY = re.compile(r"^[a-z][a-z0-9 \-]{0,31}$")
_WORD = re.compile(r"^[a-z][a-z0-9\-]{0,31}$")


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


def request_key_of(params: dict) -> str | None:
    """A writing request's `idempotency_key` (any 1-200 printable characters: a UUID per call, a tune's title),
    or None when the request has none."""
    key = given(params, "idempotency_key", None)
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= 200 or not key.isprintable():
        raise BadRequest("idempotency_key must be 1-200 printable characters (e.g. a UUID made once per request)")
    return key


def target_of(params: dict, allowed: tuple[str, ...], default: str) -> str:
    return _choice(params, "target_model", allowed, default)


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

    @classmethod
    def from_params(cls, params: dict) -> "FinetuneRequest":
        """The request back from `as_params` (as a queued job keeps it, in JSON)."""
        tuples = {k: tuple(params[k]) for k in ("captions", "prompt_templates") if params.get(k) is not None}
        return cls(**{**params, **tuples})


def parse_finetune(params: dict, defaults: dict, limits: Limits) -> FinetuneRequest:
    target = target_of(params, TRAIN_TARGETS, "private")
    strategy = _choice(params, "metamodel_strategy", METAMODEL_STRATEGIES,
                       defaults.get("metamodel_strategy", DEFAULT_METAMODEL_STRATEGY))
    if target == "private":
        method = _choice(params, "method", METHODS, defaults.get("method", "lora"))
    else:  # a metamodel's strategy decides how it learns
        method = method_of_strategy(strategy)
        asked = _choice(params, "method", METHODS, method)
        if asked != method:
            raise BadRequest(f"metamodel_strategy {strategy!r} learns by method {method!r}, not {asked!r} "
                             f"(strategy 'adapters' learns LoRA adapters, the others DreamBooth)")
    defaults = finetune_defaults_for(defaults, method, strategy if target != "private" else None)
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
    parts = prompting.parse_prompt(text.strip()).parts
    if len(parts) > limits.max_prompt_parts:
        raise BadRequest(f"a prompt has at most {limits.max_prompt_parts} AND parts (this one: {len(parts)})")
    for part, weight in parts:
        if not part:
            raise BadRequest("an AND part is empty: write `a qzq painting AND a sks dog :1.5`")
        if not abs(weight) <= limits.max_part_weight:
            raise BadRequest(f"an AND part's weight must be within +-{limits.max_part_weight:g} (got {weight:g})")
    return text.strip()


# ---------------------------------------------------------------- /sweep and /grid
SWEEPABLE = {
    # parameter: (default start, default stop, default number of frames, integer?)
    "guidance_scale": (0.0, 30.0, 31, False),
    "num_inference_steps": (5, 50, 10, True),
}


def sweep_values(parameter: str, values: Sequence[Any] | None = None, start=None, stop=None, num=None,
                 *, max_frames: int, max_steps: int, max_guidance: float) -> list:
    """The swept values: `values` as given, else `num` evenly spaced from `start` to `stop` (both included)."""
    if not isinstance(parameter, str) or parameter not in SWEEPABLE:
        raise BadRequest(f"sweep parameter must be one of {', '.join(SWEEPABLE)}")
    d_start, d_stop, d_num, integer = SWEEPABLE[parameter]
    if values is not None:
        if not isinstance(values, (list, tuple)) or not values:
            raise BadRequest("sweep `values` must be a non-empty list of numbers")
        frames = len(values)
    else:
        start = d_start if start is None else start
        stop = d_stop if stop is None else stop
        num = d_num if num is None else num
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (start, stop)):
            raise BadRequest("sweep `start` and `stop` must be numbers")
        if isinstance(num, bool) or not isinstance(num, (int, float)) or not math.isfinite(num) or \
                int(num) != num or num < 1:
            raise BadRequest("sweep `num` must be a positive whole number")
        frames = int(num)
    if frames > max_frames:  # counted before any list is built: a huge `num` must not take the server's memory
        raise BadRequest(f"a sweep has at most {max_frames} frames")
    if values is not None:
        out = list(values)
    else:
        out = [start + (stop - start) * i / (frames - 1) for i in range(frames)] if frames > 1 else [start]
    # Checked as any number parameter is (no bools, finite: an infinite step count cannot round), then rounded.
    out = [number({"sweep values": v}, "sweep values", None, -math.inf, math.inf, integer=False) for v in out]
    out = [int(round(v)) if integer else round(v, 4) for v in out]
    lo, hi = (1, max_steps) if integer else (0.0, max_guidance)
    if any(not lo <= v <= hi for v in out):
        raise BadRequest(f"{parameter} values must lie in [{lo}, {hi}]")
    return out


@dataclasses.dataclass(frozen=True)
class SweepRequest:
    parameter: str
    values: tuple


def parse_sweep(params: dict, limits: Limits) -> SweepRequest:
    parameter = given(params, "sweep", "guidance_scale")
    values = sweep_values(parameter, params.get("values"), params.get("start"), params.get("stop"),
                          params.get("num"), max_frames=limits.max_grid_images, max_steps=limits.max_inference_steps,
                          max_guidance=limits.max_guidance_scale)
    return SweepRequest(parameter, tuple(values))


@dataclasses.dataclass(frozen=True)
class GridRequest:
    """Either `random_samples` per prompt around the request's setting, or every combination of the lists
    (`seeds` None: `num_seeds` consecutive seeds from the request's seed)."""

    random_samples: int | None
    guidance_scales: tuple | None = None
    steps: tuple | None = None
    seeds: tuple | None = None
    num_seeds: int = 1
    guidance_spread: float = 0.5
    steps_spread: float = 0.5

    def images_per_prompt(self) -> int:
        if self.random_samples:
            return self.random_samples
        return len(self.guidance_scales) * len(self.steps) * (len(self.seeds) if self.seeds else self.num_seeds)


def parse_grid(params: dict, req: GenerateRequest, limits: Limits) -> GridRequest:
    n_random = number(params, "random_samples", None, 1, limits.max_grid_images, integer=True)
    if n_random:
        return GridRequest(
            n_random, guidance_spread=number(params, "guidance_spread", 0.5, 0.0, 1.0, integer=False),
            steps_spread=number(params, "steps_spread", 0.5, 0.0, 1.0, integer=False))
    guidance = number_list(params, "guidance_scales", [req.guidance_scale], 0.0, limits.max_guidance_scale,
                           integer=False)
    steps = number_list(params, "steps", [req.num_inference_steps], 1, limits.max_inference_steps, integer=True)
    seeds = number_list(params, "seeds", None, 0, 2**31 - 1, integer=True)
    num_seeds = 1 if seeds else number(params, "num_seeds", 1, 1, limits.max_grid_images, integer=True)
    return GridRequest(None, tuple(guidance), tuple(steps), tuple(seeds) if seeds else None, num_seeds)
