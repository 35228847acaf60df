"""Which weights serve: model keys, their versions, and everything loaded from them.

Model keys name what is trained:
    pretrained                  the base model, never trained
    private:<concept id>        one concept, trained from the base, visible to its owner only
    private_meta:<user id>      the user's own incrementally trained metamodel
    meta                        the public metamodel every user can teach and use
`ModelStore` owns what is loaded for them: version folders read once (a committed version never changes), trunk
pipelines in a byte-bounded cache, LoRA runtimes, merged routes, and a lock per model key for its writers.
"""
from __future__ import annotations

import dataclasses
import threading

import torch

from big.config import ServiceConfig
from big.errors import BadRequest, NotFound, QuotaExceeded
from big.generation.sampling import PipelineCache
from big.storage.registry import Registry
from big.storage.versions import Version, read_version
from big.weights import embeddings, metamodel, pipelines
from big.weights.lora import LoraRuntime
from big.weights.text import TextSide

# (adapter name, LoRA file, weight) of one adapter a request turns on
AdapterUse = tuple[str, str, float]


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


def route_key(key: str, trunk: int, adapters: list[AdapterUse] = ()) -> str:
    """The cache key of a trunk, or of a trunk with these adapters merged (`key` "base": private LoRAs)."""
    route = "+".join(f"{name}*{weight}" for name, _, weight in adapters)
    return f"{key}@{trunk}" + (f"+{route}" if route else "")


@dataclasses.dataclass(frozen=True)
class ConceptWeights:
    """A private (or metamodel adapter) concept's version folder, and its embedding vectors (None without; on
    SDXL `vectors_2` are the second text encoder's)."""

    version: Version
    vectors: torch.Tensor | None
    vectors_2: torch.Tensor | None = None

    @property
    def method(self) -> str:
        return self.version.meta.method


