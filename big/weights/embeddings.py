"""Textual-inversion embeddings: a concept as N vectors that stand in for one word of the prompt.

A concept's word (its identifier, or an existing word in `overwrite` mode) is written once in a prompt; the
prompt encoder expands it to N positions and puts the concept's vectors there in place of the token
embeddings, as AUTOMATIC1111 does. Nothing is added to the shared tokenizer or text encoder, so one loaded
base model serves every user's embeddings at once, and an embedding applies only to the requests that use it.

Files, as other tools read them:
- `learned_embeds.safetensors`: `{word: tensor[N, dim]}`, what diffusers' `load_textual_inversion` and
  AUTOMATIC1111 (a single-tensor safetensors file, named by its file name) load;
- `<word>.pt`: AUTOMATIC1111's classic embedding (`string_to_param["*"]`), also loadable by diffusers.
SDXL embeddings have vectors for each of its two text encoders:
- `learned_embeds.safetensors` and `learned_embeds_2.safetensors`, one `{word: tensor}` per encoder, as diffusers'
  SDXL textual-inversion script writes them (each loads with `load_textual_inversion(..., text_encoder=...)`);
- `<word>.safetensors`: `{"clip_l": [N, 768], "clip_g": [N, 1280]}`, AUTOMATIC1111's and kohya's SDXL embedding.
"""
from __future__ import annotations

import dataclasses
import io
import re
import threading

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from big.errors import BadRequest

DIFFUSERS_FILE = "learned_embeds.safetensors"
DIFFUSERS_FILE_2 = "learned_embeds_2.safetensors"
XL_KEYS = ("clip_l", "clip_g")  # the first and the second text encoder's vectors in an SDXL embedding file
MAX_VECTORS = 16


@dataclasses.dataclass
class ConceptEmbedding:
    """`vectors` [N, dim] replace the word `word` (token `token_id`) wherever a prompt uses it; on SDXL,
    `vectors_2` [N, dim_2] do the same in the second text encoder (as SDXL embeddings carry `clip_l` and
    `clip_g`)."""

    word: str
    token_id: int
    vectors: torch.Tensor
    vectors_2: torch.Tensor | None = None

    def for_encoder(self, index: int) -> torch.Tensor:
        if index == 1 and self.vectors_2 is None:
            raise ValueError(f"the embedding of {self.word!r} has no vectors for a second text encoder")
        return self.vectors if index == 0 else self.vectors_2


