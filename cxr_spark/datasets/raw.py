"""The ``raw`` dataset ingest writes: its Petastorm Unischema (the metadata of every image plus its PNG bytes),
declared once; ``images_<size>`` carries the same metadata fields (:mod:`cxr_spark.datasets.images`).

Spark schemas (``as_spark_schema()``), numpy rows and TensorFlow types are all derived from these.
"""
from __future__ import annotations

import numpy as np
from petastorm.codecs import NdarrayCodec
from petastorm.unischema import Unischema, UnischemaField
from pyspark.sql import types as T

from cxr_spark.core.labels import NUM_LABELS
from cxr_spark.datasets.fields import scalar_field as _scalar

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


def metadata_columns() -> list[str]:
    """Names of the metadata columns every image dataset carries, in schema order."""
    return [field.name for field in METADATA_FIELDS]
