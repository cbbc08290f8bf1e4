"""Video decoding from bytes and frame sampling.

decord is the fast path (it seeks to key frames and decodes only what the sampled indices
need); PyAV is the fallback where decord has no wheel (e.g. arm64) and the builder's validator.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

try:  # decord has x86_64 wheels only
    import decord

    decord.bridge.set_bridge("native")
    HAVE_DECORD = True
except ImportError:  # pragma: no cover - exercised on platforms without decord wheels
    decord = None
    HAVE_DECORD = False

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
FrameSampling = Literal["uniform", "random", "headtail"]
Backend = Literal["auto", "decord", "pyav"]


class DecodeError(RuntimeError):
    """Bytes that do not decode to at least one video frame."""


@dataclass
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


def sample_frames(
    num_total: int, num_frames: int, strategy: FrameSampling, rng: random.Random | None = None
) -> list[int]:
    """Indices of ``num_frames`` frames out of ``num_total``, sorted (repeats when too short).

    - ``uniform``: the middle frame of each of ``num_frames`` equal segments (deterministic).
    - ``random``: one random frame inside each segment (TSN-style, for training).
    - ``headtail``: half the frames at random from the first half of the clip and half from the
      second, so that "what happens first / then" is always covered.
    """
    if num_total <= 0:
        raise ValueError("a video with no frames cannot be sampled")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if strategy == "uniform":
        return [min(num_total - 1, int((i + 0.5) * num_total / num_frames)) for i in range(num_frames)]
    rng = rng or random.Random(0)
    if strategy == "random":
        out = []
        for i in range(num_frames):
            lo = int(i * num_total / num_frames)
            hi = max(lo, int((i + 1) * num_total / num_frames) - 1)
            out.append(rng.randint(lo, min(hi, num_total - 1)))
        return out
    if strategy == "headtail":
        half = num_total // 2
        head_n = num_frames // 2
        tail_n = num_frames - head_n
        head = _pick(0, max(half, 1), head_n, rng)
        tail = _pick(min(half, num_total - 1), num_total, tail_n, rng)
        return sorted(head + tail)
    raise ValueError(f"unknown frame sampling strategy {strategy!r}")


def _pick(lo: int, hi: int, n: int, rng: random.Random) -> list[int]:
    """``n`` sorted indices in [lo, hi): distinct where the range allows, else with repeats."""
    span = list(range(lo, hi))
    if n <= len(span):
        return sorted(rng.sample(span, n))
    return sorted(rng.choice(span) for _ in range(n))


def _decord_reader(data: bytes, width: int, height: int):
    return decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1, width=width, height=height)


def decode_frames(
    data: bytes,
    num_frames: int,
    strategy: FrameSampling = "uniform",
    rng: random.Random | None = None,
    backend: Backend = "auto",
    resize_to: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode ``num_frames`` sampled frames from encoded video bytes: uint8 ``(T, H, W, 3)``.

    ``resize_to=(width, height)`` lets decord scale while decoding (much cheaper than
    decoding 720p and resizing afterwards); PyAV ignores it.
    Raises :class:`DecodeError` on anything that is not a decodable video.
    """
    if not data:
        raise DecodeError("empty video bytes")
    use_decord = backend == "decord" or (backend == "auto" and HAVE_DECORD)
    if backend == "decord" and not HAVE_DECORD:
        raise DecodeError("backend 'decord' requested but decord is not installed")
    try:
        if use_decord:
            if resize_to is not None:
                try:
                    return _decode_decord(data, num_frames, strategy, rng, resize_to)
                except Exception:
                    # decord's scaler fails on some size pairs (e.g. 64x64 -> 48x48 raises a
                    # size-mismatch check); decoding at native size still works
                    pass
            return _decode_decord(data, num_frames, strategy, rng, None)
        return _decode_pyav(data, num_frames, strategy, rng)
    except DecodeError:
        raise
    except Exception as err:  # decord raises DECORDError / RuntimeError; PyAV raises av.FFmpegError
        raise DecodeError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err


