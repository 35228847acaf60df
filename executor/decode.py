"""Images out of docarray documents: bytes or a tensor, checked against the service's limits; never a URL."""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from big.config import Limits
from big.errors import BadRequest



def decode_image(doc: Any, index: int, limits: Limits) -> Image.Image:
    """An RGB PIL image from an ImageDoc-like document (bytes_, blob, tensor); never a URL."""
    data = getattr(doc, "bytes_", None) or getattr(doc, "blob", None)
    tensor = getattr(doc, "tensor", None)
    if data:
        if len(data) > limits.max_image_bytes:
            raise BadRequest(f"image {index}: {len(data) / 2**20:.1f} MiB; at most {limits.max_image_bytes / 2**20:g} MiB")
        img = _decode_bytes(data, index, limits)
    elif tensor is not None:
        arr = np.asarray(tensor)
        if arr.ndim != 3:
            raise BadRequest(f"image {index}: tensor must be HxWxC or CxHxW")
        if arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = np.transpose(arr, (1, 2, 0))
        _check_pixels(arr.shape[1], arr.shape[0], index, limits)
        if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
            raise BadRequest(f"image {index}: the tensor must hold finite numbers")
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


def _decode_bytes(data: bytes, index: int, limits: Limits) -> Image.Image:
    """Decoded only after its header's size passed the pixel limit: a small file can declare a huge image (a
    'decompression bomb'), which PIL itself refuses only far above ours and with its own error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit follows
            with Image.open(io.BytesIO(data)) as im:
                _check_pixels(im.width, im.height, index, limits)
                im.load()
                return im.convert("RGB")
    except BadRequest:
        raise
    except Image.DecompressionBombError:
        # PIL read the header, found it far beyond its own limit, and stopped before we saw the size.
        raise BadRequest(f"image {index}: its header declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels (a "
                         f"decompression bomb); at most {limits.max_image_pixels}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadRequest(f"image {index}: not a readable image ({type(e).__name__})") from None


def _check_pixels(width: int, height: int, index: int, limits: Limits) -> None:
    if width * height > limits.max_image_pixels:
        raise BadRequest(f"image {index}: {width}x{height} is {width * height} pixels; at most "
                         f"{limits.max_image_pixels}")


def decode_instance_images(docs, limits: Limits) -> list[Image.Image]:
    n = len(docs) if docs is not None else 0
    if n < limits.min_images:
        raise BadRequest("no instance images: send 3-10 images of your object or style as documents")
    if n > limits.max_images:
        raise BadRequest(f"too many images ({n}); at most {limits.max_images}")
    return [decode_image(d, i, limits) for i, d in enumerate(docs)]
