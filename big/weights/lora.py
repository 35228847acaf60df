"""Private concepts stored as megabytes (LoRA adapters, embeddings) and applied to the loaded base per request.

A LoRA concept's version folder holds `pytorch_lora_weights.safetensors` (diffusers' format, what
`load_lora_weights` reads) and, when its identifier's embedding was tuned with it (pivotal tuning),
`learned_embeds.safetensors`; a textual-inversion concept holds `learned_embeds.safetensors` and the
AUTOMATIC1111 `.pt` file. `big_version.json` says which method made it.

`LoraRuntime` keeps one copy of the base UNet and text encoder into which every used LoRA concept is loaded
once as a named peft adapter; a request activates its adapters by name (`set_adapters`), so switching users
costs no reload of the base and no reload of an adapter already loaded. The served base modules themselves
never carry adapters: training copies them, and a copy must not inherit someone's LoRA.
"""
from __future__ import annotations

import collections
import copy
import json
import os
import threading
import warnings

import torch
from safetensors.torch import load_file

from big.weights import embeddings, pipelines
from big.weights.embeddings import ConceptEmbedding

LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDING_FILE = embeddings.DIFFUSERS_FILE


def read_meta(version_dir: str) -> dict:
    with open(os.path.join(version_dir, pipelines.VERSION_META)) as f:
        return json.load(f)


def method_of(version_dir: str) -> str:
    return read_meta(version_dir).get("method", "dreambooth")


def save_lora(staging: str, lora_unet: dict, lora_text_encoder: dict | None, metadata: dict | None) -> None:
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        staging, unet_lora_layers=lora_unet, text_encoder_lora_layers=lora_text_encoder or None,
        weight_name=LORA_FILE, safe_serialization=True,
        unet_lora_adapter_metadata=(metadata or {}).get("unet"),
        text_encoder_lora_adapter_metadata=(metadata or {}).get("text_encoder"))


def save_embedding(staging: str, word: str, vectors: torch.Tensor, *, token_id: int, steps: int, base: str,
                   a1111: bool = True) -> None:
    from big.storage.workspace import atomic_write_bytes

    atomic_write_bytes(os.path.join(staging, EMBEDDING_FILE), embeddings.to_diffusers_bytes(word, vectors))
    if a1111:
        atomic_write_bytes(os.path.join(staging, f"{word}.pt"),
                           embeddings.to_a1111_bytes(word, vectors, token_id, steps, base))


def read_lora_bytes(data: bytes) -> dict | None:
    """A LoRA state dict from safetensors bytes (every key names a LoRA weight), else None; safetensors only,
    so nothing in the file can run code."""
    from safetensors.torch import load as load_bytes

    from big.errors import BadRequest

    try:
        state = load_bytes(data)
    except Exception:  # noqa: BLE001 - not safetensors: maybe an embedding (.pt)
        return None
    if not state or not all("lora" in k for k in state):
        return None
    if not all(bool(torch.isfinite(v).all()) for v in state.values()):
        raise BadRequest("the LoRA has non-finite weights")
    return state


def write_lora_bytes(staging: str, data: bytes) -> None:
    """The file as it came (its header may carry the adapter's alpha and rank)."""
    from big.storage.workspace import atomic_write_bytes

    atomic_write_bytes(os.path.join(staging, LORA_FILE), data)


def load_embedding(version_dir: str) -> torch.Tensor | None:
    path = os.path.join(version_dir, EMBEDDING_FILE)
    if not os.path.exists(path):
        return None
    return next(iter(load_file(path).values())).float()


def concept_files(version_dir: str) -> list[str]:
    """The files a concept is made of, as other tools read them (no BIG bookkeeping)."""
    method = method_of(version_dir)
    if method == "dreambooth":
        return [os.path.join(sub, f) for sub in ("unet", "text_encoder")
                for f in sorted(os.listdir(os.path.join(version_dir, sub)))
                if os.path.isdir(os.path.join(version_dir, sub))]
    return sorted(f for f in os.listdir(version_dir) if f != pipelines.VERSION_META)


def version_bytes(version_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(version_dir, f)) for f in concept_files(version_dir))


