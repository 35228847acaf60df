"""What a service is configured with, and the one place defaults are layered.

Precedence of finetune defaults, lowest first (written here once; `docs/configuration.md` explains each layer):
  1. the shared values of each file layer in turn: BIG's `DEFAULT_FINETUNE`, the base model's
     `big_defaults.json` (`finetune_defaults`), `config.yml`'s `finetune_defaults`;
  2. the same layers' `per_method[<method>]` values;
  3. for a metamodel, its strategy's own `finetune_defaults` (`weights.metamodel.METAMODEL_STRATEGY_SETTINGS`);
  4. the file layers' `per_strategy[<strategy>]` values.
So a per-method or per-strategy value from any file wins over a shared one from any file.
Generation defaults: `DEFAULT_GENERATE` and the model's size, then the model's `default_guidance_scale`,
then `config.yml`'s `generate_defaults`, with the model's `default_steps` where nothing else set the steps.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Mapping, Sequence

from big.generation.sampling import DEFAULT_GENERATION_BATCH
from big.training.memory import check_settings
from big.weights.metamodel import DEFAULT_METAMODEL_STRATEGY, METAMODEL_STRATEGIES, METAMODEL_STRATEGY_SETTINGS

EMBEDDED = "embedded"
# The embedded model is data in the repository, found without importing the package of its world.
EMBEDDED_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "shapes-sd")
# How a concept is learned. A metamodel's strategy decides its method (adapters: LoRA; the others rewrite the
# whole trunk by DreamBooth); a private concept defaults to LoRA (megabytes, applied to the base per request).
METHODS = ("dreambooth", "lora", "textual_inversion")

DEFAULT_FINETUNE = dict(learning_rate=1e-4, max_train_steps=200, num_class_images=48, train_batch_size=4,
                        train_text_encoder=False, metamodel_strategy=DEFAULT_METAMODEL_STRATEGY,
                        train_identifier_embedding=True, embedding_learning_rate=1e-3, method="lora",
                        # Each method's own: diffusers' DreamBooth-LoRA settings; an embedding trains nothing
                        # that class images could protect, so it generates none.
                        per_method={"lora": dict(learning_rate=1e-4, lora_rank=4, lora_targets="attention"),
                                    "textual_inversion": dict(num_class_images=0, embedding_learning_rate=5e-3)})
DEFAULT_GENERATE = dict(num_inference_steps=20, guidance_scale=7.5)
ROLES = ("all", "serve", "train")
# Settings the environment sets over config.yml (a container's or a cluster's way to set them), for the Executor
# and `python -m big.worker` alike; docs/configuration.md's table lists each beside its setting.
ENV_OVERRIDES = {"base_model": "BIG_BASE_MODEL", "workspace": "BIG_WORKSPACE", "dtype": "BIG_DTYPE",
                 "database_url": "BIG_DATABASE_URL", "role": "BIG_ROLE", "serve_threads": "BIG_SERVE_THREADS"}


class ConfigError(ValueError):
    """A setting that BIG does not have, or a value it cannot take: raised at start, naming the key."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; each bound is a `limits:` key of config.yml."""

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
    max_image_bytes: int = 8 * 1024 * 1024  # one instance image as sent
    max_image_pixels: int = 4096 * 4096  # one instance image decoded, checked from its header before decoding
    # |value| of an imported LoRA's or embedding's weights: trained ones stay far below it, and larger ones
    # overflow the served dtype's products (an all-1e30 LoRA renders black even in float32)
    max_weight_magnitude: float = 1e4
    # What one user may hold (QuotaExceeded past each): generation requests waiting for the serving thread,
    # training jobs queued or running, private concepts, and the bytes of their files.
    max_queued_generations: int = 16
    max_jobs_per_user: int = 4
    max_private_concepts_per_user: int = 200
    max_stored_bytes_per_user: int = 4 * 1024**3
    # Images a training job may have after tiling and flipping, and images one /generate or render call may
    # make, as multiples of max_images and max_num_images (a prompt list times num_images).
    max_prepared_factor: int = 4
    max_request_images_factor: int = 4

    @property
    def max_message_bytes(self) -> int:
        """The largest gRPC message a request within these limits needs: every instance image at its largest,
        with room for the parameters and prompts (flow.yml's `grpc.max_receive_message_length`)."""
        return self.max_images * self.max_image_bytes + 16 * 1024 * 1024

    @property
    def max_prepared_images(self) -> int:
        return self.max_prepared_factor * self.max_images

    @property
    def max_request_images(self) -> int:
        return self.max_request_images_factor * self.max_num_images


