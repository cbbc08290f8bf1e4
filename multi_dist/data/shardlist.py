"""Finding a dataset's shards and their sample counts (sizes.json, or per-shard stats)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import braceexpand


def is_url(path: str) -> bool:
    """A remote shard (``s3://...``, ``https://...``) or a ``pipe:`` command, not a local file."""
    return "://" in path or path.startswith("pipe:")


def list_shards(path: str) -> list[str]:
    """The tar shards of a dataset: a local folder (sorted ``*.tar``), a single tar, or a brace
    pattern such as ``data/{00000..00099}.tar`` or ``pipe:aws s3 cp s3://b/{00000..00099}.tar -``.
    """
    if not path:
        raise ValueError("no dataset path given (set data.path to a folder of .tar shards)")
    if "{" in path or is_url(path):
        shards = list(braceexpand.braceexpand(path))
        if not is_url(path):
            shards = [os.path.expanduser(s) for s in shards]  # ~/data/{00000..00009}.tar as ~/data is
            missing = [s for s in shards if not os.path.isfile(s)]
            if missing:
                raise FileNotFoundError(f"{len(missing)} shard(s) of {path} do not exist, e.g. {missing[0]}")
        return shards
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".tar":
        return [str(p)]
    if not p.is_dir():
        raise FileNotFoundError(f"dataset path does not exist: {p}")
    shards = sorted(str(s) for s in p.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {p}")
    return shards


def shard_sizes(shards: list[str]) -> dict[str, int] | None:
    """Samples per shard, from the dataset's ``sizes.json`` or each shard's ``_stats.json``
    (video2dataset's ``successes``); None when neither is there (remote or foreign data)."""
    if not shards or is_url(shards[0]):
        return None
    sizes: dict[str, int] = {}
    loaded: dict[Path, dict] = {}
    for shard in shards:
        p = Path(shard)
        sizes_file = p.parent / "sizes.json"
        if sizes_file not in loaded:
            try:
                loaded[sizes_file] = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
            except json.JSONDecodeError as err:
                raise ValueError(f"{sizes_file}: not valid JSON ({err})") from err
        if p.name in loaded[sizes_file]:
            sizes[shard] = int(loaded[sizes_file][p.name])
            continue
        stats = p.with_name(p.stem + "_stats.json")
        if not stats.is_file():
            return None
        sizes[shard] = int(json.loads(stats.read_text())["successes"])
    return sizes


def parquet_column(path: str | Path, name: str, required: bool = False) -> Iterator[Any]:
    """Column ``name`` of a shard set's parquet file, for the rows the builder wrote (``status``
    ``success``, or every row where there is no status column). A missing column gives None per
    row, or (``required``) an error naming the file and the columns it has."""
    import pyarrow.parquet as pq

    columns = pq.read_schema(path).names
    if name not in columns and required:
        raise ValueError(f"{path}: no {name!r} column (columns: {', '.join(columns)})")
    table = pq.read_table(path, columns=[c for c in (name, "status") if c in columns]).to_pydict()
    rows = pq.read_metadata(path).num_rows
    statuses = table.get("status", ["success"] * rows)
    for value, status in zip(table.get(name, [None] * rows), statuses):
        if status == "success":
            yield value
