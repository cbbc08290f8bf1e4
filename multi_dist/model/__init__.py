"""The MuLTI model: encoders with the attention-based adapter, Text-Guided MultiWay-Sampler,
MultiWay fusion and heads."""

from .encoders import Adapter, AdapterConfig, EncoderConfig, TextEncoder, VideoEncoder
from .fusion import AdaptPooling, FusionConfig, MultiWayLayer, SamplerLayer
from .multi import FusionOutput, HeadsConfig, ModelConfig, MuLTI, TextOutput, VideoOutput, model_config
from .presets import PRESETS

__all__ = [
    "PRESETS",
    "AdaptPooling",
    "Adapter",
    "AdapterConfig",
    "EncoderConfig",
    "FusionConfig",
    "FusionOutput",
    "HeadsConfig",
    "ModelConfig",
    "MuLTI",
    "MultiWayLayer",
    "SamplerLayer",
    "TextEncoder",
    "TextOutput",
    "VideoEncoder",
    "VideoOutput",
    "model_config",
]