@dataclasses.dataclass
class ServiceConfig:
    workspace: str = "workspace"
    base_model: str = EMBEDDED
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
    generation_batch: int = DEFAULT_GENERATION_BATCH
    cache_max_bytes: int = 4 * 1024**3
    train_workers: int = 1
    train_threads: int | None = None  # torch CPU threads of a training job's thread; None: torch's default
    # How a job fits the accelerator (big/training/memory.py): auto picks from the device's free memory and steps
    # up when a try runs out of it; `adamw8bit` needs bitsandbytes.
    optimizer: str = "auto"
    gradient_checkpointing: str | bool = "auto"
    # A request's LoRA adapters (a metamodel prompt's route, private concepts) merged into a cached UNet copy
    # (in cache_max_bytes) instead of applied unmerged per call: same images within rounding, the base's speed.
    fuse_adapters: bool = True
    limits: Limits = dataclasses.field(default_factory=Limits)
    # Where the registry and the job queue live: None is a SQLite file in the workspace; a SQLAlchemy URL
    # (postgresql+psycopg://user@host/db) is one database for every replica and worker.
    database_url: str | None = None
    # What this process does: "all" serves and trains (one process, the embedded default), "serve" serves and
    # queues jobs for workers, "train" runs queued jobs only (`python -m big.worker`).
    role: str = "all"
    # A worker renews its job's lease every quarter of this; a job whose lease passed is run again elsewhere.
    job_lease_s: float = 20.0
    job_poll_s: float = 0.5  # how often an idle worker looks for a queued job
    max_job_attempts: int = 3  # a job whose worker dies this many times fails instead of being run again
    # How long a /finetune's or /import's idempotency key maps a retried request to what its first try made.
    request_key_ttl_s: float = 24 * 3600.0
    # torch CPU threads of the serving thread (None: torch's default); beside a worker on one CPU, fewer.
    serve_threads: int | None = None
    # How long a lone /generate waits for other users' requests to share its pipeline calls.
    batch_window_s: float = 0.005

    def __post_init__(self):
        if self.generation_batch < 1:
            raise ValueError(f"generation_batch must be at least 1, not {self.generation_batch}")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}")
        check_settings(self.optimizer, self.gradient_checkpointing)
        if self.job_lease_s <= 0 or self.job_poll_s <= 0 or self.max_job_attempts < 1 or self.request_key_ttl_s <= 0:
            raise ValueError("job_lease_s, job_poll_s and request_key_ttl_s must be positive and max_job_attempts at "
                             "least 1")
        if self.batch_window_s < 0 or (self.serve_threads is not None and self.serve_threads < 1):
            raise ValueError("batch_window_s must not be negative, and serve_threads must be at least 1")

    @property
    def trains(self) -> bool:
        return self.role in ("all", "train")

    def described(self) -> dict:
        """The settings as a start-up log line shows them: no secret (auth's keys, a database URL's password)."""
        out = dataclasses.asdict(self)
        out["auth"] = {k: ("***" if k in ("secret", "public_key") else v) for k, v in self.auth.items()}
        if self.database_url:
            from sqlalchemy.engine import make_url

            out["database_url"] = make_url(self.database_url).render_as_string(hide_password=True)
        return out


def build_service_config(settings: Mapping[str, Any], environ: Mapping[str, str] = os.environ,
                         **overrides) -> ServiceConfig:
    """The one way a process's ServiceConfig is built, by the Executor and `python -m big.worker` alike: the
    defaults, under config.yml's `with:` values (`settings`), under the environment's (ENV_OVERRIDES), under
    `overrides` (a command line's). A None value leaves the layer below; a key that is no setting, or a value of
    the wrong kind, is a ConfigError that names it."""
    fields = {f.name: f for f in dataclasses.fields(ServiceConfig)}
    unknown = [k for k in settings if k not in fields]
    if unknown:
        raise ConfigError("; ".join(_unknown(k, fields, "setting") for k in unknown))
    layers = [settings, {k: environ[e] for k, e in ENV_OVERRIDES.items() if environ.get(e)}, overrides]
    values = {k: _coerce(k, fields[k].type, v) for layer in layers for k, v in layer.items() if v is not None}
    try:
        return ServiceConfig(**values)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def service_config_from_file(path: str, environ: Mapping[str, str] = os.environ, **overrides) -> ServiceConfig:
    """`build_service_config` of an Executor config file's `with:` block (config.yml)."""
    import yaml

    with open(path) as f:
        settings = (yaml.safe_load(f) or {}).get("with") or {}
    return build_service_config(settings, environ, **overrides)


