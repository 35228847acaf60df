"""LoRA adapters applied to the loaded base per request (the files are `storage.versions`' business).

`LoraRuntime` keeps one copy of the base UNet and text encoder into which every used LoRA concept is loaded
once as a named peft adapter; a request activates its adapters by name (`set_adapters`), so switching users
costs no reload of the base and no reload of an adapter already loaded. The served base modules themselves
never carry adapters: training copies them, and a copy must not inherit someone's LoRA.
"""
from __future__ import annotations

import collections
import copy
import os
import threading
import warnings

import torch

from big.errors import BadRequest
from big.weights import pipelines
from big.weights.text import is_xl

class LoraRuntime:
    """Named LoRA adapters on one shared copy of the base modules, activated per request."""

    def __init__(self, base_pipe, max_adapters: int = 32):
        self.base_pipe = base_pipe
        self.max_adapters = max_adapters
        self._pipe = None
        self._loaded: "collections.OrderedDict[str, str]" = collections.OrderedDict()  # adapter -> its file
        self._lock = threading.Lock()

    @property
    def pipe(self):
        """The shared copy of the base that carries the loaded adapters."""
        return self._ensure_pipe()

    def _ensure_pipe(self):
        if self._pipe is None:
            copies = {name: copy.deepcopy(getattr(self.base_pipe, name)) for name in text_encoder_names(self.base_pipe)}
            self._pipe = pipelines.compose(self.base_pipe, unet=copy.deepcopy(self.base_pipe.unet), **copies)
        return self._pipe

    @staticmethod
    def adapter_name(concept_id: str) -> str:
        return f"c{concept_id[:16]}"

    def load(self, name: str, lora_file: str) -> None:
        pipe = self._ensure_pipe()
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        load_lora(pipe, os.path.dirname(lora_file), name, weight_name=os.path.basename(lora_file))
        self._loaded[name] = lora_file
        while len(self._loaded) > self.max_adapters:
            old, _ = self._loaded.popitem(last=False)
            pipe.delete_adapters(old)

    def activate(self, adapters: list[tuple[str, str, float]]):
        """The shared LoRA pipeline with exactly these (name, file, weight) adapters on. Callers that
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
        (measured by `benchmarks.adapter_speed`, docs/benchmarks.md)."""
        from peft.tuners.lora import LoraLayer

        with self._lock:
            pipe = self.activate(adapters)
            names = {n for n, _, _ in adapters}
            if any(isinstance(m, LoraLayer) and names & set(m.lora_A)
                   for name in text_encoder_names(pipe) for m in getattr(pipe, name).modules()):
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
        pipe = self._ensure_pipe()
        scratch = f"check{name}"
        try:
            load_lora(pipe, dict(state), scratch)
        except Exception as e:  # noqa: BLE001 - a file that does not load is the caller's bad file
            raise BadRequest(f"this LoRA does not fit the model ({type(e).__name__}: {str(e)[:160]})") from None
        try:
            if not any(scratch in names for names in pipe.get_list_adapters().values()):
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
        return 0 if self._pipe is None else pipelines.module_bytes(
            self._pipe.unet, *(getattr(self._pipe, name) for name in text_encoder_names(self._pipe)))


def text_encoder_names(pipe) -> list[str]:
    """The pipeline's text encoders' attribute names (SDXL has two)."""
    return ["text_encoder"] + (["text_encoder_2"] if is_xl(pipe) else [])


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
                                                       return_lora_metadata=True, unet_config=pipe.unet.config,
                                                       **kwargs)
        # Any text encoder's keys (SDXL's `text_encoder_2.` too) need the pipeline's full loader.
        if any(k.startswith(f"{pipe.text_encoder_name}") for k in state):
            pipe.load_lora_weights(source, adapter_name=adapter_name, **kwargs)
            return
        if not all("lora" in k for k in state):  # load_lora_weights' own check, with its message
            raise ValueError("Invalid LoRA checkpoint. Make sure all LoRA param names contain `'lora'` substring.")
        pipe.load_lora_into_unet(state, network_alphas=alphas, unet=pipe.unet, adapter_name=adapter_name,
                                 metadata=metadata, _pipeline=pipe)
