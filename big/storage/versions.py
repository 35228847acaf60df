"""THE version folder: what one committed model version holds on disk, written here and read here only.

A version folder holds only what its training changed; everything else is shared with the base model:
  big_version.json                    `VersionMeta` (the schema below, with its `format`)
  unet/, text_encoder/                DreamBooth: diffusers `save_pretrained` folders (safetensors)
  pytorch_lora_weights.safetensors    LoRA: diffusers' `save_lora_weights` format (peft key names), or an imported
                                      file as it came
  learned_embeds.safetensors          an embedding (textual inversion, pivotal LoRA): `{word: [N, dim]}`
  learned_embeds_2.safetensors        SDXL: the second text encoder's vectors, as diffusers' SDXL script writes
  <word>.pt                           textual inversion: AUTOMATIC1111's classic embedding
  <word>.safetensors                  SDXL textual inversion: AUTOMATIC1111's `{clip_l, clip_g}` embedding
`write_version` is the one writer and `Version` (from `read_version`) the one reader; other tools load the files
as they are (`concept_files`). Folders are staged and published atomically by `storage.workspace`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import uuid
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from big.errors import BadRequest
from big.storage.workspace import Workspace, atomic_write_bytes, atomic_write_json
from big.weights import embeddings

FORMAT_VERSION = 1  # bump with a reader for the older format beside the new one
META_FILE = "big_version.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDING_FILE = embeddings.DIFFUSERS_FILE
EMBEDDING_FILE_2 = embeddings.DIFFUSERS_FILE_2


@dataclasses.dataclass
class VersionMeta:
    """big_version.json. Written by every method; a field a method does not set is left out of the file."""

    model_key_kind: str  # "private", "private_meta" or "meta"
    base: str  # the base model's key (`weights.pipelines.base_key`)
    version: int
    identifier: str
    category: str
    method: str = "dreambooth"  # folders written before methods existed were DreamBooth
    # training record
    prior_plan: list | None = None
    n_training_images: int | None = None
    train_seconds: float | None = None
    final_loss: float | None = None
    optimizer: str | None = None  # how the job fitted the accelerator (`training.memory`)
    gradient_checkpointing: bool | None = None
    # a metamodel's stack (`weights.metamodel.Stack.to_meta`)
    trunk_version: int | None = None
    adapters: list | None = None
    metamodel_strategy: str | None = None
    # LoRA and embedding shapes
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: str | None = None
    num_vectors: int | None = None
    overwrite: bool | None = None
    imported: list | None = None  # /import: the file names it came from
    format: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "VersionMeta":
        known = {f.name for f in dataclasses.fields(cls)}
        # A folder written before the format was versioned has no `format`: it is format 1's content.
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclasses.dataclass
class LoraWeights:
    """A trained LoRA (peft state dicts and their configs), or an imported file's bytes kept as they came (its
    header may carry the adapter's alpha and rank)."""

    unet: dict | None = None
    text_encoder: dict | None = None
    metadata: dict | None = None
    file_bytes: bytes | None = None
    text_encoder_2: dict | None = None  # SDXL's second text encoder


@dataclasses.dataclass
class EmbeddingWeights:
    word: str
    vectors: torch.Tensor
    token_id: int
    steps: int
    a1111: bool  # also write AUTOMATIC1111's `<word>.pt` (SDXL: `<word>.safetensors`)
    vectors_2: torch.Tensor | None = None  # SDXL's second text encoder's


def write_version(folder: str, meta: VersionMeta, *, unet=None, text_encoder=None, lora: LoraWeights | None = None,
                  embedding: EmbeddingWeights | None = None) -> None:
    """Write a version's files into `folder` (a staging folder, published afterwards)."""
    if unet is not None:
        unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    if text_encoder is not None:
        text_encoder.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)
    if lora is not None and lora.file_bytes is not None:
        atomic_write_bytes(os.path.join(folder, LORA_FILE), lora.file_bytes)
    elif lora is not None:
        # SDXL's loader writes the same `unet.` / `text_encoder.` keys as SD's, and `text_encoder_2.` too.
        from diffusers import StableDiffusionXLPipeline

        metadata = lora.metadata or {}
        StableDiffusionXLPipeline.save_lora_weights(
            folder, unet_lora_layers=lora.unet, text_encoder_lora_layers=lora.text_encoder or None,
            text_encoder_2_lora_layers=lora.text_encoder_2 or None, weight_name=LORA_FILE, safe_serialization=True,
            unet_lora_adapter_metadata=metadata.get("unet"),
            text_encoder_lora_adapter_metadata=metadata.get("text_encoder"),
            text_encoder_2_lora_adapter_metadata=metadata.get("text_encoder_2"))
    if embedding is not None:
        atomic_write_bytes(os.path.join(folder, EMBEDDING_FILE),
                           embeddings.to_diffusers_bytes(embedding.word, embedding.vectors))
        if embedding.vectors_2 is not None:
            atomic_write_bytes(os.path.join(folder, EMBEDDING_FILE_2),
                               embeddings.to_diffusers_bytes(embedding.word, embedding.vectors_2))
        if embedding.a1111 and embedding.vectors_2 is not None:
            atomic_write_bytes(os.path.join(folder, f"{embedding.word}.safetensors"),
                               embeddings.to_a1111_xl_bytes(embedding.vectors, embedding.vectors_2))
        elif embedding.a1111:
            atomic_write_bytes(os.path.join(folder, f"{embedding.word}.pt"), embeddings.to_a1111_bytes(
                embedding.word, embedding.vectors, embedding.token_id, embedding.steps, meta.base))
    atomic_write_json(os.path.join(folder, META_FILE), meta.to_dict())


