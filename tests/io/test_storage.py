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


def test_a_local_folder_is_named_as_hadoop_lists_it(spark, tmp_path):
    """names() of a local folder (listed by the OS) is what Hadoop's local filesystem lists: hidden files and
    folders included, its own checksum files left out; a file names itself, a missing folder is None."""
    from cxr_spark.io.storage import FileSystem

    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    for name in ("part-0.parquet", ".part-0.parquet.crc", ".out.lock", "_manifest.json", "a b#1.png"):
        (folder / name).write_bytes(b"x")
    url = f"file://{folder}"
    fs = FileSystem(spark, url)
    hadoop = fs._fs  # the JVM's own listing, as every other filesystem is read
    expected = sorted(status.getPath().getName() for status in hadoop.listStatus(fs._Path(url)))
    assert ".part-0.parquet.crc" not in expected and ".out.lock" in expected  # what Hadoop does, checked
    assert sorted(fs.names(url)) == expected
    assert sorted(fs.names(str(folder))) == expected
    assert fs.names(f"{url}/part-0.parquet") == ["part-0.parquet"]
    assert fs.names(f"{url}/missing") is None
