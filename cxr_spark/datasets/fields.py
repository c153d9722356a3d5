"""Petastorm pieces shared by the image datasets: a scalar field, a column encoded or decoded with its
field's codec (what Petastorm stores in Parquet, and back), and writing a dataset with its metadata.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from petastorm.codecs import ScalarCodec
from petastorm.etl.dataset_metadata import materialize_dataset
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


#: The session's Hadoop settings petastorm 0.13.1's ``materialize_dataset`` changes while a dataset is written.
PETASTORM_HADOOP_KEYS = ("parquet.summary.metadata.level", "parquet.enable.summary-metadata",
                         "parquet.summary.metadata.propagate-errors", "parquet.block.size.row.check.min",
                         "parquet.row-group.size.row.check.min", "parquet.block.size")


@contextmanager
def petastorm_dataset(spark, url: str, schema: Unischema, row_group_size_mb: int):
    """Write a Petastorm dataset at ``url`` inside the block (``materialize_dataset``), and give the session
    back its Hadoop settings however the block ends: petastorm restores them only after a write that
    succeeded, so a failed one would leave its row-group size in every later job of the session."""
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    saved = {key: conf.get(key) for key in PETASTORM_HADOOP_KEYS}
    try:
        with materialize_dataset(spark, url, schema, row_group_size_mb):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                conf.unset(key)
            else:
                conf.set(key, value)
