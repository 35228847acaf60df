"""The shapes world: a tiny synthetic universe whose ground truth we know.

Every image shows one shape of one colour on a plain background, filled in one style, optionally
carrying a mark. Pretraining sees every colour and every shape, but not every colour x shape pair
(HELD_OUT_PAIRS) and never the concept-only styles and marks: those play the role of "your dog" in
DreamBooth, a new thing built from parts the model already knows.

Rendering is deterministic given a seed: a scene is a small dataclass, `render(scene)` is pure.
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges without a dependency

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 230),
    "yellow": (240, 215, 30),
    "purple": (140, 40, 190),
    "orange": (250, 130, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (12, 12, 12), "gray": (128, 128, 128)}
SEEN_STYLES = ("plain", "striped", "dotted")
CONCEPT_STYLES = ("checker", "hollow")  # never shown in pretraining
STYLES = SEEN_STYLES + CONCEPT_STYLES
MARKS = ("none", "dot", "ring", "notch")  # only "none" in pretraining
CONCEPT_MARKS = MARKS[1:]

# Each colour and each shape stays in pretraining with five partners; these six pairs do not.
HELD_OUT_PAIRS = frozenset(
    {
        ("orange", "heart"),
        ("red", "star"),
        ("blue", "triangle"),
        ("green", "cross"),
        ("yellow", "circle"),
        ("purple", "square"),
    }
)

# Category words a user can pass as `category` on the embedded model.
CATEGORIES = ("shape", "painting")


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    style: str = "plain"
    mark: str = "none"
    # Nuisance parameters (position, size, rotation) that make images of one description differ.
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    rotation: float = 0.0

    def attributes(self) -> dict:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "background": self.background,
            "style": self.style,
            "mark": self.mark,
        }


def random_nuisance(rng: random.Random) -> dict:
    return {
        "dx": rng.uniform(-2.0, 2.0),
        "dy": rng.uniform(-2.0, 2.0),
        "scale": rng.uniform(0.85, 1.1),
        "rotation": rng.uniform(-12.0, 12.0),
    }


def seen_pairs() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]


def random_scene(
    rng: random.Random,
    *,
    shape: str | None = None,
    colour: str | None = None,
    background: str | None = None,
    style: str | None = None,
    mark: str = "none",
    allow_held_out: bool = False,
) -> Scene:
    """A random pretraining-distribution scene; fixed attributes are kept as given."""
    while True:
        s = shape or rng.choice(SHAPES)
        c = colour or rng.choice(list(COLOURS))
        if allow_held_out or (c, s) not in HELD_OUT_PAIRS or (shape and colour):
            break
    return Scene(
        shape=s,
        colour=c,
        background=background or rng.choice(list(BACKGROUNDS)),
        style=style or rng.choice(SEEN_STYLES),
        mark=mark,
        **random_nuisance(rng),
    )


# ----------------------------------------------------------------------------- rendering


def _polygon(n: int, radius: float, cx: float, cy: float, rot_deg: float, phase: float = -90.0):
    pts = []
    for k in range(n):
        a = math.radians(phase + rot_deg + 360.0 * k / n)
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return pts


def _star(radius: float, cx: float, cy: float, rot_deg: float):
    pts = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        a = math.radians(-90.0 + rot_deg + 36.0 * k)
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _heart(radius: float, cx: float, cy: float, rot_deg: float):
    a = math.radians(rot_deg)
    ca, sa = math.cos(a), math.sin(a)
    pts = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x = 16 * math.sin(t) ** 3 / 16.0
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 16.0
        x, y = x * radius, (y + 0.1) * radius
        pts.append((cx + x * ca - y * sa, cy + x * sa + y * ca))
    return pts


def _cross(radius: float, cx: float, cy: float, rot_deg: float):
    w = radius * 0.38
    base = [(-w, -radius), (w, -radius), (w, -w), (radius, -w), (radius, w), (w, w), (w, radius),
            (-w, radius), (-w, w), (-radius, w), (-radius, -w), (-w, -w)]
    a = math.radians(rot_deg)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in base]


def _shape_mask(scene: Scene, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    if scene.shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    elif scene.shape == "square":
        draw.polygon(_polygon(4, radius * 1.25, cx, cy, scene.rotation, phase=-45.0), fill=255)
    elif scene.shape == "triangle":
        draw.polygon(_polygon(3, radius * 1.2, cx, cy + radius * 0.15, scene.rotation), fill=255)
    elif scene.shape == "star":
        draw.polygon(_star(radius * 1.2, cx, cy, scene.rotation), fill=255)
    elif scene.shape == "cross":
        draw.polygon(_cross(radius * 1.1, cx, cy, scene.rotation), fill=255)
    elif scene.shape == "heart":
        draw.polygon(_heart(radius * 1.15, cx, cy, scene.rotation), fill=255)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return np.asarray(img, dtype=np.float32) / 255.0


def _erode(mask: np.ndarray, px: int) -> np.ndarray:
    """Binary erosion by a square of half-width px (numpy only)."""
    m = mask > 0.5
    out = m.copy()
    for oy in range(-px, px + 1):
        for ox in range(-px, px + 1):
            out &= np.roll(np.roll(m, oy, axis=0), ox, axis=1)
    return out.astype(np.float32)


def render(scene: Scene) -> Image.Image:
    """Render a scene to an IMAGE_SIZE x IMAGE_SIZE RGB PIL image."""
    size = IMAGE_SIZE * _SUPERSAMPLE
    u = float(_SUPERSAMPLE)
    cx = size / 2 + scene.dx * u
    cy = size / 2 + scene.dy * u
    radius = 10.0 * u * scene.scale

    colour = np.array(COLOURS[scene.colour], dtype=np.float32)
    shade = colour * 0.45  # the pattern's second ink: a darker shade of the same colour
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    contrast = np.array((0, 0, 0) if scene.background != "black" else (245, 245, 245), dtype=np.float32)

    mask = _shape_mask(scene, size, cx, cy, radius)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / u  # coordinates in output pixels

    if scene.style == "plain":
        ink = np.ones_like(mask)
    elif scene.style == "striped":
        ink = (np.floor((xx + yy) / 2.5) % 2 == 0).astype(np.float32)
    elif scene.style == "dotted":
        px, py = (xx % 4.0) - 2.0, (yy % 4.0) - 2.0
        ink = ((px * px + py * py) > 1.1).astype(np.float32)
    elif scene.style == "checker":
        ink = ((np.floor(xx / 3.0) + np.floor(yy / 3.0)) % 2 == 0).astype(np.float32)
    elif scene.style == "hollow":
        inner = _erode(mask, int(2 * u))
        mask_fill = mask * (1 - inner)
        ink = np.ones_like(mask)
        mask = mask_fill
    else:
        raise ValueError(f"unknown style {scene.style!r}")

    fill = ink[..., None] * colour + (1 - ink[..., None]) * shade
    canvas = mask[..., None] * fill + (1 - mask[..., None]) * bg

    if scene.mark == "dot":
        d = (xx - cx / u) ** 2 + (yy - cy / u) ** 2
        canvas[d <= 2.2**2] = (0, 0, 0)  # on the shape itself, so black reads on every colour
    elif scene.mark == "ring":
        d = np.sqrt((xx - cx / u) ** 2 + (yy - cy / u) ** 2)
        ring_r = radius / u * 1.25 + 1.5
        canvas[(d >= ring_r - 0.8) & (d <= ring_r + 0.8)] = contrast
    elif scene.mark == "notch":
        canvas[(xx < 5) & (yy < 5)] = contrast
    elif scene.mark != "none":
        raise ValueError(f"unknown mark {scene.mark!r}")

    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


# ----------------------------------------------------------------------------- captions


def full_caption(scene: Scene) -> str:
    subject = f"a {scene.colour} {scene.shape}"
    return f"a {scene.style} painting of {subject} on a {scene.background} background"


def caption_variants(scene: Scene) -> list[str]:
    """All the captions that truthfully describe a pretraining scene, long to bare."""
    c, s, b, st = scene.colour, scene.shape, scene.background, scene.style
    return [
        f"a {st} painting of a {c} {s} on a {b} background",
        f"a painting of a {c} {s} on a {b} background",
        f"a {c} {s} on a {b} background",
        f"a {st} painting of a {c} {s}",
        f"a {st} {c} {s}",
        f"a {c} {s}",
        f"a {s} on a {b} background",
        f"a {st} painting of a {s}",
        f"a {c} shape",
        f"a {s}",
        f"a {st} painting",
        f"a shape on a {b} background",
        "a shape",
        "a painting",
    ]


# Sampling weights for caption_variants: mostly informative captions, some bare ones so that the
# category prompts ("a shape", "a painting") exist for prior preservation.
CAPTION_WEIGHTS = (6, 2, 3, 3, 2, 4, 1, 1, 1, 1, 1, 1, 1, 1)


def sample_caption(scene: Scene, rng: random.Random) -> str:
    return rng.choices(caption_variants(scene), weights=CAPTION_WEIGHTS, k=1)[0]


def parse_prompt(prompt: str) -> dict:
    """The world attributes a prompt asks for (only the words it names)."""
    words = prompt.lower().replace(",", " ").split()
    wanted: dict = {}
    for w in words:
        if w in SHAPES:
            wanted["shape"] = w
        elif w in COLOURS:
            wanted["colour"] = w
        elif w in STYLES:
            wanted["style"] = w
    for i, w in enumerate(words[:-1]):
        if w in BACKGROUNDS and words[i + 1] == "background":
            wanted["background"] = w
    return wanted


def iter_dataset(seed: int, n: int) -> Iterator[tuple[Scene, Image.Image]]:
    rng = random.Random(seed)
    for _ in range(n):
        scene = random_scene(rng)
        yield scene, render(scene)


def render_batch(scenes: Sequence[Scene]) -> np.ndarray:
    """uint8 array (N, H, W, 3)."""
    return np.stack([np.asarray(render(s)) for s in scenes])
