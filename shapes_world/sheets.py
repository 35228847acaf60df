"""Contact sheets (captioned PNG grids) and animated GIFs: how people look at results."""
from __future__ import annotations

import textwrap
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont


def _font(size: int = 10):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def contact_sheet(images: Sequence[Image.Image], captions: Sequence[str] | None = None, *, columns: int = 8,
                  cell: int = 96, title: str | None = None, caption_lines: int = 3) -> Image.Image:
    """A grid of images, each upscaled to `cell` px (nearest, so pixels stay honest) and captioned."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    captions = list(captions) if captions is not None else [""] * len(images)
    font = _font(10)
    line_h = 12
    chars = max(8, cell // 6)
    cap_h = line_h * caption_lines + 4
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    title_h = 18 if title else 0
    sheet = Image.new("RGB", (columns * (cell + 4) + 4, title_h + rows * (cell + cap_h + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 3), title, fill="black", font=font)
    for i, (img, cap) in enumerate(zip(images, captions)):
        r, c = divmod(i, columns)
        x, y = 4 + c * (cell + 4), title_h + 4 + r * (cell + cap_h + 4)
        sheet.paste(img.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        lines = textwrap.wrap(cap, chars)[:caption_lines]
        for k, line in enumerate(lines):
            draw.text((x, y + cell + 2 + k * line_h), line, fill="black", font=font)
    return sheet


def labelled_frame(img: Image.Image, label: str, size: int = 192) -> Image.Image:
    frame = Image.new("RGB", (size, size + 16), "white")
    frame.paste(img.convert("RGB").resize((size, size), Image.Resampling.NEAREST), (0, 16))
    ImageDraw.Draw(frame).text((3, 2), label, fill="black", font=_font(11))
    return frame


def animated_gif(frames: Sequence[Image.Image], labels: Sequence[str], path, *, duration_ms: int = 250,
                 size: int = 192) -> None:
    """An animated GIF with each frame's label (e.g. "guidance 7.5") written on it."""
    if not frames:
        raise ValueError("animated_gif needs at least one frame")
    out = [labelled_frame(f, l, size) for f, l in zip(frames, labels)]
    out[0].save(path, save_all=True, append_images=out[1:], duration=duration_ms, loop=0)