class LoraRuntime:
    """Named LoRA adapters on one shared copy of the base modules, activated per request."""

    def __init__(self, base_pipe, max_adapters: int = 32):
        self.base_pipe = base_pipe
        self.max_adapters = max_adapters
        self._pipe = None
        self._loaded: "collections.OrderedDict[str, str]" = collections.OrderedDict()  # adapter -> folder
        self._lock = threading.Lock()

    def _ensure_pipe(self):
        if self._pipe is None:
            unet = copy.deepcopy(self.base_pipe.unet)
            text = copy.deepcopy(self.base_pipe.text_encoder)
            self._pipe = pipelines.compose(self.base_pipe, unet=unet, text_encoder=text)
        return self._pipe

    @staticmethod
    def adapter_name(concept_id: str) -> str:
        return f"c{concept_id[:16]}"

    def load(self, name: str, version_dir: str) -> None:
        pipe = self._ensure_pipe()
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        load_lora(pipe, version_dir, name, weight_name=LORA_FILE)
        self._loaded[name] = version_dir
        while len(self._loaded) > self.max_adapters:
            old, _ = self._loaded.popitem(last=False)
            pipe.delete_adapters(old)

    def activate(self, adapters: list[tuple[str, str, float]]):
        """The shared LoRA pipeline with exactly these (name, folder, weight) adapters on. Callers that
        render with it must hold `lock` until they are done, as another request would switch the set."""
        pipe = self._ensure_pipe()
        for name, folder, _ in adapters:
            self.load(name, folder)
        pipe.set_adapters([n for n, _, _ in adapters], adapter_weights=[w for _, _, w in adapters])
        return pipe

    def fused_unet(self, adapters: list[tuple[str, str, float]]):
        """A copy of the base UNet with exactly these adapters merged into its weights, or None when they
        cannot be merged exactly (a text-encoder LoRA, DoRA, an adapted embedding). Merged, a route's images
        cost no more than the base's: peft's unmerged layers add two small matmuls per adapted module
        (1.49x the base's time on the embedded model, 1.00x merged; `benchmarks/adapter_speed.py`)."""
        from peft.tuners.lora import LoraLayer

        with self._lock:
            pipe = self.activate(adapters)
            names = {n for n, _, _ in adapters}
            if any(isinstance(m, LoraLayer) and names & set(m.lora_A) for m in pipe.text_encoder.modules()):
                return None
            fused = copy.deepcopy(self.base_pipe.unet)
            with torch.no_grad():
                for path, module in pipe.unet.named_modules():
                    if not isinstance(module, LoraLayer):
                        continue
                    # Adapters trained with other `lora_targets` may not adapt this module at all.
                    used = [n for n in module.active_adapters if n in names and n in module.lora_A]
                    if any(module.use_dora.get(n) or n in module.lora_embedding_A for n in used):
                        return None
                    target = fused.get_submodule(path).weight
                    for name in used:
                        # get_delta_weight includes the adapter's scale, i.e. its weight from set_adapters.
                        target += module.get_delta_weight(name).to(target.dtype)
            return fused

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    def check(self, name: str, state: dict) -> None:
        """Load a LoRA state dict under a scratch name and remove it again: BadRequest unless it loads and
        adapts at least one module of this model (diffusers skips keys that match nothing)."""
        from big.errors import BadRequest

        pipe = self._ensure_pipe()
        scratch = f"check{name}"
        try:
            load_lora(pipe, dict(state), scratch)
        except Exception as e:  # noqa: BLE001 - a file that does not load is the caller's bad file
            raise BadRequest(f"this LoRA does not fit the model ({type(e).__name__}: {str(e)[:160]})") from None
        try:
            if scratch not in pipe.get_list_adapters().get("unet", []) + pipe.get_list_adapters().get("text_encoder", []):
                raise BadRequest("no key of this LoRA matches a module of this model")
        finally:
            try:
                pipe.delete_adapters(scratch)
            except Exception:  # noqa: BLE001 - nothing was loaded
                pass

    def drop(self, name: str) -> None:
        with self._lock:
            if name in self._loaded and self._pipe is not None:
                self._pipe.delete_adapters(name)
                del self._loaded[name]

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def extra_bytes(self) -> int:
        return 0 if self._pipe is None else pipelines.module_bytes(self._pipe.unet, self._pipe.text_encoder)


def load_lora(pipe, source, adapter_name: str, **kwargs) -> None:
    """diffusers' `load_lora_weights`, without two warnings about what the service does on purpose: its
    text-encoder half, when the LoRA adapts no text-encoder module, would only log "No LoRA keys associated to
    CLIPTextModel ... safe to ignore" (nearly every concept a server loads: metamodel adapters and UNet-only
    private LoRAs), and peft warns "Already found a `peft_config` attribute in the model ... multiple
    adapters" when a second adapter joins the shared copy, which is what `LoraRuntime` is for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        # lora_state_dict may convert a dict in place; load_lora_weights, too, reads a copy.
        state, alphas, metadata = pipe.lora_state_dict(dict(source) if isinstance(source, dict) else source,
                                                       return_lora_metadata=True, **kwargs)
        if any(k.startswith(f"{pipe.text_encoder_name}.") for k in state):
            pipe.load_lora_weights(source, adapter_name=adapter_name, **kwargs)
            return
        if not all("lora" in k for k in state):  # load_lora_weights' own check, with its message
            raise ValueError("Invalid LoRA checkpoint. Make sure all LoRA param names contain `'lora'` substring.")
        pipe.load_lora_into_unet(state, network_alphas=alphas, unet=pipe.unet, adapter_name=adapter_name,
                                 metadata=metadata, _pipeline=pipe)


def embedding_for(tokenizer, word: str, vectors: torch.Tensor, device, dtype) -> tuple[int, ConceptEmbedding]:
    token_id = embeddings.word_token(tokenizer, word)
    return token_id, ConceptEmbedding(word, token_id, vectors.to(device, dtype))
