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


def captioned_sheet(cells: Sequence[tuple[Image.Image, str]], **kw) -> Image.Image:
    """A contact sheet of (image, caption) pairs, as benchmarks collect them."""
    return contact_sheet([im for im, _ in cells], [c for _, c in cells], **kw)


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
    out[0].save(path, format="GIF", save_all=True, append_images=out[1:], duration=duration_ms, loop=0)


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127)]


def line_chart(series: dict, x_labels: Sequence[str], *, title: str = "", y_label: str = "",
               width: int = 560, height: int = 320, y_range: tuple[float, float] = (0.0, 1.0)) -> Image.Image:
    """A small line chart (values may be None where a series has no point yet)."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font = _font(11)
    left, right, top, bottom = 44, width - 150, 24, height - 34
    d.text((left, 4), title, fill="black", font=font)
    d.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    lo, hi = y_range
    for k in range(6):
        v = lo + (hi - lo) * k / 5
        y = bottom - (bottom - top) * k / 5
        d.line([(left - 3, y), (right, y)], fill=(225, 225, 225))
        d.text((4, y - 6), f"{v:.1f}", fill="black", font=font)
    n = max(1, len(x_labels) - 1)
    xs = [left + (right - left) * i / n for i in range(len(x_labels))]
    for x, lab in zip(xs, x_labels):
        d.text((x - 12, bottom + 6), str(lab)[:14], fill="black", font=font)
    if y_label:
        d.text((left + 4, top + 2), y_label, fill=(90, 90, 90), font=font)
    for i, (name, values) in enumerate(series.items()):
        colour = _PALETTE[i % len(_PALETTE)]
        pts = [(xs[j], bottom - (bottom - top) * (v - lo) / (hi - lo)) for j, v in enumerate(values) if v is not None]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.text((right + 10, top + 14 * i), name[:22], fill=colour, font=font)
    return img