def publish(ws: Workspace, model_key: str, version: int, write: Callable[[str], None],
            commit: Callable[[str], None], *, tag: str | None = None) -> str:
    """A new version, all or nothing: `write(folder)` fills a staging folder (named by `tag`, a job id), which is
    moved to a version folder of its own, and `commit(path)` makes it current (one registry transaction). When any
    step fails, what this call put on disk is removed (never a folder another writer published) and the previous
    version keeps serving."""
    tag = tag or uuid.uuid4().hex
    with ws.staging(tag) as staging:
        write(staging)
        path = ws.publish_version(staging, model_key, version, tag)
    try:
        commit(path)
    except BaseException:
        ws.discard(path)
        raise
    return path


@dataclasses.dataclass(frozen=True)
class Version:
    """A committed version folder, read back: its meta and, on demand, its weights."""

    path: str
    meta: VersionMeta

    @property
    def lora_file(self) -> str:
        return os.path.join(self.path, LORA_FILE)

    def modules(self, like_pipe, dtype: torch.dtype | None = None):
        """(unet, text_encoder-or-None) of a DreamBooth version, on the base pipeline's device and (unless
        `dtype`) dtype, frozen."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        dtype, device = dtype or like_pipe.unet.dtype, like_pipe.device
        unet = UNet2DConditionModel.from_pretrained(os.path.join(self.path, "unet"), dtype=dtype).to(device)
        te_dir = os.path.join(self.path, "text_encoder")
        text = CLIPTextModel.from_pretrained(te_dir, dtype=dtype).to(device) if os.path.isdir(te_dir) else None
        for module in (unet, text):
            if module is not None:
                module.requires_grad_(False).eval()
        return unet, text

    def embedding(self, encoder: int = 0) -> torch.Tensor | None:
        """The learned vectors [N, dim] for text encoder `encoder` (1: SDXL's second) in float32, or None when the
        version has no embedding."""
        path = os.path.join(self.path, EMBEDDING_FILE if encoder == 0 else EMBEDDING_FILE_2)
        if not os.path.exists(path):
            return None
        return next(iter(load_file(path).values())).float()

    def a1111_files(self) -> list[str]:
        """AUTOMATIC1111's embedding file of the version (`<word>.pt`, SDXL's `<word>.safetensors`), if any."""
        return [f for f in self.files() if f in (f"{self.meta.identifier}.pt", f"{self.meta.identifier}.safetensors")]

    def files(self) -> list[str]:
        """The files a concept is made of, as other tools read them (no BIG bookkeeping)."""
        if self.meta.method == "dreambooth":
            return [os.path.join(sub, f) for sub in ("unet", "text_encoder")
                    if os.path.isdir(os.path.join(self.path, sub))
                    for f in sorted(os.listdir(os.path.join(self.path, sub)))]
        return sorted(f for f in os.listdir(self.path) if f != META_FILE)

    def bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.path, f)) for f in self.files())


def read_version(path: str) -> Version:
    with open(os.path.join(path, META_FILE)) as f:
        return Version(path, VersionMeta.from_dict(json.load(f)))


def read_lora_bytes(data: bytes, max_magnitude: float = float("inf")) -> dict[str, Any] | None:
    """A LoRA state dict from an uploaded file's bytes (every key names a LoRA weight), else None; safetensors
    only, so nothing in the file can run code. Weights beyond `max_magnitude` are refused as non-finite ones
    are: they overflow the products of any served dtype."""
    from safetensors.torch import load as load_bytes

    try:
        state = load_bytes(data)
    except Exception:  # noqa: BLE001 - not safetensors: maybe an embedding (.pt)
        return None
    if not state or not all("lora" in k for k in state):
        return None
    if not all(bool(torch.isfinite(v).all()) for v in state.values()):
        raise BadRequest("the LoRA has non-finite weights")
    check_magnitude(state.values(), max_magnitude, "the LoRA")
    return state


def check_magnitude(tensors, max_magnitude: float, what: str) -> None:
    largest = max((float(t.abs().max()) for t in tensors if t.numel()), default=0.0)
    if largest > max_magnitude:
        raise BadRequest(f"{what} has weights up to {largest:.3g}; at most {max_magnitude:g} (larger values "
                         "overflow the model's products and render blank images)")
