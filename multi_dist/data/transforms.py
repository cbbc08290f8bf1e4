"""Frame transforms: square crop and resize in uint8, on the crop only; normalisation (on the
training device); fitting clips (and images, clips of one frame) to a batch's frame count with a frame mask."""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Crop = Literal["center", "random"]
ImageFrames = Literal["pad", "repeat"]
"""How an image (or any clip shorter than the batch) fills the batch's frames: see :func:`fit_frames`."""


def decode_size(width: int, height: int, size: int) -> tuple[int, int] | None:
    """(width, height) to decode at, with the shorter side scaled to ``size``; None (decode at
    native size) unless the video is at least 1.5x larger, where scaling while decoding pays."""
    short = min(width, height)
    if short < 1.5 * size:
        return None
    scale = size / short
    return max(size, round(width * scale)), max(size, round(height * scale))


def frames_to_uint8(
    frames: np.ndarray, size: int, crop: Crop = "center", rng: random.Random | None = None
) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> uint8 ``(T, 3, size, size)``.

    Equivalent to "resize the shorter side to ``size``, then crop a square": the square is cut
    at source resolution first, so only the pixels that survive are resized (torch's uint8
    bilinear kernels, antialiased when shrinking). The same crop is used for every frame of a clip.
    Frames stay uint8 until the training device normalises them (:func:`normalize_frames`, done by
    the model): a quarter of float32's bytes through the loader's shared memory, the pinned copy
    and the host-to-device copy, and no float work in the data workers.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (T, H, W, 3), got {frames.shape}")
    if frames.dtype != np.uint8:  # a caller's mistake, not a bad sample: not a ValueError
        raise TypeError(f"expected uint8 frames, got {frames.dtype}")
    _, h, w, _ = frames.shape
    side = min(h, w)
    if crop == "random":
        rng = rng or random.Random(0)
        y0, x0 = rng.randint(0, h - side), rng.randint(0, w - side)
    else:
        y0, x0 = (h - side) // 2, (w - side) // 2
    # channels-first view of channels-last memory: the layout torch's fast uint8 resize reads
    x = torch.from_numpy(frames[:, y0 : y0 + side, x0 : x0 + side]).permute(0, 3, 1, 2)
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=side > size, align_corners=False)
    return x.contiguous()


def pixel_affine(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)``, float32 ``(3, 1, 1)``: ``pixel * scale + shift == (pixel / 255 - mean) / std``."""
    std_t = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    scale = 1.0 / (255.0 * std_t)
    shift = -torch.tensor(mean, dtype=torch.float64).view(3, 1, 1) / std_t
    return scale.to(device, torch.float32), shift.to(device, torch.float32)


def normalize_frames(
    video: torch.Tensor, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> torch.Tensor:
    """uint8 frames ``(..., 3, H, W)`` -> float32 ``(pixel / 255 - mean) / std`` per channel."""
    scale, shift = pixel_affine(mean, std, video.device)
    return torch.addcmul(shift, video, scale)


def fit_frames(video: torch.Tensor, frames: int, fill: ImageFrames = "pad") -> tuple[torch.Tensor, torch.Tensor]:
    """A clip of ``t <= frames`` frames ``(t, 3, S, S)`` -> ``(frames, 3, S, S)`` and its frame mask
    ``(frames,)`` (True for real frames), so that clips of different lengths (an image is a clip
    of one frame) batch together.

    - ``pad``: zero frames after the real ones, masked: the model ignores them, so the clip's
      output is the same at any batch frame count.
    - ``repeat``: the frames stretched over the length, every one real (an image becomes a still
      clip; the model sees ``frames`` frames of it).
    """
    t = video.shape[0]
    if not 0 < t <= frames:
        raise ValueError(f"cannot fit a clip of {t} frames into {frames}")
    if t == frames:
        return video, torch.ones(frames, dtype=torch.bool)
    if fill == "repeat":
        return video[torch.arange(frames) * t // frames], torch.ones(frames, dtype=torch.bool)
    if fill != "pad":
        raise ValueError(f"unknown frame fill {fill!r} (pad or repeat)")
    out = video.new_zeros((frames, *video.shape[1:]))
    out[:t] = video
    mask = torch.zeros(frames, dtype=torch.bool)
    mask[:t] = True
    return out, mask
