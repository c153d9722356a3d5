"""The Petastorm Unischemas of the ``raw`` and ``images_<size>`` datasets, declared once.

Spark schemas (``as_spark_schema()``), numpy rows and TensorFlow types are all derived from these.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from petastorm.codecs import CompressedImageCodec, NdarrayCodec, ScalarCodec
from petastorm.unischema import Unischema, UnischemaField
from pyspark.sql import types as T

from cxr_spark.labels import NUM_LABELS


def _scalar(name, numpy_type, spark_type, nullable=False):
    return UnischemaField(name, numpy_type, (), ScalarCodec(spark_type), nullable)


METADATA_FIELDS = [
    _scalar("image_id", np.str_, T.StringType()),
    # null when the dump names no patient (generic and Kaggle dumps, DICOM): nothing is invented
    _scalar("patient_id", np.int32, T.IntegerType(), nullable=True),
    _scalar("follow_up", np.int32, T.IntegerType(), nullable=True),
    _scalar("age", np.int32, T.IntegerType(), nullable=True),
    _scalar("sex", np.str_, T.StringType(), nullable=True),
    _scalar("view", np.str_, T.StringType(), nullable=True),
    _scalar("finding_labels", np.str_, T.StringType(), nullable=True),
    UnischemaField("labels", np.uint8, (NUM_LABELS,), NdarrayCodec(), False),
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
        # Per-image statistics of the stored pixels: QA, and the train split's mean/std without re-decoding.
        _scalar("pixel_mean", np.float32, T.FloatType()),
        _scalar("pixel_std", np.float32, T.FloatType()),
    ])


#: The quarantine dataset, inside the dataset it belongs to (``raw`` or ``images_<size>``): replaced
#: atomically with it, and skipped by Spark and Petastorm (names starting with ``_``).
QUARANTINE_DIR = "_quarantine"
QUARANTINE_SCHEMA = "source_path string, image_id string, reason string, detail string, kind string"


def encode_column(schema: Unischema, name: str, values) -> list:
    """Encode a column of numpy values with the field's codec (what Petastorm stores in Parquet)."""
    field = schema.fields[name]
    return [field.codec.encode(field, np.asarray(v, dtype=field.numpy_dtype)) for v in values]


def decode_column(schema: Unischema, name: str, values) -> list:
    """Decode a column read by Spark or pyarrow back into numpy values."""
    field = schema.fields[name]
    return [field.codec.decode(field, v) for v in values]


def metadata_columns() -> list[str]:
    """Names of the metadata columns every image dataset carries, in schema order."""
    return [field.name for field in METADATA_FIELDS]