def _decode_decord(
    data: bytes, num_frames: int, strategy: FrameSampling, rng: random.Random | None, size: tuple[int, int] | None
) -> np.ndarray:
    width, height = size or (-1, -1)
    vr = _decord_reader(data, width, height)
    total = len(vr)
    if total <= 0:
        raise DecodeError("no video frames")
    idx = sample_frames(total, num_frames, strategy, rng)
    frames = vr.get_batch(idx).asnumpy()
    vr.seek(0)  # releases decord's cached decoder buffers (it leaks on long videos otherwise)
    del vr
    if size is not None and frames.shape[1:3] != (height, width):
        raise DecodeError(f"decord returned {frames.shape[1:3]} frames, asked for {(height, width)}")
    return frames


def _decode_wanted(container: Any, wanted: list[int]) -> tuple[dict[int, np.ndarray], int, Any]:
    """Decode up to the last wanted frame, converting the wanted ones only; returns them, and the
    index and (unconverted) frame of the last decoded."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    picked: dict[int, np.ndarray] = {}
    last = None
    for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
            picked[i] = frame.to_ndarray(format="rgb24")
        last = (i, frame)
        if i >= wanted[-1]:
            break
    if last is None:
        raise DecodeError("no video frames")
    return picked, *last


def _decode_pyav(data: bytes, num_frames: int, strategy: FrameSampling, rng: random.Random | None) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise DecodeError("no video stream")
        total = container.streams.video[0].frames
        if total > 0:
            wanted = sample_frames(total, num_frames, strategy, rng)
            picked, last, _ = _decode_wanted(container, wanted)
            # containers may overstate their frame count: fall back to the last decoded frame
            out = [picked.get(i, picked.get(last)) for i in wanted]
            if any(f is None for f in out):
                return _decode_pyav_all(data, num_frames, strategy, rng)
            return np.stack(out)
    return _decode_pyav_all(data, num_frames, strategy, rng)


def _decode_pyav_all(data: bytes, num_frames: int, strategy: FrameSampling, rng: random.Random | None) -> np.ndarray:
    """Containers that do not state a frame count (mkv, webm) or overstate it: count the video
    packets (demuxing, no decoding), then decode once, converting only the sampled frames (a
    minute of 1080p held as RGB is gigabytes)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        total = sum(1 for packet in container.demux(video=0) if packet.size)
    if total == 0:
        raise DecodeError("no video frames")
    wanted = sample_frames(total, num_frames, strategy, rng)
    with av.open(io.BytesIO(data)) as container:
        picked, last, frame = _decode_wanted(container, wanted)
        if last not in picked:  # fewer frames than packets: the last one stands in for the rest
            picked[last] = frame.to_ndarray(format="rgb24")
    return np.stack([picked.get(i, picked[last]) for i in wanted])


def probe(data: bytes, full_decode: bool = True) -> VideoInfo:
    """Open and (by default) decode every frame with PyAV: the builder's validator.

    A truncated file often opens and states a frame count, then fails part-way: only a full
    decode proves the bytes are whole. Raises :class:`DecodeError` when they are not.
    """
    import av

    if not data:
        raise DecodeError("empty file")
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise DecodeError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            width, height = stream.codec_context.width, stream.codec_context.height
            count = declared = stream.frames
            if full_decode:
                count = 0
                for _ in container.decode(stream):
                    count += 1
                if declared > 0 and count < declared:
                    raise DecodeError(f"truncated: decoded {count} of {declared} frames")
    except DecodeError:
        raise
    except Exception as err:
        raise DecodeError(f"{type(err).__name__}: {err}") from err
    if count <= 0:
        raise DecodeError("no decodable video frames")
    return VideoInfo(num_frames=count, fps=fps, width=width, height=height)
