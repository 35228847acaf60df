"""Prompt emphasis as AUTOMATIC1111 users write it, and prompts longer than the text encoder's window.

Syntax: `(word)` multiplies the attention to `word` by 1.1, `((word))` by 1.21, `[word]` divides it by 1.1,
`(word:1.5)` sets it to 1.5 times the surrounding weight; groups nest; `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are
literal characters; an unclosed group runs to the end of the prompt.

How a weight acts on the text encoder's states (`EMPHASIS_MODES`, per request):
- `original`: AUTOMATIC1111's: each token's own output states are multiplied by its weight, then the sequence
  is rescaled to its unweighted mean (`apply_weights`).
- `context` (default): the same on the token's own states, and also on what the word contributed to every
  other token. A causal text encoder copies a word into every later state (the end-of-text and padding states
  above all), and a UNet may read the word from there: the embedded model does, so `original` emphasis moves
  nothing on it ("a (red:0) star" stays red). For each weighted fragment the prompt is encoded once more with
  the fragment hidden from the encoder's attention, and the other states are moved by (weight - 1) times the
  difference; weight 0 is then the prompt without the word, 2 doubles its effect.
- `none`: the brackets are parsed and dropped; every weight is 1.

A prompt longer than the encoder window is
encoded in window-sized chunks that are concatenated along the sequence axis (cross-attention accepts any
length), never truncated; prompt and negative prompt are padded with empty chunks to the same length.

Composable prompts (AUTOMATIC1111's `AND`, after Liu et al. 2022, "Compositional Visual Generation with
Composable Diffusion Models"): `a qzq painting of a sks dog AND a sks dog :2` is two parts, each denoised on
its own and guided with its weight times the guidance scale (`composable_parts`; generation.render_composed).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

import torch

from big.weights.embeddings import ConceptEmbedding, EmbeddingOverride, expand_word
from big.weights.text import TextSide

EMPHASIS = 1.1
EMPHASIS_MODES = ("context", "original", "none")
DEFAULT_EMPHASIS = "context"

_PIECE = re.compile(r"""
    \\[()\[\]\\]              # an escaped bracket or backslash
  | \\                        # a lone backslash
  | \(                        # open an emphasis group
  | \[                        # open a de-emphasis group
  | :\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)   # ':1.5)' closes a group with an explicit weight
  | \)
  | \]
  | [^\\()\[\]:]+             # plain text
  | :                         # a colon that is not a weight
""", re.X)


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) fragments; adjacent fragments of equal weight are merged."""
    frags: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for f in frags[start:]:
            f[1] *= factor

    for m in _PIECE.finditer(prompt):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            frags.append([piece[1:] or "\\", 1.0])
        elif piece == "(":
            round_open.append(len(frags))
        elif piece == "[":
            square_open.append(len(frags))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            scale(round_open.pop(), EMPHASIS)
        elif piece == "]" and square_open:
            scale(square_open.pop(), 1 / EMPHASIS)
        else:
            frags.append([piece, 1.0])
    for start in round_open:
        scale(start, EMPHASIS)
    for start in square_open:
        scale(start, 1 / EMPHASIS)

    merged: list[list] = []
    for text, w in frags:
        if merged and abs(merged[-1][1] - w) < 1e-12:
            merged[-1][0] += text
        else:
            merged.append([text, w])
    return [(t, w) for t, w in merged if t] or [("", 1.0)]


_LORA_TAG = re.compile(r"<lora:([A-Za-z0-9_\-]{1,64})(?::\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)))?\s*>")


_AND = re.compile(r"\bAND\b")  # upper case only: "and" and "sandbox" are ordinary words
_PART_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)))?\s*$", re.DOTALL)


def composable_parts(prompt: str) -> list[tuple[str, float]]:
    """The (text, weight) parts of an `AND` prompt, each part's weight from a trailing `:number` (default 1);
    a prompt without `AND` is one part of weight 1 with its text unchanged. An emphasis group's `(word:1.5)`
    ends with a bracket and is never read as a part weight."""
    pieces = _AND.split(prompt)
    if len(pieces) == 1:
        return [(prompt, 1.0)]
    parts = []
    for piece in pieces:
        text, weight = _PART_WEIGHT.match(piece).groups()
        parts.append((text.strip(), float(weight) if weight is not None else 1.0))
    return parts


def lora_tags(prompt: str) -> tuple[str, dict[str, float]]:
    """AUTOMATIC1111's `<lora:name:weight>` tags: the prompt without them, and each name's weight (default 1).

    A tag picks a LoRA concept and its strength; it is not text for the encoder.
    """
    tags = {m.group(1): float(m.group(2)) if m.group(2) else 1.0 for m in _LORA_TAG.finditer(prompt)}
    return " ".join(_LORA_TAG.sub(" ", prompt).split()), tags


