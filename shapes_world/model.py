"""Configs (as data) and builders for the embedded shapes-world Stable Diffusion.

Every component is the stock Stable Diffusion class; only the sizes are small. The same pipeline
code therefore serves a real SD checkpoint on a GPU host and this model on a laptop CPU.
"""
from __future__ import annotations

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL_DIR = os.path.join(REPO_ROOT, "models", "shapes-sd")
DEFAULT_SCORER_DIR = os.path.join(REPO_ROOT, "models", "shapes-scorer")

TEXT_MAX_LENGTH = 24  # one token per word: the longest world caption is 13 tokens with BOS/EOS

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=32,
    mid_block_add_attention=False,  # 256-token attention at 16x16 would triple the VAE's cost
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    # Text conditions the 8x8 and 4x4 levels (and the mid block); the 16x16 level only draws.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    cross_attention_dim=128,
    attention_head_dim=4,
    norm_num_groups=16,
)


def text_config(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TEXT_MAX_LENGTH,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="quick_gelu",
        projection_dim=128,
    )


# SD's own noise schedule (scaled_linear) and leading spacing: a cosine schedule with linspace
# spacing starts sampling where the signal is ~1e-9 and yields chance output.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**text_config(vocab_size)))


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)
