"""Petastorm pieces shared by the image datasets: a scalar field, a column encoded or decoded with its
field's codec (what Petastorm stores in Parquet, and back), and writing a dataset with its metadata.
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
from contextlib import contextmanager

import numpy as np
from petastorm.codecs import ScalarCodec
from petastorm.unischema import Unischema, UnischemaField


def scalar_field(name, numpy_type, spark_type, nullable=False):
    return UnischemaField(name, numpy_type, (), ScalarCodec(spark_type), nullable)


def encode_column(schema: Unischema, name: str, values) -> list:
    """Encode a column of numpy values with the field's codec (what Petastorm stores in Parquet)."""
    field = schema.fields[name]
    return [field.codec.encode(field, np.asarray(v, dtype=field.numpy_dtype)) for v in values]


def decode_column(schema: Unischema, name: str, values) -> list:
    """Decode a column read by Spark or pyarrow back into numpy values."""
    field = schema.fields[name]
    return [field.codec.decode(field, v) for v in values]


#: The session's Hadoop settings a Petastorm dataset is written under (those petastorm 0.13.1's
#: ``materialize_dataset`` sets): no Parquet summary files, row groups of the dataset's size.
PETASTORM_HADOOP_KEYS = ("parquet.summary.metadata.level", "parquet.enable.summary-metadata",
                         "parquet.summary.metadata.propagate-errors", "parquet.block.size.row.check.min",
                         "parquet.row-group.size.row.check.min", "parquet.block.size")


@contextmanager
def petastorm_dataset(spark, url: str, schema: Unischema, row_group_size_mb: int):
    """Write a Petastorm dataset at ``url`` inside the block, then give it Petastorm's metadata: what
    ``materialize_dataset`` writes (the pickled Unischema and the row groups of each file, in
    ``_common_metadata``), with the row groups counted from the files' footers here on the driver, not by
    a Spark task per file (about 50 ms each; docs/benchmarks.md). The session gets its Hadoop settings back however the block
    ends (petastorm restores them only after a write that succeeded)."""
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    saved = {key: conf.get(key) for key in PETASTORM_HADOOP_KEYS}
    try:
        conf.set("parquet.summary.metadata.level", "NONE")
        conf.setBoolean("parquet.summary.metadata.propagate-errors", True)
        conf.setInt("parquet.block.size.row.check.min", 3)
        conf.setInt("parquet.row-group.size.row.check.min", 3)
        conf.setInt("parquet.block.size", row_group_size_mb * 2**20)
        yield
        write_petastorm_metadata(spark, url, schema)
    finally:
        for key, value in saved.items():
            if value is None:
                conf.unset(key)
            else:
                conf.set(key, value)


def write_petastorm_metadata(spark, url: str, schema: Unischema) -> None:
    """Petastorm's metadata for the Parquet files at ``url``, written as ``materialize_dataset`` writes it (on
    the filesystem it resolves from the session's Hadoop settings and user); fails (PetastormMetadataError)
    unless Petastorm can then list the dataset's row groups."""
    import pyarrow.parquet as pq
    from petastorm.etl.dataset_metadata import ROW_GROUPS_PER_FILE_KEY, UNISCHEMA_KEY, load_row_groups
    from petastorm.fs_utils import FilesystemResolver
    from petastorm.utils import add_to_dataset_metadata

    resolver = FilesystemResolver(url, spark.sparkContext._jsc.hadoopConfiguration(),
                                  user=spark.sparkContext.sparkUser())
    filesystem, path = resolver.filesystem_factory()(), resolver.get_dataset_path()

    def dataset():
        return pq.ParquetDataset(path, filesystem=filesystem, validate_schema=False)

    with warnings.catch_warnings():  # petastorm 0.13.1 works with pyarrow's legacy dataset, which says so
        warnings.simplefilter("ignore", FutureWarning)
        pieces = dataset().pieces
        add_to_dataset_metadata(dataset(), UNISCHEMA_KEY, pickle.dumps(schema))
        counts = {}
        for piece in pieces:  # a footer each: milliseconds on a local disk, a round trip on HDFS
            with filesystem.open(piece.path, "rb") as handle:
                counts[os.path.relpath(piece.path, path)] = pq.ParquetFile(handle).metadata.num_row_groups
        add_to_dataset_metadata(dataset(), ROW_GROUPS_PER_FILE_KEY, json.dumps(counts))
        load_row_groups(dataset())