_WORD = re.compile(r"[A-Za-z0-9_\-]+")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt's syntax, read once: its `AND` parts with their weights, its `<lora:>` tags, and its words (as
    written; emphasis brackets and weights are not words), which pick the concepts a prompt names."""

    text: str
    parts: tuple[tuple[str, float], ...]
    lora: tuple[tuple[str, float], ...]
    words: frozenset[str]

    @property
    def composed(self) -> bool:
        return len(self.parts) > 1

    @property
    def lora_weights(self) -> dict[str, float]:
        return dict(self.lora)


@functools.lru_cache(maxsize=4096)
def parse_prompt(text: str) -> Prompt:
    """The one reading of a prompt's syntax; request parsing reads each prompt first, and every later use of
    the same text gets that reading back."""
    return Prompt(text, tuple(composable_parts(text)), tuple(lora_tags(text)[1].items()),
                  frozenset(_WORD.findall(text)))


def weighted_tokens(tokenizer, prompt: str, expand: dict[int, int] | None = None) -> tuple[list[int], list[float]]:
    """Token ids of the prompt without BOS/EOS, and each token's weight; a token in `expand` (an embedding's
    word: token id -> its number of vectors) fills that many positions."""
    ids: list[int] = []
    weights: list[float] = []
    for text, w in parse_emphasis(lora_tags(prompt)[0]):
        t = tokenizer(text, add_special_tokens=False).input_ids
        for token_id, n in (expand or {}).items():
            t = expand_word(t, token_id, n)
        ids += t
        weights += [w] * len(t)
    return ids, weights


def _chunks(tokenizer, ids: list[int], weights: list[float]) -> list[tuple[list[int], list[float]]]:
    """Window-sized chunks, each BOS + up to (window - 2) tokens + EOS + padding."""
    window = tokenizer.model_max_length
    body = window - 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in range(0, max(len(ids), 1), body):
        cid, cw = ids[start : start + body], weights[start : start + body]
        cid = [tokenizer.bos_token_id] + cid + [tokenizer.eos_token_id]
        cw = [1.0] + cw + [1.0]
        out.append((cid + [pad] * (window - len(cid)), cw + [1.0] * (window - len(cw))))
    return out


def _empty_chunk(tokenizer) -> tuple[list[int], list[float]]:
    return _chunks(tokenizer, [], [])[0]


def apply_weights(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's states [batch, tokens, dim] by its weight [batch, tokens], then restore the scale."""
    if bool(torch.all(weights == 1)):
        return states
    return restore_scale(states * weights.to(states.dtype).unsqueeze(-1), states)


