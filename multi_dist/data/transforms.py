"""Frame transforms: square crop, resize, normalise, done in one pass on the crop only."""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Crop = Literal["center", "random"]


def decode_size(width: int, height: int, size: int) -> tuple[int, int] | None:
    """(width, height) to decode at, with the shorter side scaled to ``size``; None (decode at
    native size) unless the video is at least 1.5x larger, where scaling while decoding pays."""
    short = min(width, height)
    if short < 1.5 * size:
        return None
    scale = size / short
    return max(size, round(width * scale)), max(size, round(height * scale))


def frames_to_tensor(
    frames: np.ndarray,
    size: int,
    crop: Crop = "center",
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> normalised float32 ``(T, 3, size, size)``.

    Equivalent to "resize the shorter side to ``size``, then crop a square": the square is cut
    at source resolution first, so only the pixels that survive are resized. The same crop is
    used for every frame of a clip.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (T, H, W, 3), got {frames.shape}")
    _, h, w, _ = frames.shape
    side = min(h, w)
    if crop == "random":
        rng = rng or random.Random(0)
        y0, x0 = rng.randint(0, h - side), rng.randint(0, w - side)
    else:
        y0, x0 = (h - side) // 2, (w - side) // 2
    view = torch.from_numpy(frames[:, y0 : y0 + side, x0 : x0 + side]).permute(0, 3, 1, 2)
    x = torch.empty(view.shape, dtype=torch.float32)
    x.copy_(view)  # one pass: crop, channels-first and uint8 -> float together
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=side > size, align_corners=False)
    scale = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
    shift = -torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1)
    return x.mul_(scale).add_(shift)
