"""Streaming video-text data: shards -> decoded, sampled, resized uint8 frames and tokens.

Names are imported lazily so that light users (the model needs only ``text.resolve_pretrained``)
do not pull in webdataset and the video decoders.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "CorpusConfig": "pipeline",
    "DataConfig": "pipeline",
    "VideoTextStream": "pipeline",
    "list_shards": "shardlist",
    "shard_sizes": "shardlist",
    "load_tokenizer": "text",
    "resolve_pretrained": "text",
    "frames_to_uint8": "transforms",
    "normalize_frames": "transforms",
    "decode_image": "images",
    "DecodeError": "video",
    "decode_frames": "video",
    "probe": "video",
    "sample_frames": "video",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