def restore_scale(weighted: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`weighted` rescaled so each sequence has `reference`'s mean: the usual rescale, which keeps the overall
    magnitude the UNet was trained on.

    That is only meaningful when the mean is not ~0: a text encoder ending in a LayerNorm (the embedded
    model's; SD's CLIP is saved by a few large outlier features) can have a mean of 1e-4 against values of 0.5,
    and dividing by the weighted mean would then multiply the states by an arbitrary large factor. There the
    mean magnitude is restored instead.
    """
    dims = tuple(range(1, weighted.dim()))
    mean, new_mean = reference.mean(dim=dims, keepdim=True), weighted.mean(dim=dims, keepdim=True)
    magnitude, new_magnitude = reference.abs().mean(dim=dims, keepdim=True), weighted.abs().mean(dim=dims, keepdim=True)
    stable = mean.abs() >= 0.05 * magnitude
    factor = torch.where(stable, mean / torch.where(stable, new_mean, torch.ones_like(new_mean)),
                         magnitude / new_magnitude)
    return weighted * factor


def fragments_of(weights: list[float]) -> list[tuple[int, int, float]]:
    """(start, end, weight) of each run of equal weight other than 1."""
    out: list[tuple[int, int, float]] = []
    for i, w in enumerate(weights):
        if w == 1.0:
            continue
        if out and out[-1][1] == i and out[-1][2] == w:
            out[-1] = (out[-1][0], i + 1, w)
        else:
            out.append((i, i + 1, w))
    return out


def apply_weights_in_context(encode, ids: torch.Tensor, states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`context` emphasis of sequences `ids` [batch, tokens] whose unweighted states are `states`; `encode(ids,
    attention_mask)` gives the states of ids (one text encoder's, as the UNet reads them).

    One extra encoder pass per weighted fragment, all in one batch: the fragment's tokens are masked out of the
    attention, so every other state is computed as if the word were not there.
    """
    jobs = [(row, start, end, w) for row in range(ids.shape[0])
            for start, end, w in fragments_of(weights[row].tolist())]
    if not jobs:
        return states
    masks = torch.ones(len(jobs), ids.shape[1], dtype=torch.long, device=ids.device)
    for j, (_, start, end, _) in enumerate(jobs):
        masks[j, start:end] = 0
    rows = torch.tensor([row for row, *_ in jobs], device=ids.device)
    without = encode(ids[rows], masks)
    out = states.clone()
    for j, (row, start, end, w) in enumerate(jobs):
        moved = (w - 1) * (states[row] - without[j])
        moved[start:end] = 0  # the fragment's own states are scaled below, as in `original`
        out[row] += moved
    out = out * weights.to(states.dtype).unsqueeze(-1)
    return torch.cat([restore_scale(out[r : r + 1], states[r : r + 1]) if bool(torch.any(weights[r] != 1))
                      else states[r : r + 1] for r in range(ids.shape[0])])


@dataclasses.dataclass
class Conditioning:
    """What a pipeline call takes for its prompts and negative prompts: the text states, and on SDXL the pooled
    text embeddings."""

    states: torch.Tensor
    negative_states: torch.Tensor
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    def pipeline_kwargs(self) -> dict:
        kw = dict(prompt_embeds=self.states, negative_prompt_embeds=self.negative_states)
        if self.pooled is not None:
            kw.update(pooled_prompt_embeds=self.pooled, negative_pooled_prompt_embeds=self.negative_pooled)
        return kw


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], negative_prompts: Sequence[str],
                   device, dtype=None, emphasis: str = DEFAULT_EMPHASIS,
                   embeddings: dict[int, ConceptEmbedding] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, negative_prompt_embeds) of a one-encoder model (SD 1.x/2.x): `encode` on its text side."""
    c = encode(TextSide((tokenizer,), (text_encoder,)), prompts, negative_prompts, device, dtype, emphasis,
               embeddings)
    return c.states, c.negative_states


@torch.no_grad()
def encode(text: TextSide, prompts: Sequence[str], negative_prompts: Sequence[str], device, dtype=None,
           emphasis: str = DEFAULT_EMPHASIS, embeddings: dict[int, ConceptEmbedding] | None = None) -> Conditioning:
    """The conditioning of a pipeline call for these prompts and negative prompts.

    For a prompt without emphasis that fits the window this is exactly what the pipeline computes itself.
    `embeddings` (token id -> concept vectors) put textual-inversion concepts in place of their words. On SDXL
    each encoder's states are weighted alike and concatenated; the pooled embedding is the unweighted first
    window's (the prompt's start), and an empty negative prompt is zeros where the model says so, as the
    pipeline does.
    """
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis must be one of {EMPHASIS_MODES}, not {emphasis!r}")
    embeddings = embeddings or {}
    if not embeddings:
        return _encode(text, prompts, negative_prompts, device, dtype, emphasis, None)
    for index, encoder in enumerate(text.encoders):
        EmbeddingOverride.install(encoder, index)
    with EmbeddingOverride.active(embeddings):
        return _encode(text, prompts, negative_prompts, device, dtype, emphasis,
                       {t: e.vectors.shape[0] for t, e in embeddings.items()})


def _encode(text: TextSide, prompts, negative_prompts, device, dtype, emphasis, expand) -> Conditioning:
    texts = list(prompts) + list(negative_prompts)
    per_encoder, pooled = [], None
    for index, tokenizer in enumerate(text.tokenizers):
        ids, weights = _window_ids(tokenizer, texts, device, expand)
        n, k, window = ids.shape
        ids, weights = ids.reshape(n * k, window), weights.reshape(n * k, window)
        states, pooled_here = text.hidden_and_pooled(index, ids)
        if pooled_here is not None:  # SDXL's, of each prompt's first window, unweighted
            pooled = pooled_here.reshape(n, k, -1)[:, 0]
        if emphasis == "original":
            states = apply_weights(states, weights)
        elif emphasis == "context":
            states = apply_weights_in_context(lambda i, m, index=index: text.hidden(index, i, m), ids, states,
                                              weights)
        per_encoder.append(states.reshape(n, k * window, -1))
    states = torch.cat(per_encoder, dim=-1)
    if dtype is not None:
        states = states.to(dtype)
        pooled = None if pooled is None else pooled.to(dtype)
    c = Conditioning(states[: len(prompts)], states[len(prompts):],
                     None if pooled is None else pooled[: len(prompts)],
                     None if pooled is None else pooled[len(prompts):])
    if text.zero_empty_negative:
        for row, negative in enumerate(negative_prompts):
            if not negative:
                c.negative_states[row] = 0
                c.negative_pooled[row] = 0
    return c


def _window_ids(tokenizer, texts, device, expand) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and weights [texts, chunks, window] of every text, all padded to the same number of chunks."""
    all_chunks = [_chunks(tokenizer, *weighted_tokens(tokenizer, p, expand)) for p in texts]
    n_chunks = max(len(c) for c in all_chunks)
    empty = _empty_chunk(tokenizer)
    all_chunks = [c + [empty] * (n_chunks - len(c)) for c in all_chunks]
    ids = torch.tensor([[chunk_ids for chunk_ids, _ in c] for c in all_chunks], device=device)
    weights = torch.tensor([[chunk_w for _, chunk_w in c] for c in all_chunks], device=device)
    return ids, weights
