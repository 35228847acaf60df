"""Pretrain the embedded shapes-world Stable Diffusion from scratch, in resumable stages.

    python -m shapes_world.pretrain all --work work/pretrain --out models/shapes-sd

Stages (each resumes from its last checkpoint under --work when rerun):
  data   render the training sets (seeded) and save them as uint8 arrays: the text-image set
         (pretraining distribution only) and the VAE set (everything the world can render)
  vae    train the AutoencoderKL; set its scaling_factor from the measured latent std
  encode cache VAE posteriors of the training set (the VAE is frozen from here on)
  unet   train UNet + text encoder jointly on cached latents with caption dropout (for CFG),
         min-SNR loss weighting and an EMA of the weights
  export write a StableDiffusionPipeline folder (safetensors) with the EMA weights
Runs unchanged on CUDA (picked automatically) and on the CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import model as M
from . import world

CAPTION_DROPOUT = 0.1


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _atomic_torch_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_ckpt(path: str):
    return torch.load(path, map_location="cpu", weights_only=False) if os.path.exists(path) else None


# ----------------------------------------------------------------------------- data


def _vae_scene(rng: random.Random) -> world.Scene:
    # Like SD's VAE (trained on far more than its captioned data), ours is a general codec for the
    # world: held-out pairs, concept styles and marks included. Only the text-conditioned UNet is
    # kept away from them, so DreamBooth concepts stay new to the diffusion model but decodable.
    return world.random_scene(rng, style=rng.choice(world.STYLES),
                              mark=rng.choice(world.MARKS) if rng.random() < 0.5 else "none", allow_held_out=True)


def stage_data(work: str, n: int, seed: int, n_vae: int) -> None:
    for name, count, make, sub_seed in (("data.npz", n, world.random_scene, seed),
                                        ("vae_data.npz", n_vae, _vae_scene, seed + 1)):
        path = os.path.join(work, name)
        if os.path.exists(path):
            print(f"[data] {path} exists, skipping")
            continue
        rng = random.Random(sub_seed)
        scenes = [make(rng) for _ in range(count)]
        images = np.stack([np.asarray(world.render(s)) for s in tqdm(scenes, desc=name, mininterval=5)])
        attrs = np.array([[s.shape, s.colour, s.background, s.style, s.mark] for s in scenes])
        np.savez(path + ".tmp.npz", images=images, attrs=attrs)
        os.replace(path + ".tmp.npz", path)
        print(f"[data] {count} images -> {path}")


def _load_data(work: str, name: str = "data.npz"):
    d = np.load(os.path.join(work, name))
    return d["images"], d["attrs"]


def _to_tensor(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------- VAE


def stage_vae(work: str, steps: int, batch: int, lr: float, seed: int) -> None:
    dev = _device()
    ckpt_path = os.path.join(work, "vae.pt")
    images, _ = _load_data(work, "vae_data.npz")
    vae = M.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    step = 0
    ck = _load_ckpt(ckpt_path)
    if ck:
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
    if step >= steps:
        print(f"[vae] done ({step} steps)")
        return
    vae.to(dev).train()
    g = torch.Generator().manual_seed(seed + step)
    bar = tqdm(total=steps, initial=step, desc="vae", mininterval=10)
    while step < steps:
        idx = torch.randint(0, len(images), (batch,), generator=g).numpy()
        x = _to_tensor(images[idx]).to(dev)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        # L1 keeps edges and stripes sharp; the KL term only keeps the latent well scaled.
        loss = F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        for group in opt.param_groups:  # constant, then linear decay over the last 30%
            group["lr"] = lr * min(1.0, max(0.05, (steps - step) / (0.3 * steps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 200 == 0 or step == steps:
            _atomic_torch_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt_path)
    bar.close()


def _load_vae(work: str):
    vae = M.build_vae()
    vae.load_state_dict(_load_ckpt(os.path.join(work, "vae.pt"))["model"])
    return vae.eval()


# ----------------------------------------------------------------------------- latents


@torch.no_grad()
def stage_encode(work: str) -> None:
    path = os.path.join(work, "latents.pt")
    if os.path.exists(path):
        print(f"[encode] {path} exists, skipping")
        return
    dev = _device()
    images, _ = _load_data(work)
    vae = _load_vae(work).to(dev)
    means, stds = [], []
    for i in tqdm(range(0, len(images), 256), desc="encode", mininterval=10):
        post = vae.encode(_to_tensor(images[i : i + 256]).to(dev)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    # SD's convention: scale latents to unit variance; measured on the posterior samples.
    sample_std = (mean + std * torch.randn_like(std)).std().item()
    scaling = 1.0 / sample_std
    _atomic_torch_save({"mean": mean.half(), "std": std.half(), "scaling_factor": scaling}, path)
    print(f"[encode] latents {tuple(mean.shape)}, std {sample_std:.4f} -> scaling_factor {scaling:.4f}")


# ----------------------------------------------------------------------------- UNet + text encoder


def _lr_at(step: int, steps: int, lr: float, warmup: int = 300) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def stage_unet(work: str, model_dir_for_tokenizer: str, steps: int, batch: int, lr: float, seed: int,
               snr_gamma: float = 5.0, ema_decay: float = 0.999) -> None:
    from diffusers.training_utils import compute_snr

    dev = _device()
    ckpt_path = os.path.join(work, "unet.pt")
    _, attrs = _load_data(work)
    lat = torch.load(os.path.join(work, "latents.pt"), weights_only=False)
    lat_mean, lat_std, scaling = lat["mean"].float(), lat["std"].float(), lat["scaling_factor"]
    scenes = [world.Scene(shape=a[0], colour=a[1], background=a[2], style=a[3], mark=a[4]) for a in attrs]

    from .tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(model_dir_for_tokenizer, "tokenizer"), M.TEXT_MAX_LENGTH)
    unet, text = M.build_unet(), M.build_text_encoder(len(tok))
    sched = M.build_scheduler()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    step = 0
    ck = _load_ckpt(ckpt_path)
    if ck:
        unet.load_state_dict(ck["unet"])
        text.load_state_dict(ck["text"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    if ck:
        ema_unet.load_state_dict(ck["ema_unet"])
        ema_text.load_state_dict(ck["ema_text"])
    if step >= steps:
        print(f"[unet] done ({step} steps)")
        return
    for m in (unet, text, ema_unet, ema_text):
        m.to(dev)
    unet.train()
    text.train()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    rng = random.Random(seed * 1000003 + step)
    g = torch.Generator().manual_seed(seed + step)
    alphas = sched.alphas_cumprod.to(dev)
    bar = tqdm(total=steps, initial=step, desc="unet", mininterval=10)
    t0, losses = time.time(), []
    while step < steps:
        idx = torch.randint(0, len(scenes), (batch,), generator=g)
        captions = ["" if rng.random() < CAPTION_DROPOUT else world.sample_caption(scenes[i], rng) for i in idx.tolist()]
        ids = tok(captions, padding="max_length", max_length=M.TEXT_MAX_LENGTH, truncation=True,
                  return_tensors="pt").input_ids.to(dev)
        mu, sd = lat_mean[idx], lat_std[idx]
        latents = ((mu + sd * torch.randn(mu.shape, generator=g)) * scaling).to(dev)
        noise = torch.randn(latents.shape, generator=g).to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g).to(dev)
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, text(ids)[0]).sample
        # Min-SNR-gamma weighting (Hang et al. 2023) converges markedly faster than plain MSE.
        snr = compute_snr(sched, t)
        w = torch.clamp(snr, max=snr_gamma) / snr
        loss = (F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema_params, params):
                pe.mul_(d).add_(p.detach(), alpha=1 - d)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{_lr_at(step, steps, lr):.1e}")
        if step % 250 == 0 or step == steps:
            _atomic_torch_save({"unet": unet.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(),
                                "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(),
                                "step": step}, ckpt_path)
            with open(os.path.join(work, "unet_log.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "loss": float(np.mean(losses[-250:])),
                                    "seconds": time.time() - t0}) + "\n")
    bar.close()


# ----------------------------------------------------------------------------- export


def stage_export(work: str, out: str, tokenizer_dir: str) -> None:
    from diffusers import StableDiffusionPipeline

    from .tokenizer import load_tokenizer

    ck = _load_ckpt(os.path.join(work, "unet.pt"))
    lat = torch.load(os.path.join(work, "latents.pt"), weights_only=False)
    tok = load_tokenizer(tokenizer_dir, M.TEXT_MAX_LENGTH)
    unet, text = M.build_unet(), M.build_text_encoder(len(tok))
    unet.load_state_dict(ck["ema_unet"])
    text.load_state_dict(ck["ema_text"])
    vae = _load_vae(work)
    vae.register_to_config(scaling_factor=float(lat["scaling_factor"]))
    # Stored in fp16 to halve the repo footprint; diffusers upcasts to fp32 on load. The text
    # encoder stays fp32 because transformers would keep it in fp16 (slow and lossy on CPUs).
    unet.half()
    vae.half()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=M.build_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    tmp = out.rstrip("/") + ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for extra in os.listdir(tokenizer_dir):  # keep the identifier pool beside the tokenizer files
        if not os.path.exists(os.path.join(tmp, "tokenizer", extra)):
            shutil.copy(os.path.join(tokenizer_dir, extra), os.path.join(tmp, "tokenizer", extra))
    write_model_card(tmp, ck["step"])
    if os.path.exists(out):
        old = out.rstrip("/") + ".old-export"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    print(f"[export] pipeline -> {out}")


DEFAULT_GUIDANCE = 4.0
# DreamBooth settings measured on this model (benchmarks/dreambooth_smoke.py); the service reads them.
# LoRA's own: research/lora_settings.py chose them, research/lora_steps.py its steps and rank
# (docs/private-concepts.md, "Time to a concept").
FINETUNE_DEFAULTS = {"learning_rate": 1e-4, "max_train_steps": 700, "num_class_images": 48, "train_batch_size": 4,
                     "train_identifier_embedding": True, "embedding_learning_rate": 1e-3,
                     "per_method": {"lora": {"learning_rate": 3e-3, "lora_rank": 2, "max_train_steps": 500,
                                             "lora_targets": "all", "embedding_learning_rate": 3e-3,
                                             "lr_scheduler": "cosine", "lr_warmup_steps": 30, "snr_gamma": 5.0}},
                     # rank-4 adapters learn all four continual-benchmark concepts to 1.00 in 600 steps; 500
                     # left the checker style at 0.84 there, 400 alone (README "Does it forget?")
                     "per_strategy": {"adapters": {"max_train_steps": 600}}}


def write_model_card(model_dir: str, unet_steps: int) -> None:
    """big_defaults.json: what the model is and the defaults the service should use with it."""
    with open(os.path.join(model_dir, "big_defaults.json"), "w") as f:
        json.dump({"unet_steps": unet_steps, "image_size": world.IMAGE_SIZE,
                   "default_guidance_scale": DEFAULT_GUIDANCE, "default_steps": 20,
                   "finetune_defaults": FINETUNE_DEFAULTS, "categories": list(world.CATEGORIES)}, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["data", "vae", "encode", "unet", "export", "all"])
    ap.add_argument("--work", default="work/pretrain")
    ap.add_argument("--out", default=M.DEFAULT_MODEL_DIR)
    ap.add_argument("--tokenizer", default=os.path.join(M.DEFAULT_MODEL_DIR, "tokenizer"),
                    help="folder with vocab.json/merges.txt (see shapes_world.tokenizer)")
    ap.add_argument("--n-images", type=int, default=50000)
    ap.add_argument("--n-vae-images", type=int, default=30000)
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--unet-steps", type=int, default=7000)
    ap.add_argument("--unet-batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    os.makedirs(a.work, exist_ok=True)
    tokdir_parent = os.path.dirname(a.tokenizer.rstrip("/"))
    t0 = time.time()
    stages = ["data", "vae", "encode", "unet", "export"] if a.stage == "all" else [a.stage]
    for st in stages:
        ts = time.time()
        if st == "data":
            stage_data(a.work, a.n_images, a.seed, a.n_vae_images)
        elif st == "vae":
            stage_vae(a.work, a.vae_steps, a.vae_batch, 1e-3, a.seed)
        elif st == "encode":
            stage_encode(a.work)
        elif st == "unet":
            stage_unet(a.work, tokdir_parent, a.unet_steps, a.unet_batch, a.lr, a.seed)
        elif st == "export":
            stage_export(a.work, a.out, a.tokenizer)
        print(f"[{st}] {time.time() - ts:.0f} s")
    print(f"[total] {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
