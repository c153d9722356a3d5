"""A Petastorm dataset read a whole row group at a time, without Petastorm's reader: the row groups of one
split, the shard a rank reads and one row group's columns decoded with the dataset's own codecs.

The shard is Petastorm's own (tested): the split's row groups in Petastorm's order (files by path, then
row groups), and rank ``r`` of ``n`` takes those whose position ``i`` has ``i % n == r``, so
``make_reader(cur_shard=r, shard_count=n)`` reads the same rows. Row counts come from the Parquet footers,
so a shard's size needs no pass over its rows. Everything here is a plain value or a module-level function,
so a row group can be loaded in another process (the training input's workers).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import pyarrow.parquet as pq

from cxr_spark.datasets.fields import decode_column


@dataclass(frozen=True)
class RowGroup:
    """One row group of a dataset: the data file (a path on the dataset's filesystem) and its index there."""

    path: str
    index: int


@lru_cache(maxsize=8)
def _filesystem(url: str):
    from petastorm.fs_utils import get_filesystem_and_path_or_paths

    return get_filesystem_and_path_or_paths(url)


@lru_cache(maxsize=8)
def stored_schema(url: str):
    """The Unischema a Petastorm dataset stores in its metadata."""
    from petastorm.etl.dataset_metadata import get_schema_from_dataset_url

    with warnings.catch_warnings():  # pyarrow's legacy dataset under petastorm 0.13.1
        warnings.simplefilter("ignore", FutureWarning)
        return get_schema_from_dataset_url(url)


def split_row_groups(url: str, split: str) -> list[RowGroup]:
    """The row groups of ``split`` (a ``split=<name>`` partition), in Petastorm's order."""
    from petastorm.etl.dataset_metadata import load_row_groups

    filesystem, path = _filesystem(url)
    with warnings.catch_warnings():  # petastorm 0.13.1 works with pyarrow's legacy dataset, which says so
        warnings.simplefilter("ignore", FutureWarning)
        dataset = pq.ParquetDataset(path, filesystem=filesystem, validate_schema=False,
                                    filters=[("split", "=", split)])
        return [RowGroup(piece.path, piece.row_group) for piece in load_row_groups(dataset)]


def shard(groups: list[RowGroup], rank: int | None, size: int | None) -> list[RowGroup]:
    """Rank ``rank`` of ``size``'s row groups (all of them when ``rank`` is None).

    >>> [g.index for g in shard([RowGroup("f", i) for i in range(5)], 1, 2)]
    [1, 3]
    """
    if rank is None:
        return list(groups)
    if len(groups) < size:
        raise ValueError(f"{len(groups)} row groups cannot make {size} shards: some ranks would read nothing")
    return [group for position, group in enumerate(groups) if position % size == rank]


def row_counts(url: str, groups: list[RowGroup]) -> list[int]:
    """Rows in each of ``groups``, from the Parquet footers (each file's footer read once)."""
    filesystem, _ = _filesystem(url)
    footers = {}
    for path in sorted({group.path for group in groups}):
        with filesystem.open(path, "rb") as handle:
            footers[path] = pq.ParquetFile(handle).metadata
    return [footers[group.path].row_group(group.index).num_rows for group in groups]


def read_row_group(url: str, group: RowGroup, fields: tuple[str, ...]) -> dict[str, list]:
    """The ``fields`` of one row group, each decoded by its field's codec, as lists in stored row order."""
    filesystem, _ = _filesystem(url)
    with filesystem.open(group.path, "rb") as handle:
        # one thread: an input worker is one core (and the rank's own process, with one worker)
        table = pq.ParquetFile(handle).read_row_group(group.index, columns=list(fields), use_threads=False)
    schema = stored_schema(url)
    return {name: decode_column(schema, name, table.column(name).to_pylist()) for name in fields}
