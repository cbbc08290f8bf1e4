"""Typed, strict configuration: dataclasses + sparse YAML files + ``a.b=c`` overrides.

Three layers, applied in order: the dataclass defaults, a YAML file that names only what it
changes, then command-line overrides such as ``data.batch_size=8``. A section may be given as
the path of a YAML file that holds it (``data: configs/data/webvid_cc3m.yaml`` in a file, or
``data=configs/data/webvid.yaml`` on the command line); later keys of that section
(``data.batch_size=8``) apply on top of the file's. Every key is checked
against the dataclass it lands in, so a typo fails at start-up with the dotted name of the key
(and a close match when there is one) instead of being silently ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

log = logging.getLogger(__name__)

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the typed config; the message names the key.
    ``key``: the dotted key (or the section, for a check of several of its keys) it is about, so
    that the error can be laid at the door of the override that set it or of the config file;
    ``plain``: the message before it named a section's file; ``check``: a check of the section
    ``key`` as a whole (several of its keys together)."""

    def __init__(self, message: str, key: str | None = None, plain: str | None = None, check: bool = False) -> None:
        super().__init__(message)
        self.key, self.plain, self.check = key, plain or message, check


_BAD_INPUT = (ValueError, ConfigError, FileNotFoundError)
"""What start-up checks raise, exactly these: a subclass (a JSON or codec error) is a defect."""

_AT_START_UP = "_multi_dist_start_up"


@contextlib.contextmanager
def start_up() -> Iterator[None]:
    """Around start-up work (config, inputs, checks): marks an error that describes bad input as a
    start-up error, whose message names the key or the file and is all there is to say. The error
    keeps its type (callers may catch a ``ConfigError``); any other error passes unmarked."""
    try:
        yield
    except _BAD_INPUT as err:
        if type(err) in _BAD_INPUT:
            setattr(err, _AT_START_UP, True)
        raise


def is_start_up_error(err: BaseException) -> bool:
    return getattr(err, _AT_START_UP, False)


@contextlib.contextmanager
def exit_on_startup_error() -> Iterator[None]:
    """Around a command: an error marked by :func:`start_up` exits with ``error: MESSAGE`` (status
    1) and no traceback; errors after start-up keep theirs."""
    try:
        yield
    except _BAD_INPUT as err:
        if not is_start_up_error(err):
            raise
        sys.exit(f"error: {err}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where lossless (int -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if is_section_file(value):  # (a list's item; a field's file is read by _from_dict)
            section = read_section(value, key)
            try:
                return _from_dict(tp, section, key)
            except ConfigError as err:
                raise _in_file(err, section.origin, key) from err
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping for {tp.__name__} or a YAML file holding one, got {value!r}", key=key
            )
        return _from_dict(tp, value, key)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: may not be null (expected {_type_name(tp)})", key=key)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}", key=key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}", key=key)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}", key=key)
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}", key=key)
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", key=key)
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}", key=key)
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # (NaN: no setting)
            raise ConfigError(f"{key}: expected a number, got {value!r}", key=key)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}", key=key)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}", key=key)
        return value
    raise ConfigError(f"{key}: unsupported config type {tp}", key=key)


def _unknown_key(cls: type, name: str, key: str) -> ConfigError:
    fields = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
    return ConfigError(f"unknown config key '{key}'{hint}", key=key)


