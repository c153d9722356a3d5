"""The boxes dataset: NIH's ``BBox_List_2017.csv`` as ingest keeps it in ``<raw>/_bbox/`` (Parquet), one
row per box with its canonical finding, and the quarantine reason of a row that cannot be used.
"""
from __future__ import annotations

import pandas as pd
from pyspark.sql import DataFrame, SparkSession

from cxr_spark.core.labels import UnknownFindingError, canonical_name
from cxr_spark.io.storage import to_url

#: ``BBox_List_2017.csv`` read positionally: its header ``Image Index,Finding Label,Bbox [x,y,w,h],,,``
#: names six columns through commas inside a bracket (plus trailing empty ones, which are dropped).
BBOX_DDL = "`image_id` string, `finding_text` string, `x` double, `y` double, `w` double, `h` double"

BBOX_DIR = "_bbox"


def _bbox_rows(batches):
    """The mapInPandas function: canonical finding names and a reason for unusable box rows."""
    for frame in batches:
        findings, reasons, details = [], [], []
        for row in frame.itertuples(index=False):
            finding = reason = detail = None
            try:
                finding = canonical_name(row.finding_text or "")
            except UnknownFindingError as error:
                reason, detail = "unknown_finding", f"Finding Label {row.finding_text!r}: {error}"
            if reason is None and any(pd.isna(v) or v < 0 for v in (row.x, row.y, row.w, row.h)):
                reason, detail = "invalid_bbox", f"box x={row.x} y={row.y} w={row.w} h={row.h}: numbers >= 0 expected"
            findings.append(finding)
            reasons.append(reason)
            details.append(detail)
        yield frame[["image_id", "x", "y", "w", "h"]].assign(finding=findings, reason=reasons, detail=details)


def read_bbox(spark: SparkSession, bbox: str) -> DataFrame:
    """Parse BBox_List_2017.csv positionally (its header ``Bbox [x,y,w,h],,,`` splits into six names)."""
    table = spark.read.schema(BBOX_DDL).option("header", "true").option("mode", "PERMISSIVE").csv(to_url(bbox))
    return table.mapInPandas(_bbox_rows, "image_id string, x double, y double, w double, h double, "
                                         "finding string, reason string, detail string")
