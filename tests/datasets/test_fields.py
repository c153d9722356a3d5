"""Petastorm's metadata as we write it (cxr_spark.datasets.fields.petastorm_dataset: row groups from the
footers on the driver) against what petastorm's own materialize_dataset writes for the same files."""
from __future__ import annotations

import json
import pickle
import shutil

import pyarrow.parquet as pq
from petastorm.etl.dataset_metadata import ROW_GROUPS_PER_FILE_KEY, UNISCHEMA_KEY, materialize_dataset

from cxr_spark.datasets.images import images_schema


def _metadata(folder) -> dict:
    return pq.read_metadata(folder / "_common_metadata").schema.to_arrow_schema().metadata


def test_our_petastorm_metadata_is_what_materialize_dataset_writes_for_the_same_files(spark, tiny_images, tmp_path):
    images, counts = tiny_images  # written by preprocess, through our petastorm_dataset
    theirs = tmp_path / "theirs"
    shutil.copytree(images, theirs)
    (theirs / "_common_metadata").unlink()
    with materialize_dataset(spark, f"file://{theirs}", images_schema(counts["size"])):
        pass  # the files are there already: petastorm only adds its metadata
    ours, expected = _metadata(images), _metadata(theirs)
    assert set(ours) == set(expected)
    row_groups = json.loads(ours[ROW_GROUPS_PER_FILE_KEY])
    assert row_groups == json.loads(expected[ROW_GROUPS_PER_FILE_KEY])
    assert sum(counts["files_per_split"].values()) == len(row_groups) and all(n >= 1 for n in row_groups.values())
    assert str(pickle.loads(ours[UNISCHEMA_KEY])) == str(pickle.loads(expected[UNISCHEMA_KEY]))
