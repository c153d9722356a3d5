"""Counts taken by the job that writes the rows (a Spark ``Observation``), not by another job over what was
written: a stage that must check its counts before it commits pays no extra job for them.
"""
from __future__ import annotations

import json
from typing import Callable

from pyspark.sql import DataFrame, Observation
from pyspark.sql import functions as F


def observe_counts(frame: DataFrame, conditions: dict[str, str]) -> tuple[DataFrame, Callable[[], dict[str, int]]]:
    """``frame`` counting, in the first action run on it, the rows for which each SQL condition of ``conditions``
    is true (a null is not true), and a function returning those counts by name once that action is done.

    All the counts are one aggregate expression parsed from one SQL text: building a Column per condition costs
    the driver several calls into the JVM each. They come back as JSON text: an observed array would reach Python
    as a Java object. Each condition is an aggregate Spark generates code for, so keep them few (tens, not
    hundreds). Only an action on the frame
    returned, or on one derived from it, fills the counts; the function waits for it. For example
    ``observe_counts(files, {"empty": "length = 0"})`` before ``files`` is written.
    """
    names = list(conditions)
    observation = Observation()
    counts = F.expr("to_json(array(" + ", ".join(f"count_if({condition})" for condition in conditions.values()) + "))")
    observed = frame.observe(observation, counts.alias("counts"))
    return observed, lambda: dict(zip(names, json.loads(observation.get["counts"])))

