"""The Petastorm Unischemas of the ``raw`` and ``images_<size>`` datasets, declared once.

Spark schemas (``as_spark_schema()``), numpy rows and TensorFlow types are all derived from these.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from petastorm.codecs import CompressedImageCodec, DataframeColumnCodec, ScalarCodec
from petastorm.unischema import Unischema, UnischemaField
from pyspark.sql import types as T

from cxr_spark.labels import NUM_LABELS


class NativeArrayCodec(DataframeColumnCodec):
    """A 1-D numeric array stored as a native Parquet list, so Spark SQL can read it without decoding.

    Petastorm's own array codecs store opaque ``np.save`` bytes; the labels are small and are
    aggregated by Spark (metrics), so they are kept readable.
    """

    def __init__(self, element_type: T.DataType):
        self._element_type = element_type

    def encode(self, unischema_field, value):
        array = np.asarray(value)
        if array.shape != tuple(unischema_field.shape):
            raise ValueError(f"field {unischema_field.name!r}: expected shape {unischema_field.shape}, "
                             f"got {array.shape}")
        return [int(v) for v in array]

    def decode(self, unischema_field, value):
        return np.asarray(value, dtype=unischema_field.numpy_dtype)

    def spark_dtype(self):
        return T.ArrayType(self._element_type, containsNull=False)


def _scalar(name, numpy_type, spark_type, nullable=False):
    return UnischemaField(name, numpy_type, (), ScalarCodec(spark_type), nullable)


METADATA_FIELDS = [
    _scalar("image_id", np.str_, T.StringType()),
    _scalar("patient_id", np.int32, T.IntegerType()),
    _scalar("follow_up", np.int32, T.IntegerType(), nullable=True),
    _scalar("age", np.int32, T.IntegerType(), nullable=True),
    _scalar("sex", np.str_, T.StringType(), nullable=True),
    _scalar("view", np.str_, T.StringType(), nullable=True),
    _scalar("finding_labels", np.str_, T.StringType(), nullable=True),
    UnischemaField("labels", np.uint8, (NUM_LABELS,), NativeArrayCodec(T.ShortType()), False),
    _scalar("split", np.str_, T.StringType()),
    _scalar("height", np.int32, T.IntegerType()),
    _scalar("width", np.int32, T.IntegerType()),
    _scalar("source_path", np.str_, T.StringType()),
    _scalar("content_sha256", np.str_, T.StringType()),
]

RawSchema = Unischema("RawSchema", METADATA_FIELDS + [_scalar("png", np.bytes_, T.BinaryType())])


@lru_cache(maxsize=None)
def images_schema(size: int) -> Unischema:
    """``images_<size>``: the raw metadata plus the decoded, resized image (stored as lossless PNG)."""
    return Unischema(f"Images{size}Schema", METADATA_FIELDS + [
        UnischemaField("image", np.uint8, (size, size), CompressedImageCodec("png"), False),
    ])


def metadata_columns() -> list[str]:
    """Names of the metadata columns every image dataset carries, in schema order."""
    return [field.name for field in METADATA_FIELDS]