class ModelStore:
    def __init__(self, config: ServiceConfig, registry: Registry, base_pipe, device: torch.device):
        self.config = config
        self.registry = registry
        self.base_pipe = base_pipe
        self.device = device
        self.cache = PipelineCache(config.cache_max_bytes)
        self.loras = LoraRuntime(base_pipe)
        self.text_side = TextSide.of(base_pipe)
        self._trunk_runtimes: dict[str, LoraRuntime] = {}  # route_key of a trunk -> adapters over it
        self._stacks: dict[tuple[str, int], metamodel.Stack] = {}
        self._concepts: dict[str, ConceptWeights] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def lock(self, key: str) -> threading.Lock:
        """The writers' lock of a model key: one job or import at a time commits its next version."""
        with self._locks_lock:
            return self._locks.setdefault(key, threading.Lock())

    # ------------------------------------------------------------------ keys and versions
    def resolve(self, user: str, target: str, identifier: str | None, version: int | None = None) -> tuple[str, int]:
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

    def version(self, key: str, version: int) -> Version:
        path = self.registry.version_path(key, version)
        if path is None:
            raise NotFound("model version not found")
        return read_version(path)

    def stack(self, key: str, version: int) -> metamodel.Stack:
        """A version's trunk and adapters (a private concept's version is its own trunk)."""
        if version == 0:
            return metamodel.EMPTY
        if key.startswith("private:"):
            return metamodel.Stack(version)
        stack = self._stacks.get((key, version))
        if stack is None:
            stack = metamodel.stack_of(self.version(key, version).meta.to_dict(), version)
            self._stacks[(key, version)] = stack
        return stack

    # ------------------------------------------------------------------ what serves
    def pipeline_for(self, key: str, version: int):
        """The pipeline of a version's trunk (a metamodel version's adapters are applied per prompt)."""
        trunk = self.stack(key, version).trunk_version
        if trunk == 0:
            return self.base_pipe

        def load():
            unet, text = self.version(key, trunk).modules(self.base_pipe)
            return pipelines.compose(self.base_pipe, unet=unet, text_encoder=text), pipelines.module_bytes(unet, text)

        return self.cache.get(route_key(key, trunk), load)

    def trunk_loras(self, key: str, trunk: int) -> LoraRuntime:
        """Where a metamodel's adapters are loaded: the shared base runtime when the trunk is the base, else
        one runtime per trunk (a copy of its UNet; the two most recently used trunks are kept)."""
        if trunk == 0:
            return self.loras
        name = route_key(key, trunk)
        with self._locks_lock:
            runtime = self._trunk_runtimes.pop(name, None) or LoraRuntime(self.pipeline_for(key, trunk))
            self._trunk_runtimes[name] = runtime
            while len(self._trunk_runtimes) > 2:
                self._trunk_runtimes.pop(next(iter(self._trunk_runtimes)))
        return runtime

    def fused_route(self, key: str, trunk: int, runtime: LoraRuntime, adapters: list[AdapterUse],
                    force: bool = False):
        """The trunk with these adapters merged, cached beside the loaded versions (None: not fused).
        `force`: merge even with `fuse_adapters` off (the `AND` parts of one prompt need their UNets at once)."""
        if not (self.config.fuse_adapters or force):
            return None
        adapters = sorted(adapters)  # one merged copy (and one summation order) per set, however a request lists it

        def load():
            unet = runtime.fused_unet(adapters)
            if unet is None:
                return None, 0
            return pipelines.compose(runtime.base_pipe, unet=unet), pipelines.module_bytes(unet)

        return self.cache.get(route_key(key, trunk, adapters), load)

    def noise_scheduler(self):
        """The training noise schedule of the base model."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.base_pipe.scheduler.config)

    # ------------------------------------------------------------------ concepts' weights
    def concept(self, concept: dict) -> ConceptWeights:
        """A concept's version and vectors, read once: every /generate with the concept needs them."""
        cached = self._concepts.get(concept["concept_id"])
        if cached is None:
            version = self.version(concept["model_key"], concept["version"])
            cached = ConceptWeights(version, version.embedding(), version.embedding(1))
            self._concepts[concept["concept_id"]] = cached
        return cached

    def concept_embedding(self, concept: dict, weights: ConceptWeights):
        """(token id, ConceptEmbedding) of a concept's word on the served text encoder, or None."""
        if weights.vectors is None:
            return None
        token_id = embeddings.word_token_everywhere(self.text_side.tokenizers, concept["identifier"])
        dtype = self.text_side.dtype
        return token_id, embeddings.ConceptEmbedding(
            concept["identifier"], token_id, weights.vectors.to(self.device, dtype),
            None if weights.vectors_2 is None else weights.vectors_2.to(self.device, dtype))

    def adapter_use(self, concept: dict, weight: float = 1.0) -> AdapterUse:
        return LoraRuntime.adapter_name(concept["concept_id"]), self.concept(concept).version.lora_file, weight

    def private_concepts(self, user: str) -> list[dict]:
        """The user's own private concepts, oldest first."""
        return [c for c in self.registry.list_concepts(owner=user) if c["target"] == "private" and c["owner"] == user]

    def private_words(self, user: str) -> set[str]:
        """The words of the user's private concepts (identifiers and overwritten words), unique per user."""
        return {c["identifier"] for c in self.private_concepts(user)}

    def check_quota(self, user: str, new_concepts: int = 1, new_bytes: int = 0) -> None:
        """QuotaExceeded when `new_concepts` more private concepts (of `new_bytes`) would pass the user's limits."""
        limits = self.config.limits
        mine = self.private_concepts(user)
        if len(mine) + new_concepts > limits.max_private_concepts_per_user:
            coming = f" and {new_concepts - 1} more in training" if new_concepts > 1 else ""
            raise QuotaExceeded(f"you have {len(mine)} private concepts{coming}; at most "
                                f"{limits.max_private_concepts_per_user}: delete one first")
        held = sum(self.concept(c).version.bytes() for c in mine)
        if held + new_bytes > limits.max_stored_bytes_per_user:
            raise QuotaExceeded(f"your private concepts hold {held / 2**20:.0f} MiB; at most "
                                f"{limits.max_stored_bytes_per_user / 2**20:.0f} MiB: delete one first")

    def forget(self, concept: dict) -> None:
        """Drop everything loaded for a deleted concept: its version, every merged route with its adapter."""
        adapter = LoraRuntime.adapter_name(concept["concept_id"])
        self.cache.drop(lambda k: k.startswith(f"{concept['model_key']}@") or f"+{adapter}*" in k)
        self.loras.drop(adapter)
        self._concepts.pop(concept["concept_id"], None)

    # ------------------------------------------------------------------ what a job trains from
    def modules_at(self, key: str, version: int):
        if version == 0:
            return self.base_pipe.unet, self.base_pipe.text_encoder
        pipe = self.pipeline_for(key, version)
        return pipe.unet, pipe.text_encoder

    def training_modules(self, key: str, version: int, stored_dtype: torch.dtype | None):
        """What a job trains from, and whether that version has a text encoder of its own: the served modules, or
        with `stored_dtype` (a trunk rewritten and stored in a higher precision than it is served in) the stored
        weights in that dtype, loaded for the job alone, so that version after version of DreamBooth keeps every
        update (adapters and embeddings learn against the trunk as it is served)."""
        if stored_dtype is None:
            unet, text = self.modules_at(key, version)
            return unet, text, text is not self.base_pipe.text_encoder
        trunk = self.stack(key, version).trunk_version if version else 0
        base = self.config.base_model
        unet, text = (self.version(key, trunk).modules(self.base_pipe, stored_dtype) if trunk else
                      (pipelines.load_base_module(base, "unet", self.device, stored_dtype), None))
        own_text = text is not None
        if text is None:
            text = pipelines.load_base_module(base, "text_encoder", self.device, stored_dtype)
        return unet, text, own_text
