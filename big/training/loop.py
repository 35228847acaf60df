"""DreamBooth fine-tuning, as diffusers' train_dreambooth.py does it, with the frozen work done once.

Per job, the VAE posteriors of every instance and prior image and (when the text encoder is
frozen) the text states of every prompt are computed once, before the first step; each step then
only samples a latent from its cached posterior, adds noise and trains the UNet. The loss is the
instance MSE plus `prior_loss_weight` times the prior MSE, as in the DreamBooth paper.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from big.weights.embeddings import ConceptEmbedding, EmbeddingOverride
from big.weights.text import TextSide, token_ids
from big.errors import JobCancelled
from big.training import memory


@dataclasses.dataclass
class TrainExample:
    image: Image.Image
    prompt: str


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# Which UNet modules get adapters. `attention` is the classic DreamBooth-LoRA set; `all` adds the transformer
# blocks' projections and feed-forward and the resnets' convolutions and time embeddings (LoCon-style), which
# the embedded model needs to learn small details at rank 1 (benchmarks/personal_bench.py).
LORA_TARGETS = {
    "attention": ATTENTION,
    "attention_ff": ATTENTION + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    "all": ATTENTION + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "time_emb_proj"),
}


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters (peft) on the UNet (`targets`, a key of LORA_TARGETS), optionally the text encoder."""

    rank: int = 4
    alpha: float = 4.0
    text_encoder: bool = False
    targets: str = "attention"

    TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

    @property
    def unet_targets(self) -> tuple[str, ...]:
        return LORA_TARGETS[self.targets]

    def config(self, targets):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, init_lora_weights="gaussian",
                          target_modules=list(targets))


@dataclasses.dataclass
class TrainResult:
    unet: torch.nn.Module | None  # None when the UNet was not trained (textual inversion)
    text_encoder: torch.nn.Module | None
    steps: int
    final_loss: float
    seconds: float
    losses: list[float]
    lora_unet: dict | None = None  # LoRA state dicts (method lora), peft key names
    lora_text_encoder: dict | None = None
    lora_text_encoder_2: dict | None = None  # SDXL's second text encoder
    lora_metadata: dict | None = None
    embedding: torch.Tensor | None = None  # learned vectors [N, dim] (textual inversion, pivotal LoRA)
    embedding_2: torch.Tensor | None = None  # SDXL: the second text encoder's


def preprocess(img: Image.Image, size: int) -> torch.Tensor:
    """Centre crop to a square and resize to the model's resolution; [-1, 1] CHW float."""
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((size, size), Image.Resampling.BICUBIC if s > size else Image.Resampling.NEAREST)
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def draw_priors(g: torch.Generator, n: int, n_priors: int, group_members: list[list[int]] | None) -> torch.Tensor:
    """Indices of `n` prior examples: uniform over all of them, or (with groups) a uniform group each, then
    a uniform member of it."""
    if group_members is None:
        return torch.randint(0, n_priors, (n,), generator=g)
    picked = torch.randint(0, len(group_members), (n,), generator=g).tolist()
    within = torch.rand(n, generator=g).tolist()
    return torch.tensor([group_members[k][int(u * len(group_members[k]))] for k, u in zip(picked, within)])


