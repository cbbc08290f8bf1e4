"""multi-dist: distributed pretraining and finetuning of MuLTI video-and-language models."""

__version__ = "0.1.0"
