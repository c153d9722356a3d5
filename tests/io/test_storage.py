"""Storage: where files may be read and written, and the error for a filesystem it cannot reach."""
from __future__ import annotations

import pytest


def test_model_files_on_a_remote_filesystem_get_a_clear_error(tmp_path):
    from cxr_spark.io.storage import read_bytes, write_bytes

    write_bytes(f"file://{tmp_path}/model/model.keras", b"weights")
    assert read_bytes(str(tmp_path / "model" / "model.keras")) == b"weights"
    with pytest.raises(NotImplementedError, match="hdfs://nn/m/model.keras needs a local or mounted path"):
        read_bytes("hdfs://nn/m/model.keras")


def test_rows_from_the_driver_become_a_local_relation_with_their_values(spark):
    """local_frame's rows are the ones given, in their columns and types, and a query on them runs in the JVM
    alone: PySpark's createDataFrame of a list is a Python RDD, whose every query starts Python workers."""
    from cxr_spark.io.storage import listed_files, local_frame

    rows = [("file:/dump/a b.png", 3), ("file:/dump/c.png", None)]
    frame = local_frame(spark, rows, "path string, n long")
    assert [(field.name, field.dataType.simpleString()) for field in frame.schema.fields] == [
        ("path", "string"), ("n", "bigint")]
    assert [tuple(row) for row in frame.orderBy("path").collect()] == rows
    for planned in (frame.where("n IS NULL"), listed_files(spark, ["file:/dump/a b.png"])):
        plan = planned._jdf.queryExecution().executedPlan().toString()
        assert "LocalTableScan" in plan and "ExistingRDD" not in plan, plan
    assert [row.path for row in listed_files(spark, ["file:/x.png", "file:/y.png"], "path").collect()] == [
        "file:/x.png", "file:/y.png"]
    assert local_frame(spark, [], "path string").count() == 0