def min_snr_weights(noise_scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-example Min-SNR loss weights for timesteps `t`."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, t)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


@contextlib.contextmanager
def _seeded_init(seed: int, device: torch.device):
    """Seeds torch's global generators for the code inside, then puts them back. peft draws a new adapter's
    starting A matrices from them: seeded, one request trains the same adapter every time (unseeded, two runs
    of the same request differed from their second step on), and the rest of the process draws as before."""
    gpus = list(range(torch.cuda.device_count())) if device.type == "cuda" else []  # manual_seed seeds them all
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        yield


def _fused_adamw_ok(device: torch.device) -> bool:
    return torch.device(device).type in ("cuda", "cpu", "xpu", "mps")


@torch.no_grad()
def _encode_posteriors(vae, images: Sequence[Image.Image], size: int, device, dtype, batch: int = 32):
    means, stds = [], []
    for i in range(0, len(images), batch):
        x = torch.stack([preprocess(im, size) for im in images[i : i + batch]]).to(device, dtype=vae.dtype)
        post = vae.encode(x).latent_dist
        means.append(post.mean.to(dtype))
        stds.append(post.std.to(dtype))
    return torch.cat(means), torch.cat(stds)


def mixed_precision_for(served: torch.dtype, device) -> str:
    """accelerate's mixed precision for a service serving in `served`: on a GPU bfloat16's autocast when served
    so, else float16's; on a CPU none: there the fp32 copies train faster than under bfloat16 autocast
    (docs/research/unet_speed_options.json)."""
    if torch.device(device).type != "cuda":
        return "no"
    return "bf16" if served == torch.bfloat16 else "fp16"


def _text_states(text: TextSide, all_ids, frozen, live, live_index, pidx, override=None):
    """Per-example (text states, pooled or None): cached rows, with the live prompts encoded once each this
    step."""
    with EmbeddingOverride.active(override or {}):
        if frozen is None:  # the whole text encoder trains: encode every row
            return text.encode([ids[pidx] for ids in all_ids])
        states, pooled = frozen
        if not bool(live.any()):
            return states[pidx], None if pooled is None else pooled[pidx]
        live_states, live_pooled = text.encode([ids[live_index] for ids in all_ids])
        table = states.clone()
        table[live_index] = live_states.to(table.dtype)
        if pooled is None:
            return table[pidx], None
        pooled_table = pooled.clone()
        pooled_table[live_index] = live_pooled.to(pooled_table.dtype)
        return table[pidx], pooled_table[pidx]


def dreambooth(
    *,
    vae,
    text_encoder,
    tokenizer,
    unet,
    noise_scheduler,
    instances: Sequence[TrainExample],
    priors: Sequence[TrainExample],
    learning_rate: float,
    max_train_steps: int,
    train_batch_size: int = 4,
    prior_batch_size: int | None = None,
    prior_loss_weight: float = 1.0,
    train_text_encoder: bool = False,
    seed: int = 0,
    size: int,
    progress: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    mixed_precision: str | None = None,
    gradient_checkpointing: bool | None = None,
    anchor_weight: float = 0.0,
    train_token_ids: Sequence[int] = (),
    embedding_learning_rate: float = 1e-3,
    lora: LoraSettings | None = None,
    embedding: ConceptEmbedding | None = None,
    train_unet: bool = True,
    prior_groups: Sequence[int] | None = None,
    lr_scheduler: str = "constant",
    lr_warmup_steps: int = 0,
    snr_gamma: float | None = None,
    modules_are_copies: bool = False,
    text_encoder_2=None,
    tokenizer_2=None,
    eight_bit_adam: bool = False,
) -> TrainResult:
    """Train copies of `unet` (and `text_encoder` if asked); the given modules are left untouched (unless
    `modules_are_copies`).

    `train_token_ids` (pivotal tuning): also learn the input embeddings of these tokens (the new
    identifier) and nothing else of the text encoder, so every prompt without them is encoded
    exactly as before and the base vocabulary cannot drift through the text side.
    Each step draws `train_batch_size` instance and `prior_batch_size` (default: the same) prior examples;
    `anchor_weight` adds an L2 pull of every trained weight towards where it started (L2-SP).

    `lora`: train low-rank adapters instead of the weights (the result carries their diffusers-format state
    dicts). `embedding`: learn these vectors for the concept's word (textual inversion; with `lora`, pivotal
    tuning), put in place of its token embeddings by `EmbeddingOverride`; the text encoder itself stays
    frozen. `train_unet=False` with an embedding is plain textual inversion. `prior_groups` (a group id per
    prior example): each prior draw picks a group uniformly, then an example of it, instead of drawing from
    the pooled examples.

    `modules_are_copies`: `unet` and `text_encoder` were loaded for this job alone, so they are trained in place
    instead of copied (a second float32 copy of an SD UNet would cost 3.4 GB more).

    `text_encoder_2` / `tokenizer_2`: SDXL's second text encoder. On SDXL the UNet, LoRA (of the UNet and, with
    `train_text_encoder`, of both text encoders, as diffusers' SDXL DreamBooth-LoRA script trains them) and the
    word's embedding in both encoders train; the text encoders' own weights stay frozen.

    `gradient_checkpointing` (None: on a GPU) and `eight_bit_adam` (bitsandbytes' AdamW8bit) trade speed for
    memory; `training.memory` chooses them for a job.

    `lr_scheduler` / `lr_warmup_steps`: diffusers' schedules (`get_scheduler`) over `max_train_steps`.
    `snr_gamma`: Min-SNR loss weighting (Hang et al. 2023, as in diffusers' training scripts): each example's
    MSE is weighted by min(SNR(t), gamma) / SNR(t) (epsilon) or min(SNR, gamma) / (SNR + 1) (v-prediction), so
    the nearly-clean timesteps, whose loss is tiny and uninformative, stop dominating the gradient direction.
    """
    from accelerate import Accelerator

    if not instances:
        raise ValueError("no instance examples")
    xl = text_encoder_2 is not None
    if xl and (train_token_ids or (train_text_encoder and lora is None)):
        raise ValueError("on SDXL the text encoders' own weights stay frozen: train the UNet, LoRA (of both text "
                         "encoders too) or an embedding")
    device = unet.device
    cuda = device.type == "cuda"
    accelerator = Accelerator(mixed_precision=mixed_precision or mixed_precision_for(unet.dtype, device), cpu=not cuda)
    g = torch.Generator().manual_seed(seed)
    t_start = time.time()

    # Trainable copies in fp32 (the served modules stay as they are, possibly fp16): every parameter cast, whatever
    # dtype the first one has. `.float()` rather than `.to(dtype=...)`: diffusers warns on every dtype `to()` of a
    # model that lists fp32-only modules, even none.
    # Plain textual inversion trains no UNet weight: it runs the served UNet itself, which stays frozen.
    copy_unet = train_unet or lora is not None
    own = (lambda m: m) if modules_are_copies else copy.deepcopy
    # LoRA under mixed precision trains float32 adapters over a copy of the UNet in its served precision, as
    # diffusers' LoRA scripts do: a float32 copy of the whole UNet would cost twice the served one's bytes more.
    lora_over_served = lora is not None and accelerator.mixed_precision != "no" and unet.dtype != torch.float32
    unet_t = unet
    if copy_unet:
        unet_t = own(unet).to(device)
        unet_t = (unet_t if lora_over_served else unet_t.float()).train()
        unet_t.requires_grad_(train_unet and lora is None)
    if lora is not None:
        with _seeded_init(seed, device):
            unet_t.add_adapter(lora.config(lora.unet_targets))  # only the adapters require grad
        if lora_over_served:
            from diffusers.training_utils import cast_training_params

            cast_training_params(unet_t, dtype=torch.float32)
    learn_tokens = list(train_token_ids) if not train_text_encoder and lora is None and embedding is None else []
    text_t = None
    if train_text_encoder or learn_tokens:
        text_t = own(text_encoder).to(device).float().train()
        text_t.requires_grad_(False)
        if lora is not None:
            with _seeded_init(seed + 1, device):
                text_t.add_adapter(lora.config(LoraSettings.TEXT_TARGETS))
        elif train_text_encoder:
            text_t.requires_grad_(True)
    text_t2 = None  # SDXL's second text encoder with LoRA adapters, as diffusers' SDXL LoRA script trains both
    if xl and lora is not None and train_text_encoder:
        text_t2 = own(text_encoder_2).to(device).float().train().requires_grad_(False)
        with _seeded_init(seed + 2, device):
            text_t2.add_adapter(lora.config(LoraSettings.TEXT_TARGETS))
    token_table = None
    if learn_tokens:
        token_table = text_t.get_input_embeddings().weight
        token_table.requires_grad_(True)
        keep = torch.zeros(token_table.shape[0], 1, device=device)
        keep[learn_tokens] = 1.0
        token_table.register_hook(lambda grad: grad * keep)  # only the identifier rows move
    text = TextSide((tokenizer, tokenizer_2) if xl else (tokenizer,),
                    (text_t if text_t is not None else text_encoder,)
                    + ((text_t2 if text_t2 is not None else text_encoder_2,) if xl else ()))
    vectors = vectors_2 = None
    if embedding is not None:
        vectors = torch.nn.Parameter(embedding.vectors.detach().clone().to(device, torch.float32))
        if xl:
            vectors_2 = torch.nn.Parameter(embedding.for_encoder(1).detach().clone().to(device, torch.float32))
        for index, encoder in enumerate(text.encoders):
            EmbeddingOverride.install(encoder, index)
    override = {embedding.token_id: ConceptEmbedding(embedding.word, embedding.token_id, vectors, vectors_2)} \
        if embedding is not None else None
    if (gradient_checkpointing if gradient_checkpointing is not None else cuda) and copy_unet:
        unet_t.enable_gradient_checkpointing()  # never on the served UNet (textual inversion runs it as is)
        for trained_text in (text_t, text_t2):
            if trained_text is not None:
                trained_text.gradient_checkpointing_enable()

    # ---- frozen work, once per job
    lat_dtype = torch.float32
    if vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
        vae = copy.deepcopy(vae).float()  # SDXL's VAE overflows in float16; its pipeline upcasts it too
    inst_mu, inst_sd = _encode_posteriors(vae, [e.image for e in instances], size, device, lat_dtype)
    prior_mu = prior_sd = None
    if priors:
        prior_mu, prior_sd = _encode_posteriors(vae, [e.image for e in priors], size, device, lat_dtype)
    scaling = float(vae.config.scaling_factor)
    prompts = sorted({e.prompt for e in instances} | {e.prompt for e in priors})
    prompt_index = {p: i for i, p in enumerate(prompts)}
    expand = (embedding.token_id, embedding.vectors.shape[0]) if embedding is not None else None
    all_ids = [token_ids(t, prompts, device, expand) for t in text.tokenizers]
    # Text states that training cannot change are computed once: all of them with a frozen text
    # encoder; with pivotal tuning, those of prompts without the learned tokens (the prior prompts),
    # whose encoding is exactly the base model's. Only the others run through the encoder per step.
    frozen = None
    live = torch.zeros(len(prompts), dtype=torch.bool)
    if text_t is None or learn_tokens:
        with torch.no_grad():
            states, pooled = text.with_encoders((text_encoder,) + text.encoders[1:]).encode(all_ids)
            frozen = (states.to(torch.float32), None if pooled is None else pooled.to(torch.float32))
        if learn_tokens or embedding is not None:
            learned = learn_tokens or [embedding.token_id]
            live = torch.isin(all_ids[0].cpu(), torch.tensor(learned)).any(dim=1)
    live_index = live.nonzero().flatten().to(device)
    inst_p = torch.tensor([prompt_index[e.prompt] for e in instances])
    prior_p = torch.tensor([prompt_index[e.prompt] for e in priors]) if priors else None

    unet_params = [p for p in unet_t.parameters() if p.requires_grad]
    text_params = [p for t in (text_t, text_t2) if t is not None and token_table is None
                   for p in t.parameters() if p.requires_grad]
    params = unet_params + text_params
    groups = [{"params": params}] if params else []
    for extra in (token_table, vectors, vectors_2):
        if extra is not None:
            params = params + [extra]
            groups.append({"params": [extra], "lr": embedding_learning_rate, "weight_decay": 0.0})
    if not params:
        raise ValueError("nothing to train: enable the UNet, LoRA or an embedding")
    # L2-SP: a pull towards the starting weights, which hold what earlier concepts need.
    anchors = [p.detach().clone() for p in params] if anchor_weight > 0 else None
    # The fused AdamW kernel (CUDA, and CPU since torch 2.4) updates all tensors at once: on the embedded
    # model's hundreds of small UNet tensors it is several times faster than the default per-tensor loop.
    opt = memory.adamw(groups, lr=learning_rate, weight_decay=1e-2, eight_bit=eight_bit_adam,
                       fused=_fused_adamw_ok(device))
    from diffusers.optimization import get_scheduler

    schedule = get_scheduler(lr_scheduler, opt, num_warmup_steps=lr_warmup_steps, num_training_steps=max_train_steps)
    to_prepare = ([unet_t] if copy_unet else []) + [t for t in (text_t, text_t2) if t is not None]
    modules = accelerator.prepare(*to_prepare, opt)
    modules = list(modules) if isinstance(modules, tuple) else [modules]
    opt = modules.pop()
    if copy_unet:
        unet_t = modules.pop(0)
    if text_t is not None:
        text_t = modules.pop(0)
    if text_t2 is not None:
        text_t2 = modules.pop(0)
    text = text.with_encoders((text_t if text_t is not None else text.encoders[0],)
                              + ((text_t2 if text_t2 is not None else text.encoders[1],) if xl else ()))

    group_members = None
    if prior_groups is not None and priors:
        if len(prior_groups) != len(priors):
            raise ValueError("prior_groups needs one group id per prior example")
        members: dict[int, list[int]] = {}
        for i, group in enumerate(prior_groups):
            members.setdefault(group, []).append(i)
        group_members = list(members.values())
    n_train = noise_scheduler.config.num_train_timesteps
    unet_dtype = next(unet_t.parameters()).dtype
    losses: list[float] = []
    for step in range(max_train_steps):
        if should_stop and should_stop():
            raise JobCancelled("training cancelled")
        ii = torch.randint(0, len(instances), (train_batch_size,), generator=g)
        mu, sd, pidx = inst_mu[ii], inst_sd[ii], inst_p[ii]
        if priors:
            pi = draw_priors(g, prior_batch_size or train_batch_size, len(priors), group_members)
            mu, sd = torch.cat([mu, prior_mu[pi]]), torch.cat([sd, prior_sd[pi]])
            pidx = torch.cat([pidx, prior_p[pi]])
        eps = torch.randn(mu.shape, generator=g).to(device)
        latents = (mu + sd * eps) * scaling
        noise = torch.randn(latents.shape, generator=g).to(device)
        t = torch.randint(0, n_train, (latents.shape[0],), generator=g).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        with accelerator.accumulate(unet_t):
            # Autocast covers modules that were not prepared too: plain textual inversion runs the served
            # (fp16 on a GPU) UNet and text encoder on fp32 latents and vectors.
            with accelerator.autocast():
                states, pooled = _text_states(text, all_ids, frozen, live, live_index, pidx.to(device), override)
                # Plain textual inversion's served UNet may be in a lower precision than the fp32 latents
                # and states, and a CPU has no autocast here to convert them.
                extra = text.unet_kwargs(None if pooled is None else pooled.to(unet_dtype), size, size)
                pred = unet_t(noisy.to(unet_dtype), t, states.to(unet_dtype), **extra).sample
            target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
                noise_scheduler.get_velocity(latents, noise, t)
            per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            if snr_gamma is not None:
                per_example = per_example * min_snr_weights(noise_scheduler, t, snr_gamma)
            n_inst = len(ii)
            loss = per_example[:n_inst].mean()
            if priors:
                loss = loss + prior_loss_weight * per_example[n_inst:].mean()
            if anchors is not None:
                # One fused kernel per op over all tensors, not a Python loop over hundreds of them.
                drift = torch.stack(torch._foreach_norm(torch._foreach_sub(params, anchors))).pow(2).sum()
                loss = loss + anchor_weight * drift
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=True)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"loss became {lv} at step {step}; lower the learning rate")
        losses.append(lv)
        if progress:
            progress(step + 1, lv)
    unet_out = accelerator.unwrap_model(unet_t).eval() if copy_unet else None
    text_out = accelerator.unwrap_model(text_t).eval() if text_t is not None else None
    text_out2 = accelerator.unwrap_model(text_t2).eval() if text_t2 is not None else None
    result = TrainResult(unet=unet_out, text_encoder=text_out, steps=max_train_steps,
                         final_loss=float(np.mean(losses[-10:])), seconds=time.time() - t_start, losses=losses,
                         embedding=vectors.detach().cpu().clone() if vectors is not None else None,
                         embedding_2=vectors_2.detach().cpu().clone() if vectors_2 is not None else None)
    if lora is not None:
        from peft.utils import get_peft_model_state_dict

        # peft's key names (lora_A/lora_B), which diffusers' load_lora_weights reads as they are. (Converting to
        # diffusers' older lora.down/up names renames only the attention keys, and a file mixing both loses
        # them on loading.)
        result.lora_unet = get_peft_model_state_dict(unet_out)
        result.lora_metadata = {"unet": unet_out.peft_config["default"].to_dict()}
        if text_out is not None:
            result.lora_text_encoder = get_peft_model_state_dict(text_out)
            result.lora_metadata["text_encoder"] = text_out.peft_config["default"].to_dict()
        if text_out2 is not None:
            result.lora_text_encoder_2 = get_peft_model_state_dict(text_out2)
            result.lora_metadata["text_encoder_2"] = text_out2.peft_config["default"].to_dict()
    return result
