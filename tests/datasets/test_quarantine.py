"""The quarantine's reason vocabulary: the one the README documents, checked on write; and its rows counted
by the job that writes them."""
from __future__ import annotations

import re
from collections import Counter

import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from cxr_spark.datasets.quarantine import QUARANTINE_SCHEMA, REASONS, check_reasons, write_counted


def test_the_quarantine_vocabulary_is_the_one_the_readme_documents_and_nothing_else_is_written():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| reason | meaning |"):].split("\n\n")[0]
    assert tuple(re.findall(r"^\| `(\w+)` \|", table, re.M)) == REASONS
    check_reasons({"corrupt_image": 3, "no_metadata": 1}, "raw")
    with pytest.raises(RuntimeError, match="raw quarantine has rows with reasons outside .*: None, bad_pixels"):
        check_reasons({"bad_pixels": 1, None: 2, "empty_file": 1}, "raw")


def test_write_counted_counts_what_it_wrote_by_kind_and_reason_and_refuses_words_outside_the_vocabulary(
        spark, tmp_path):
    rows = ([(f"/d/{i}.png", f"{i}.png", "corrupt_image", "truncated", "file") for i in range(5)]
            + [(f"/d/{i}.png", f"{i}.png", "empty_file", "0 bytes", "file") for i in range(5, 7)]
            + [(None, "9.png", "no_image", "no file listed", "metadata")] * 3
            + [(None, "9.png", "invalid_bbox", "w < 0", "bbox")])
    counted = write_counted(spark.createDataFrame(rows, QUARANTINE_SCHEMA).repartition(3), str(tmp_path / "q"), "raw")
    assert counted == (Counter(kind for *_, kind in rows), Counter(reason for _, _, reason, _, _ in rows))
    written = pq.read_table(tmp_path / "q")
    assert sorted(zip(*[written.column(name).to_pylist() for name in ("image_id", "reason", "kind")]),
                  key=str) == sorted(((i, r, k) for _, i, r, _, k in rows), key=str)
    assert len(list((tmp_path / "q").glob("*.parquet"))) == 1
    for bad, match in ((("/d/x", "x", "bad_pixels", "?", "file"), "reasons outside .*: bad_pixels"),
                       (("/d/x", "x", "empty_file", "?", "row"), r"kind outside .*: empty_file, row"),
                       (("/d/x", "x", None, "?", "file"), "reasons outside .*: None")):
        with pytest.raises(RuntimeError, match=match):
            write_counted(spark.createDataFrame(rows + [bad], QUARANTINE_SCHEMA), str(tmp_path / f"q_{bad[2]}"), "raw")


def test_an_empty_quarantine_written_from_the_driver_reads_back_as_one_with_no_row(spark, tmp_path):
    from cxr_spark.datasets.quarantine import write_empty

    write_empty(spark, f"file://{tmp_path}/q")
    read = spark.read.schema(QUARANTINE_SCHEMA).parquet(f"file://{tmp_path}/q")
    assert read.count() == 0
    names = [field.split()[0] for field in QUARANTINE_SCHEMA.split(", ")]
    assert pq.read_schema(next((tmp_path / "q").glob("*.parquet"))).names == names
    assert spark.read.parquet(f"file://{tmp_path}/q").dtypes == [(name, "string") for name in names]  # no schema given