def word_token(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise BadRequest(f"{word!r} is {len(ids)} tokens for this model's tokenizer; an embedding's word must be one")
    return ids[0]


def word_token_everywhere(tokenizers, word: str) -> int:
    """The word's one token id in every tokenizer of the model (SDXL's two share a vocabulary)."""
    ids = {word_token(t, word) for t in tokenizers}
    if len(ids) != 1:
        raise BadRequest(f"{word!r} is a different token in each of this model's tokenizers")
    return ids.pop()


def init_vectors(text_encoder, tokenizer, init_text: str | None, n: int, fallback_word: str) -> torch.Tensor:
    """N starting vectors: the token embeddings of `init_text` (repeated or cut to N), else of the fallback."""
    table = text_encoder.get_input_embeddings().weight.detach()
    ids = tokenizer(init_text or fallback_word, add_special_tokens=False).input_ids or \
        tokenizer(fallback_word, add_special_tokens=False).input_ids
    return torch.stack([table[ids[i % len(ids)]] for i in range(n)]).float().clone()


def _run_index(hit: torch.Tensor, n: int) -> torch.Tensor:
    """For a mask [B, T] of a concept's token: each position's place in its run, mod N (its vector)."""
    index = torch.zeros(hit.shape, dtype=torch.long)
    for b, t in hit.nonzero().tolist():
        index[b, t] = (int(index[b, t - 1]) + 1) % n if t > 0 and bool(hit[b, t - 1]) else 0
    return index


def positions(ids: torch.Tensor, embeddings: dict[int, ConceptEmbedding]) -> tuple[torch.Tensor, torch.Tensor]:
    """For token ids [B, T]: (mask [B, T] of positions to replace, index [B, T] of the vector each gets).

    A run of a concept's token is its expanded word: its k-th position gets vector k mod N.
    """
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    index = torch.zeros(ids.shape, dtype=torch.long)
    cpu = ids.cpu()
    for token_id, emb in embeddings.items():
        hit = cpu == token_id
        if bool(hit.any()):
            index = torch.where(hit, _run_index(hit, emb.vectors.shape[0]), index)
            mask |= hit
    return mask, index


class EmbeddingOverride:
    """Puts concept vectors into a text encoder's token embeddings, for the calls made inside `active`.

    The forward hook is installed once per embedding module and does nothing unless the calling thread has
    an override active, so training threads (which deep-copy the module, hook included) and other requests
    are unaffected.
    """

    _local = threading.local()

    @classmethod
    def install(cls, text_encoder, index: int = 0) -> None:
        """Hook the token embeddings of text encoder `index` of the model (SDXL's second takes `vectors_2`)."""
        module = text_encoder.get_input_embeddings()
        if not getattr(module, "_big_override_hook", False):
            module.register_forward_hook(cls._hook)
            module._big_override_hook = True
        module._big_encoder_index = index

    @classmethod
    def _hook(cls, module, inputs, output):
        active = getattr(cls._local, "value", None)
        if active is None:
            return output
        ids = inputs[0]
        mask, values = active(ids, getattr(module, "_big_encoder_index", 0))
        if mask is None:
            return output
        return torch.where(mask.to(output.device).unsqueeze(-1), values.to(output.device, output.dtype), output)

    @classmethod
    def active(cls, embeddings: dict[int, ConceptEmbedding]):
        return _Active(cls, embeddings)


class _Active:
    def __init__(self, owner, embeddings: dict[int, ConceptEmbedding]):
        self.owner, self.embeddings = owner, embeddings

    def __call__(self, ids: torch.Tensor, encoder: int = 0):
        """(mask [B, T], vectors [B, T, dim]) of the positions whose token embedding a concept replaces, in text
        encoder `encoder`."""
        mask, index = positions(ids, self.embeddings)
        if not bool(mask.any()):
            return None, None
        first = next(iter(self.embeddings.values())).for_encoder(encoder)
        values = torch.zeros(*ids.shape, first.shape[-1], dtype=first.dtype, device=first.device)
        cpu = ids.cpu()
        for token_id, emb in self.embeddings.items():
            sel = cpu == token_id
            if bool(sel.any()):
                vectors = emb.for_encoder(encoder)
                values[sel.to(values.device)] = vectors[index[sel].to(vectors.device)]
        return mask, values

    def __enter__(self):
        self.previous = getattr(self.owner._local, "value", None)
        self.owner._local.value = self if self.embeddings else None
        return self

    def __exit__(self, *exc):
        self.owner._local.value = self.previous
        return False


def expand_word(tokens: list[int], token_id: int, n: int) -> list[int]:
    """Each occurrence of `token_id` repeated to N positions (one per vector)."""
    out: list[int] = []
    for t in tokens:
        out += [t] * n if t == token_id else [t]
    return out


# ---------------------------------------------------------------------------------------------- files
def to_diffusers_bytes(word: str, vectors: torch.Tensor) -> bytes:
    return save_safetensors_bytes({word: vectors.detach().float().cpu().contiguous()})


def to_a1111_bytes(word: str, vectors: torch.Tensor, token_id: int, steps: int, base: str) -> bytes:
    buf = io.BytesIO()
    torch.save({"string_to_token": {"*": token_id}, "string_to_param": {"*": vectors.detach().float().cpu()},
                "name": word, "step": steps, "sd_checkpoint": None, "sd_checkpoint_name": base}, buf)
    return buf.getvalue()


def to_a1111_xl_bytes(vectors: torch.Tensor, vectors_2: torch.Tensor) -> bytes:
    return save_safetensors_bytes({XL_KEYS[0]: vectors.detach().float().cpu().contiguous(),
                                   XL_KEYS[1]: vectors_2.detach().float().cpu().contiguous()})


def read_embedding_file(data: bytes, filename: str, dims: tuple[int, ...]) -> tuple[str | None, list[torch.Tensor]]:
    """(the word the file names, vectors [N, dim] per text encoder) from a diffusers or AUTOMATIC1111 embedding
    file; `dims`: the model's text encoders' widths (two on SDXL, whose files carry `clip_l` and `clip_g`).

    Pickled `.pt` files are read with `weights_only=True`, which refuses anything but tensors and plain data.
    """
    name = re.sub(r"\.(safetensors|pt|bin)$", "", filename.rsplit("/", 1)[-1]) or None
    state = _load_embedding_state(data, filename)
    if len(dims) == 2:
        if not (isinstance(state, dict) and set(XL_KEYS) <= set(state)):
            raise BadRequest("an SDXL embedding file holds `clip_l` and `clip_g` vectors (AUTOMATIC1111's format)")
        vectors = [_checked_vectors(state[k], dim) for k, dim in zip(XL_KEYS, dims)]
        if vectors[0].shape[0] != vectors[1].shape[0]:
            raise BadRequest(f"clip_l has {vectors[0].shape[0]} vectors and clip_g {vectors[1].shape[0]}")
        return name, vectors
    word, vec = _single_encoder_vectors(state, name)
    return word, [_checked_vectors(vec, dims[0])]


def _load_embedding_state(data: bytes, filename: str):
    try:
        if data[:1] == b"{" or filename.endswith(".safetensors") or data[8:9] == b"{":
            state = load_safetensors_bytes(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is the caller's bad file
        raise BadRequest(f"not an embedding file ({type(e).__name__}: {str(e)[:120]})") from None
    return state


def _single_encoder_vectors(state, name: str | None):
    """(word, vectors) of a one-encoder embedding file's contents."""
    word = None
    if isinstance(state, dict) and "string_to_param" in state:
        vec = state["string_to_param"].get("*") if isinstance(state["string_to_param"], dict) else None
        word = state.get("name") if isinstance(state.get("name"), str) else name
    elif isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), torch.Tensor):
        word, vec = next(iter(state.items()))
    elif isinstance(state, dict) and "emb_params" in state:
        vec, word = state["emb_params"], name
    else:
        raise BadRequest("an embedding file holds one tensor (diffusers) or string_to_param (AUTOMATIC1111)")
    return word, vec


def _checked_vectors(vec, dim: int) -> torch.Tensor:
    if not isinstance(vec, torch.Tensor):
        raise BadRequest("the embedding file's vectors are not a tensor")
    if vec.dim() == 1:
        vec = vec.unsqueeze(0)
    if vec.dim() != 2 or vec.shape[1] != dim:
        raise BadRequest(f"embedding vectors of shape {tuple(vec.shape)} do not fit this model (N x {dim})")
    if not 1 <= vec.shape[0] <= MAX_VECTORS:
        raise BadRequest(f"an embedding has 1 to {MAX_VECTORS} vectors (this one: {vec.shape[0]})")
    if not bool(torch.isfinite(vec).all()):
        raise BadRequest("the embedding has non-finite values")
    return vec.float()
