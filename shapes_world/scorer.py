"""A small classifier that reads a shapes-world image: shape, colour, background, style and mark.

It is trained on the renderer only (every attribute value, held-out pairs, concept styles and marks
included), with blur and noise so that it also reads generated images. It is the instrument behind
every fidelity, forgetting and drift number in this project, so its own accuracy is printed on a
held-out rendered set, seeded apart from training.

    python -m shapes_world.scorer train [--out models/shapes-scorer] [--reink-marks]
    python -m shapes_world.scorer check
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file

from . import world
from .model import DEFAULT_SCORER_DIR

HEADS = {
    "shape": list(world.SHAPES),
    "colour": list(world.COLOURS),
    "background": list(world.BACKGROUNDS),
    "style": list(world.STYLES),
    "mark": list(world.MARKS),
}


class ShapesScorer(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())

        self.stem = block(3, width)                # 32x32: stripes and dots live here
        self.mid = block(width, width * 2)         # 16x16
        self.deep = block(width * 2, width * 4)    # 8x8
        self.heads = nn.ModuleDict({k: nn.Linear(width * 4 + width, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.stem(x)
        h = self.deep(F.max_pool2d(self.mid(F.max_pool2d(s, 2)), 2))
        # Global max of the fine features sees small marks; mean of the deep ones sees the whole.
        feat = torch.cat([h.mean(dim=(2, 3)), s.amax(dim=(2, 3))], dim=1)
        return {k: head(feat) for k, head in self.heads.items()}


def images_to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((world.IMAGE_SIZE, world.IMAGE_SIZE)), dtype=np.uint8)
                    for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255.0)


def _random_training_scene(rng: random.Random) -> world.Scene:
    return world.random_scene(
        rng,
        style=rng.choice(world.STYLES),
        mark=rng.choice(world.MARKS) if rng.random() < 0.6 else "none",
        allow_held_out=True,
    )


def _augment(img: Image.Image, rng: random.Random) -> Image.Image:
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.7)))
    arr = np.asarray(img, dtype=np.float32)
    if rng.random() < 0.7:
        arr = arr + np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(1, 10), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def mark_in_ink(scene: world.Scene, ink, strength: float = 1.0) -> Image.Image:
    """The scene rendered with its mark drawn in `ink` (an RGB triple) instead of the renderer's, blended by how
    much of each pixel the mark covers (its anti-aliased edge) times `strength`."""
    return _inked(*_mark_cover(scene), ink, strength)


def _inked(unmarked: np.ndarray, cover: np.ndarray, ink, strength: float) -> Image.Image:
    alpha = strength * cover[..., None]
    inked = unmarked * (1 - alpha) + np.asarray(ink, np.float32) * alpha
    return Image.fromarray(np.clip(inked, 0, 255).astype(np.uint8))


def _mark_cover(scene: world.Scene) -> tuple[np.ndarray, np.ndarray]:
    """(the scene rendered without its mark, the share 0..1 of each pixel its mark covers)."""
    unmarked = np.asarray(world.render(dataclasses.replace(scene, mark="none")), dtype=np.float32)
    cover = np.abs(np.asarray(world.render(scene), dtype=np.float32) - unmarked).sum(-1)
    return unmarked, cover / cover.max() if cover.max() >= 1 else cover * 0


def _reinked(scene: world.Scene, img: Image.Image, rng: random.Random) -> Image.Image:
    """`img` (the render of `scene`) with its mark redrawn in another ink, half the time (`train --reink-marks`).
    The renderer's marks are pure black (or the background's contrast), and the shipped scorer, which never saw
    another ink, reads a full-size navy or dark purple dot as no mark (research/scorer_marks.py). The new ink
    stays far from the pixels under the mark, so the mark stays visible and its label true."""
    if scene.mark == "none" or rng.random() < 0.5:
        return img
    unmarked, cover = _mark_cover(scene)
    if not cover.any():
        return img
    weights = cover[..., None] / cover.sum()
    old_ink = (np.asarray(img, dtype=np.float32) * weights).sum((0, 1))
    tint = np.array([rng.uniform(0, 255) for _ in range(3)], dtype=np.float32)
    ink = old_ink + rng.uniform(0.0, 0.6) * (tint - old_ink)
    if np.abs(ink - (unmarked * weights).sum((0, 1))).sum() < 200:
        return img
    return _inked(unmarked, cover, ink, rng.uniform(0.75, 1.0))


def _batch(rng: random.Random, n: int, augment: bool, reink_marks: bool = False):
    scenes = [_random_training_scene(rng) for _ in range(n)]
    imgs = [world.render(s) for s in scenes]
    if augment:
        imgs = [_augment(_reinked(s, im, rng) if reink_marks else im, rng) for s, im in zip(scenes, imgs)]
    x = images_to_tensor(imgs)
    y = {k: torch.tensor([v.index(getattr(s, k)) for s in scenes]) for k, v in HEADS.items()}
    return x, y


class Scorer:
    """Loaded scorer: `read(images)` returns one attribute dict per image."""

    def __init__(self, path: str = DEFAULT_SCORER_DIR, device: str = "cpu"):
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        if cfg["heads"] != HEADS:
            raise ValueError(f"scorer at {path} was trained for other labels; retrain it")
        self.net = ShapesScorer(cfg["width"])
        self.net.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
        self.net.eval().to(device)
        self.device = device

    @torch.no_grad()
    def read(self, images) -> list[dict]:
        out = []
        for i in range(0, len(images), 256):
            logits = self.net(images_to_tensor(images[i : i + 256]).to(self.device))
            preds = {k: v.argmax(1).tolist() for k, v in logits.items()}
            for j in range(len(preds["shape"])):
                out.append({k: HEADS[k][preds[k][j]] for k in HEADS})
        return out


def accuracy_on_rendered(scorer: Scorer, n: int = 2000, seed: int = 12345) -> dict:
    """Per-attribute accuracy on freshly rendered, unaugmented images (a seed never used in training)."""
    rng = random.Random(seed)
    scenes = [_random_training_scene(rng) for _ in range(n)]
    reads = scorer.read([world.render(s) for s in scenes])
    acc = {k: float(np.mean([r[k] == getattr(s, k) for r, s in zip(reads, scenes)])) for k in HEADS}
    acc["all"] = float(np.mean([all(r[k] == getattr(s, k) for k in HEADS) for r, s in zip(reads, scenes)]))
    return acc


def train(out: str, steps: int, batch: int, seed: int, width: int = 32, reink_marks: bool = False) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = ShapesScorer(width)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    t0 = time.time()
    for step in range(steps):
        x, y = _batch(rng, batch, augment=True, reink_marks=reink_marks)
        logits = net(x)
        loss = sum(F.cross_entropy(logits[k], y[k]) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"[scorer] step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"width": width, "heads": HEADS, "train_steps": steps, "batch": batch, "seed": seed,
                   **({"reink_marks": True} if reink_marks else {})}, f, indent=1)
    return accuracy_on_rendered(Scorer(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["train", "check"])
    ap.add_argument("--out", default=DEFAULT_SCORER_DIR)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reink-marks", action="store_true", help="also train on marks redrawn in other inks (not the "
                    "shipped scorer's recipe: a second reader for the mark head, see research/scorer_marks.py)")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.cmd == "train":
        acc = train(a.out, a.steps, a.batch, a.seed, reink_marks=a.reink_marks)
    else:
        acc = accuracy_on_rendered(Scorer(a.out))
    print(json.dumps({"scorer_accuracy_on_rendered": acc, "n": 2000, "seed": 12345}, indent=1))


if __name__ == "__main__":
    main()
