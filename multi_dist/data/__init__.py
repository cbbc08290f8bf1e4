"""Streaming video-text data: shards -> decoded, sampled, normalised frames and tokens."""

from .pipeline import DataConfig, VideoTextStream
from .shardlist import list_shards, shard_sizes
from .text import load_tokenizer, resolve_pretrained
from .transforms import frames_to_tensor
from .video import DecodeError, decode_frames, probe, sample_frames

__all__ = [
    "DataConfig",
    "DecodeError",
    "VideoTextStream",
    "decode_frames",
    "frames_to_tensor",
    "list_shards",
    "load_tokenizer",
    "probe",
    "resolve_pretrained",
    "sample_frames",
    "shard_sizes",
]
