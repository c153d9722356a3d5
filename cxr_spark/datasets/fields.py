"""Petastorm fields shared by the image datasets: a scalar field, and a column encoded or decoded with its
field's codec (what Petastorm stores in Parquet, and back).
"""
from __future__ import annotations

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
