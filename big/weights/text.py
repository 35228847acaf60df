"""A pipeline's text side: SD 1.x/2.x's one tokenizer and text encoder, SDXL's two.

SDXL conditions its UNet on both encoders' penultimate hidden states, concatenated along the features, and on the
second encoder's pooled (projected) output together with the image's size and crop (`time_ids`), as diffusers'
`StableDiffusionXLPipeline.encode_prompt` and its SDXL training scripts do. This module is the one place that
knows it: generation (`generation.prompting`) and training (`training.loop`) ask it for states.
"""
from __future__ import annotations

import dataclasses

import torch


def is_xl(pipe) -> bool:
    """Whether a pipeline is SDXL's (two text encoders, pooled text embeddings and size conditioning)."""
    return getattr(pipe, "text_encoder_2", None) is not None


@dataclasses.dataclass(frozen=True)
class TextSide:
    tokenizers: tuple
    encoders: tuple
    zero_empty_negative: bool = False  # SDXL's `force_zeros_for_empty_prompt`

    @classmethod
    def of(cls, pipe) -> "TextSide":
        """The pipeline's tokenizers and text encoders."""
        if not is_xl(pipe):
            return cls((pipe.tokenizer,), (pipe.text_encoder,))
        return cls((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2),
                   bool(pipe.config.get("force_zeros_for_empty_prompt", True)))

    @property
    def xl(self) -> bool:
        return len(self.encoders) == 2

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.encoders[0].dtype

    def with_encoders(self, encoders) -> "TextSide":
        return dataclasses.replace(self, encoders=tuple(encoders))

    def hidden(self, index: int, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder `index`'s states the UNet reads for token ids [B, T]: the last hidden states on SD 1.x/2.x,
        the penultimate ones on SDXL."""
        return self.hidden_and_pooled(index, ids, attention_mask)[0]

    def hidden_and_pooled(self, index: int, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(`hidden`'s states, and from SDXL's second encoder its pooled embedding [B, dim], else None), one pass."""
        if not self.xl:
            return self.encoders[index](ids, attention_mask=attention_mask)[0], None
        out = self.encoders[index](ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[-2], out[0] if index == 1 else None

    def encode(self, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(states [B, T, dim], pooled [B, dim] or None) of token ids, one tensor of ids per tokenizer."""
        outs = [self.hidden_and_pooled(index, i) for index, i in enumerate(ids)]
        return torch.cat([states for states, _ in outs], dim=-1), outs[-1][1]

    def unet_kwargs(self, pooled: torch.Tensor | None, height: int, width: int) -> dict:
        """What the UNet takes besides the states: nothing on SD 1.x/2.x; SDXL's pooled embedding and time ids
        (original size = target size, no crop: what the pipeline passes by default, and how BIG's training
        images are prepared)."""
        if pooled is None:
            return {}
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids(len(pooled), height, width,
                                                                                  pooled.device, pooled.dtype)}}


def time_ids(batch: int, height: int, width: int, device, dtype) -> torch.Tensor:
    """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w) per image."""
    return torch.tensor([[height, width, 0, 0, height, width]] * batch, device=device, dtype=dtype)


def token_ids(tokenizer, prompts, device, expand: tuple[int, int] | None = None) -> torch.Tensor:
    """Padded window-sized token ids of each prompt (truncated, as the pipelines do); with `expand` = (token id,
    N), each occurrence of the token fills N positions (a textual-inversion word of N vectors)."""
    from big.weights.embeddings import expand_word

    if expand is None:
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)
    window = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for p in prompts:
        body = expand_word(tokenizer(p, add_special_tokens=False).input_ids, *expand)[: window - 2]
        row = [tokenizer.bos_token_id] + body + [tokenizer.eos_token_id]
        rows.append(row + [pad] * (window - len(row)))
    return torch.tensor(rows, device=device)
