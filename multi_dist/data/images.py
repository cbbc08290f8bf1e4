"""Image decoding for image-text corpora (img2dataset's layout: ``jpg``/``png``/``webp`` + ``txt`` +
``json``): an image is read as a clip of one frame, so that it batches with videos.

Pillow decodes; JPEGs are decoded at a reduced scale when they are much larger than the frame
size the model needs (``draft``: the DCT is scaled while decoding, the image equivalent of
decord's scaling while decoding video).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .video import DecodeError

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Members read as images (img2dataset writes ``jpg`` by default, ``png`` or ``webp`` when told)."""
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
"""Pillow formats stored as they are (other formats are re-encoded by the shard builder)."""


@dataclass
class ImageInfo:
    format: str  # Pillow's name: JPEG, PNG, WEBP, GIF, ...
    width: int
    height: int


def _open(data: bytes) -> Image.Image:
    from PIL import Image

    if not data:
        raise DecodeError("empty image bytes")
    try:
        return Image.open(io.BytesIO(data))
    except Exception as err:  # UnidentifiedImageError, DecompressionBombError, ...
        raise DecodeError(f"{type(err).__name__}: {err}") from err


def decode_image(data: bytes, min_side: int | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 ``(1, H, W, 3)`` RGB: a one-frame clip.

    ``min_side``: the frame size the pipeline crops to; a JPEG at least twice as large is decoded
    at the largest power-of-two reduction whose sides stay at or above it (the result is then
    resized like any frame). Raises :class:`DecodeError` on anything that is not a whole image
    (a truncated JPEG fails here, as it does in the builder's validation).
    """
    img = _open(data)
    try:
        if min_side is not None and img.format == "JPEG":
            img.draft("RGB", (min_side, min_side))
        img = img.convert("RGB")  # palette, grey, CMYK and alpha images alike become RGB
        frame = np.array(img, dtype=np.uint8)  # a writable copy (torch refuses to wrap read-only arrays)
    except Exception as err:  # OSError("image file is truncated"), SyntaxError on broken PNG chunks
        raise DecodeError(f"{type(err).__name__}: {err}") from err
    if frame.ndim != 3 or frame.shape[0] == 0 or frame.shape[1] == 0:
        raise DecodeError(f"decoded to an empty image {frame.shape}")
    return frame[None]


def probe_image(data: bytes) -> ImageInfo:
    """Open and fully decode an image: the shard builder's validator. Raises :class:`DecodeError`."""
    img = _open(data)
    try:
        img.load()  # a full decode: headers alone do not prove the pixels are whole
    except Exception as err:
        raise DecodeError(f"{type(err).__name__}: {err}") from err
    if img.width <= 0 or img.height <= 0:
        raise DecodeError(f"empty image {img.width}x{img.height}")
    return ImageInfo(format=str(img.format), width=img.width, height=img.height)
