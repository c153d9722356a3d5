"""Counts taken by the job that writes the rows."""
from __future__ import annotations

import pyarrow.parquet as pq

from cxr_spark.io.counting import observe_counts


def test_observed_counts_are_the_rows_written_that_match_each_condition(spark, tmp_path):
    rows = [(i, None if i % 7 == 0 else f"r{i % 3}") for i in range(100)]
    frame = spark.createDataFrame(rows, "id long, reason string").repartition(3)
    counted, counts = observe_counts(frame, {"even": "id % 2 = 0", "r1": "reason = 'r1'", "no_reason": "reason IS NULL",
                                             "none": "id < 0"})
    counted.write.parquet(str(tmp_path / "out"))
    written = pq.read_table(tmp_path / "out").to_pylist()
    assert len(written) == 100
    assert counts() == {"even": sum(r["id"] % 2 == 0 for r in written),
                        "r1": sum(r["reason"] == "r1" for r in written),  # a null reason is not 'r1'
                        "no_reason": sum(r["reason"] is None for r in written), "none": 0}