def _takes_section(tp: Any) -> bool:
    """A field typed as a config dataclass (or one of them or null)."""
    if get_origin(tp) in (Union, types.UnionType):
        return any(_takes_section(a) for a in get_args(tp))
    return dataclasses.is_dataclass(tp)


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    # sections given as files are read first, so that a preset (below) fills what they leave out
    # as it does for a section written inline; errors in them name the file
    data = {
        name: read_section(value, f"{prefix}.{name}" if prefix else name)
        if is_section_file(value) and _takes_section(hints.get(name))
        else value
        for name, value in data.items()
    }
    origins = {name: value.origin for name, value in data.items() if isinstance(value, Section)}
    expand = getattr(cls, "expand_preset", None)
    if expand is not None:  # a named preset fills the fields the data does not give
        try:
            data = expand(data)
        except ValueError as err:
            raise ConfigError(f"{prefix}.{err}" if prefix else str(err), key=prefix, check=True) from err
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in known:
            # a former key (``MOVED = {name: (where it lives now, its old default)}``): the old
            # default, as every saved config holds it, is dropped; another value must be moved
            moved = getattr(cls, "MOVED", {}).get(name)
            if moved is not None and value == moved[1]:
                log.warning("config key '%s' is no longer used (its default is dropped): %s", key, moved[0])
                continue
            if moved is not None:
                raise ConfigError(f"config key '{key}' has moved: {moved[0]}", key=key)
            raise _unknown_key(cls, str(name), key)
        try:
            kwargs[name] = _coerce(value, hints[name], key)
        except ConfigError as err:
            if name in origins:
                raise _in_file(err, origins[name], key) from err
            raise
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{prefix or cls.__name__}: {err}", key=prefix, check=True) from err
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as err:
            where = f"{prefix}." if prefix else ""
            raise ConfigError(f"{where}{err}", key=prefix, check=True) from err
    return obj


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build ``cls`` from a nested dict, failing on any unknown key or ill-typed value."""
    return _from_dict(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts and lists (YAML- and JSON-serialisable)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _YAMLLoader(yaml.SafeLoader):
    """YAML as configs need it: ``1e-4`` is a number (YAML 1.1 reads an exponent without a dot
    as a string, which reached free-form fields such as ``model.text.arch`` as one), and a key
    given twice in one mapping is refused (the second silently replaced the first, e.g. a second
    ``optim:`` section dropping the first one's keys)."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in lines:
            raise ConfigError(f"key '{key}' appears twice (lines {lines[key]} and {line})")
        lines[key] = line
    return loader.construct_mapping(node, deep)


_YAMLLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(text: str) -> Any:
    """``text`` read as a config's YAML (:class:`_YAMLLoader`)."""
    return yaml.load(text, Loader=_YAMLLoader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (['a', 'b'], c) with ``c`` read as YAML (so 3, 1e-4, true, [1, 2] work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. data.batch_size=8)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, ConfigError) as err:
        raise ConfigError(f"override '{text}': value is not valid YAML: {err}") from err
    return key.split("."), value


def is_section_file(value: Any) -> bool:
    """A section given as the path of a YAML file that holds it (``data: configs/data/webvid.yaml``)."""
    return isinstance(value, str) and value.endswith((".yaml", ".yml"))


class Section(dict):
    """A section's mapping as read from a YAML file (``origin``), for its errors to name the file."""

    origin: str


def read_section(path: str, key: str) -> Section:
    """The mapping in the YAML file ``path``, given for the section ``key``. Relative paths are
    read from the directory you launched from, as every path in a config is."""
    try:
        section = Section(load_yaml(path))
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}", key=key) from err
    section.origin = path
    return section


def _in_file(err: ConfigError, origin: str, key: str) -> ConfigError:
    """``err``, found in the section ``key`` that the file ``origin`` holds, naming that file."""
    return ConfigError(f"{err} (in {origin}, given for '{key}')", key=err.key, plain=err.plain, check=err.check)


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if is_section_file(child):  # ``data.batch_size=8`` after ``data: FILE``: FILE's keys, then this one
            child = node[part] = read_section(child, ".".join(path[: i + 1]))
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins, nested mappings merge key by key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Defaults of ``cls``, then the YAML file at ``path``, then ``a.b=c`` overrides."""
    data: dict[str, Any] = load_yaml(path) if path is not None else {}
    parsed = [parse_override(text) for text in overrides]
    try:
        for keys, value in parsed:
            _set_path(data, keys, value)  # (reads a section's file that a key goes into)
        return from_dict(cls, data)
    except ConfigError as err:
        if path is None:  # the command line alone
            raise

        # where the key came from: an override of it, else the file
        given = _blamed(err, [(text, ".".join(keys)) for text, (keys, _) in zip(overrides, parsed)])
        if given is not None:
            text, own = given  # own: it set the key itself, not the file that held it
            raise ConfigError(f"{err.plain if own else err} (given on the command line: {text})", key=err.key) from err
        raise ConfigError(f"{err} (from {path})", key=err.key) from err


def _blamed(err: ConfigError, overrides: list[tuple[str, str]]) -> tuple[str, bool] | None:
    """The override (its text, and whether it set the failing key itself) that ``err`` is about:
    - a key's error: the last override of that key or of a section holding it (a file it named),
      else one inside it (a typo in ``dataa.num_frames=4`` makes an unknown section 'dataa');
    - a section's check of several keys: the last override inside the section, or of it;
    - a check of the whole config: an override whose key the message names."""
    key = err.key
    if not key:
        named = [(t, True) for t, k in overrides if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w.])", str(err))]
        return named[-1] if named else None
    holding = [(t, k == key) for t, k in overrides if k == key or key.startswith(k + ".")]
    inside = [(t, True) for t, k in overrides if k.startswith(key + ".")]
    if err.check:
        return (inside or holding or [None])[-1]
    return (holding or inside or [None])[-1]


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (what a run folder keeps)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
