"""Prompt emphasis as AUTOMATIC1111 users write it, and prompts longer than the text encoder's window.

Syntax: `(word)` multiplies the attention to `word` by 1.1, `((word))` by 1.21, `[word]` divides it by 1.1,
`(word:1.5)` sets it to 1.5 times the surrounding weight; groups nest; `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are
literal characters; an unclosed group runs to the end of the prompt. The weights scale the text encoder's
output states token by token, and the result is rescaled so that its mean is what it was unweighted (the usual
rescale, which keeps the overall magnitude the UNet was trained on; see `apply_weights` for when the mean
magnitude is kept instead). A prompt longer than the encoder window is
encoded in window-sized chunks that are concatenated along the sequence axis (cross-attention accepts any
length), never truncated; prompt and negative prompt are padded with empty chunks to the same length.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

EMPHASIS = 1.1

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


def weighted_tokens(tokenizer, prompt: str) -> tuple[list[int], list[float]]:
    """Token ids of the prompt without BOS/EOS, and each token's weight."""
    ids: list[int] = []
    weights: list[float] = []
    for text, w in parse_emphasis(prompt):
        t = tokenizer(text, add_special_tokens=False).input_ids
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
    """Scale each token's states [batch, tokens, dim] by its weight [batch, tokens], then restore the scale.

    The usual rescale restores each sequence's mean. That is only meaningful when the mean is not ~0: a text
    encoder ending in a LayerNorm (the embedded model's; SD's CLIP is saved by a few large outlier features)
    can have a mean of 1e-4 against values of 0.5, and dividing by the weighted mean would then multiply the
    states by an arbitrary large factor. There the mean magnitude is restored instead.
    """
    if bool(torch.all(weights == 1)):
        return states
    w = weights.to(states.dtype).unsqueeze(-1)
    scaled = states * w
    mean, new_mean = states.mean(dim=(1, 2), keepdim=True), scaled.mean(dim=(1, 2), keepdim=True)
    magnitude, new_magnitude = states.abs().mean(dim=(1, 2), keepdim=True), scaled.abs().mean(dim=(1, 2), keepdim=True)
    stable = mean.abs() >= 0.05 * magnitude
    factor = torch.where(stable, mean / torch.where(stable, new_mean, torch.ones_like(new_mean)),
                         magnitude / new_magnitude)
    return scaled * factor


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], negative_prompts: Sequence[str],
                   device, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, negative_prompt_embeds) for a diffusers Stable Diffusion pipeline call.

    For a prompt without emphasis that fits the window this is exactly what the pipeline computes itself.
    """
    all_chunks = [_chunks(tokenizer, *weighted_tokens(tokenizer, p)) for p in list(prompts) + list(negative_prompts)]
    n_chunks = max(len(c) for c in all_chunks)
    empty = _empty_chunk(tokenizer)
    all_chunks = [c + [empty] * (n_chunks - len(c)) for c in all_chunks]
    ids = torch.tensor([[chunk_ids for chunk_ids, _ in c] for c in all_chunks], device=device)
    weights = torch.tensor([[chunk_w for _, chunk_w in c] for c in all_chunks], device=device)
    # ids, weights: [prompts, chunks, window]; encode every chunk of every prompt in one batch.
    n, k, window = ids.shape
    states = text_encoder(ids.reshape(n * k, window))[0]
    states = apply_weights(states, weights.reshape(n * k, window))
    states = states.reshape(n, k * window, -1)
    if dtype is not None:
        states = states.to(dtype)
    return states[: len(prompts)], states[len(prompts):]
