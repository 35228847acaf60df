"""Training images as people prepare them (AUTOMATIC1111's "preprocess images" step): square crops around
the subject, oversized images split into overlapping tiles, optional mirrored and hue-rotated copies, prompt
templates.

Pure functions on PIL images and strings; the service applies them before training and stores the result
as the concept's instance images.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image, ImageFilter

# An image whose long side is this many times its short side is "oversized" for a square crop.
OVERSIZED_RATIO = 1.5
TILE_OVERLAP = 0.25
# Words for hues (Berlin and Kay's chromatic basic colour terms and common neighbours): a hue-rotated copy's
# caption drops them, since the hue they name is no longer in the image. Black, white and gray stay: a rotation
# leaves greys as they are.
HUE_WORDS = frozenset({"red", "green", "yellow", "blue", "brown", "purple", "pink", "orange", "violet", "cyan",
                       "magenta", "teal", "turquoise", "gold", "golden", "beige", "navy", "crimson", "scarlet"})


def focal_point(img: Image.Image) -> tuple[float, float]:
    """(x, y) in [0, 1] of where the subject is: the centroid of edge strength times local contrast.

    Edges find object boundaries, and weighting by distance from the image's mean colour keeps a plain
    background's texture from pulling the point away. Enough for a crop; not a detector.
    """
    small = img.convert("RGB").copy()
    small.thumbnail((128, 128))
    grey = small.convert("L")
    edges = np.asarray(grey.filter(ImageFilter.FIND_EDGES), dtype=np.float32)
    rgb = np.asarray(small, dtype=np.float32)
    contrast = np.linalg.norm(rgb - np.median(rgb.reshape(-1, 3), axis=0), axis=-1)
    weight = edges * (contrast + 1e-3)
    weight[[0, -1], :] = 0  # FIND_EDGES marks the image border
    weight[:, [0, -1]] = 0
    total = float(weight.sum())
    if total <= 0:
        return 0.5, 0.5
    ys, xs = np.mgrid[0 : weight.shape[0], 0 : weight.shape[1]]
    return float((weight * xs).sum() / total + 0.5) / weight.shape[1], float((weight * ys).sum() / total + 0.5) / weight.shape[0]


def crop_square(img: Image.Image, mode: str = "center") -> Image.Image:
    """The largest square of the image, centred on the middle (`center`) or on the subject (`focal`)."""
    w, h = img.size
    s = min(w, h)
    if mode == "focal":
        fx, fy = focal_point(img)
        left = int(round(min(max(fx * w - s / 2, 0), w - s)))
        top = int(round(min(max(fy * h - s / 2, 0), h - s)))
    elif mode == "center":
        left, top = (w - s) // 2, (h - s) // 2
    else:
        raise ValueError(f"unknown crop mode {mode!r}")
    return img.crop((left, top, left + s, top + s))


def split_tiles(img: Image.Image, overlap: float = TILE_OVERLAP, ratio: float = OVERSIZED_RATIO) -> list[Image.Image]:
    """Square tiles along the long side of an oversized image, each overlapping the next by `overlap`;
    an image that is not oversized comes back as itself."""
    w, h = img.size
    s, long = min(w, h), max(w, h)
    if long < ratio * s:
        return [img]
    stride = s * (1 - overlap)
    n = int(np.ceil((long - s) / stride)) + 1
    starts = np.linspace(0, long - s, n).round().astype(int)  # even spread, first and last flush
    return [img.crop((x, 0, x + s, s)) if w >= h else img.crop((0, x, s, x + s)) for x in starts]


@dataclasses.dataclass
class Prepared:
    images: list[Image.Image]
    captions: list[str | None]


def rotate_hue(img: Image.Image, turn: float) -> Image.Image:
    """`img` with every pixel's hue turned by `turn` of the colour circle; greys (black, white, gray) stay."""
    h, s, v = img.convert("RGB").convert("HSV").split()
    shift = round(256 * turn) % 256
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def without_hue_words(caption: str) -> str:
    """"an orange heart on a white background" -> "a heart on a white background": the caption of a copy whose
    hues were turned, so that it names nothing the copy does not show. "a"/"an" follow the next word."""
    words = [w for w in caption.split() if w.lower().strip(",.;") not in HUE_WORDS]
    for i in range(len(words) - 1):
        if words[i].lower() in ("a", "an"):
            article = "an" if words[i + 1][:1].lower() in "aeiou" else "a"
            words[i] = article.capitalize() if words[i][0].isupper() else article
    return " ".join(words)


def hue_copies(images: list[Image.Image], captions: list[str | None], copies: int) -> Prepared:
    """`copies` hue-rotated copies of each image, turned by 1/(copies+1), 2/(copies+1)... of the circle, each
    captioned without hue words. For a style (a technique, not a palette): taught in one set of colours, an
    identifier binds them, and paints its subjects in them whatever colour a prompt asks for."""
    out, caps = [], []
    for k in range(1, copies + 1):
        out += [rotate_hue(im, k / (copies + 1)) for im in images]
        caps += [without_hue_words(c) if c else c for c in captions]
    return Prepared(out, caps)


def prepare(images: list[Image.Image], captions: list[str | None] | None, *, crop: str = "center",
            split_oversized: bool = False, flip: bool = False, hue_copy_count: int = 0) -> Prepared:
    """Square training images with their captions: tiles (if asked) or one crop per image, then hue-rotated
    copies and mirrored copies (if asked). A tile or a mirror keeps its source's caption; a hue-rotated copy
    keeps it without its hue words."""
    out, caps = [], []
    for img, cap in zip(images, captions or [None] * len(images)):
        pieces = split_tiles(img) if split_oversized else [img]
        for piece in pieces:
            out.append(crop_square(piece, crop if len(pieces) == 1 else "center"))
            caps.append(cap)
    if hue_copy_count:
        rotated = hue_copies(out, caps, hue_copy_count)
        out, caps = out + rotated.images, caps + rotated.captions
    if flip:
        out += [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in out]
        caps += caps
    return Prepared(out, caps)


def fill_template(template: str, *, name: str, category: str, filewords: str | None) -> str:
    """AUTOMATIC1111's template words: [name] the concept's word, [filewords] the image's caption, and
    [category]; an empty [filewords] leaves no stray spaces or commas."""
    text = template.replace("[name]", name).replace("[category]", category).replace("[filewords]", filewords or "")
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,;])", r"\1", text)  # "a , b" -> "a, b"
    text = re.sub(r"([,;])(\s*[,;])+", r"\1", text)  # ", ," -> ","
    return text.strip(" ,;")