def _unknown(key: str, known, what: str) -> str:
    near = difflib.get_close_matches(str(key), list(known), n=1)
    return f"unknown {what} {key!r}" + (f" (did you mean {near[0]!r}?)" if near else "")


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(key: str, kind: str, value):
    """A config.yml or environment value as its field's type (`kind`, the annotation's text): the environment
    gives strings, and YAML gives 1 where a float is meant."""
    try:
        if kind == "Limits":
            return value if isinstance(value, Limits) else _limits(value)
        if kind == "dict":
            if not isinstance(value, Mapping):
                raise TypeError("a mapping")
            return dict(value)
        if isinstance(value, str) and "bool" in kind and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if kind.startswith(("int", "float")):
            if isinstance(value, bool):
                raise TypeError("a number")
            number = float(value)
            if kind.startswith("int") and number != int(number):
                raise TypeError("a whole number")
            return int(number) if kind.startswith("int") else number
        if kind == "bool" and not isinstance(value, bool):
            raise TypeError("true or false")
        if kind.startswith("str") and not isinstance(value, (str, bool)):
            raise TypeError("a string")
        return value
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        what = str(e) if isinstance(e, TypeError) else "a whole number" if kind.startswith("int") else "a number"
        raise ConfigError(f"setting {key!r} must be {what}, not {value!r}") from None


def _limits(value) -> Limits:
    if not isinstance(value, Mapping):
        raise TypeError("a mapping of limits")
    names = {f.name: f for f in dataclasses.fields(Limits)}
    unknown = [k for k in value if k not in names]
    if unknown:
        raise ConfigError("; ".join(_unknown(k, names, "limit") for k in unknown))
    return Limits(**{k: _coerce(f"limits.{k}", names[k].type, v) for k, v in value.items()})


def merge_finetune_layers(layers: Sequence[dict]) -> dict:
    """Steps 1, 2 and 4 of the precedence: the shared values, and `per_method` / `per_strategy` merged key by
    key across the layers (not replaced wholesale)."""
    merged = {k: v for layer in layers for k, v in layer.items()}
    merged["per_method"] = {m: {k: v for layer in layers for k, v in layer.get("per_method", {}).get(m, {}).items()}
                            for m in METHODS}
    merged["per_strategy"] = {
        s: {k: v for layer in layers for k, v in layer.get("per_strategy", {}).get(s, {}).items()}
        for s in METAMODEL_STRATEGIES}
    return merged


def finetune_defaults_for(merged: dict, method: str, strategy: str | None) -> dict:
    """The defaults one job starts from: `merged` (from `merge_finetune_layers`) for this method and, for a
    metamodel (`strategy` given), this strategy."""
    out = {**merged, **merged.get("per_method", {}).get(method, {})}
    if strategy is not None:
        out.update(METAMODEL_STRATEGY_SETTINGS[strategy].get("finetune_defaults", {}))
        out.update(merged.get("per_strategy", {}).get(strategy, {}))
    return out


def service_defaults(config: ServiceConfig, model_defaults: dict, size: int) -> tuple[dict, dict]:
    """(finetune defaults merged over the file layers, generation defaults) of a service."""
    generate = {
        **DEFAULT_GENERATE, "height": size, "width": size,
        **{k: model_defaults[f"default_{k}"] for k in ("guidance_scale",) if f"default_{k}" in model_defaults},
        **config.generate_defaults,
    }
    if "default_steps" in model_defaults:
        generate.setdefault("num_inference_steps", model_defaults["default_steps"])
    finetune = merge_finetune_layers([DEFAULT_FINETUNE, model_defaults.get("finetune_defaults", {}),
                                      config.finetune_defaults])
    return finetune, generate
