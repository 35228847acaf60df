"""Images out of docarray documents: bytes or a tensor, checked against the service's limits; never a URL."""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from big.config import Limits
from big.errors import BadRequest

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096


def decode_image(doc: Any, index: int, limits: Limits) -> Image.Image:
    """An RGB PIL image from an ImageDoc-like document (bytes_, blob, tensor); never a URL."""
    data = getattr(doc, "bytes_", None) or getattr(doc, "blob", None)
    tensor = getattr(doc, "tensor", None)
    if data:
        if len(data) > MAX_IMAGE_BYTES:
            raise BadRequest(f"image {index}: larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB")
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise BadRequest(f"image {index}: more than {MAX_IMAGE_PIXELS} pixels")
                im.load()
                img = im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise BadRequest(f"image {index}: not a readable image ({type(e).__name__})") from None
    elif tensor is not None:
        arr = np.asarray(tensor)
        if arr.ndim != 3:
            raise BadRequest(f"image {index}: tensor must be HxWxC or CxHxW")
        if arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = np.transpose(arr, (1, 2, 0))
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        img = Image.fromarray(arr[..., :3], "RGB")
    elif getattr(doc, "url", None) or getattr(doc, "uri", None):
        raise BadRequest(f"image {index}: send the image bytes; remote URLs are not fetched")
    else:
        raise BadRequest(f"image {index}: no image data (set `bytes_` or `tensor`)")
    if min(img.size) < limits.min_image_side:
        raise BadRequest(f"image {index}: {img.width}x{img.height} is below the minimum side of "
                         f"{limits.min_image_side} px")
    return img


def decode_instance_images(docs, limits: Limits) -> list[Image.Image]:
    n = len(docs) if docs is not None else 0
    if n < limits.min_images:
        raise BadRequest("no instance images: send 3-10 images of your object or style as documents")
    if n > limits.max_images:
        raise BadRequest(f"too many images ({n}); at most {limits.max_images}")
    return [decode_image(d, i, limits) for i, d in enumerate(docs)]
