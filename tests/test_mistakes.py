"""A mistake on the command line gets one line naming the flag, exit code 2, before Spark starts (issue #20).

Each run is the real ``cxr-spark`` in a subprocess, in a folder of its own, with ``--spark-conf`` naming a file
that does not exist: a run that got as far as building its Spark session would fail there, with a traceback
and exit code 1, so exit code 2 and one line show the refusal came first. Nothing may appear in the folder
either (no output, no lock, no ``spark-warehouse``). The inputs are folders whose ``_manifest.json`` says which
stage wrote them, as every dataset of ours has; ``test_real_datasets_...`` checks the real ones say so too.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_spark.cli import args_parser
from cxr_spark.core.guards import UsageError

IMAGES_TAKEN = "an images_<size> dataset (written by preprocess or ingest --images-out)"
MODEL_TAKEN = "a model folder (written by train)"


def _dataset(folder: Path, stage: str | None, *files: str) -> Path:
    """A folder with a ``_manifest.json`` naming ``stage`` (none when ``stage`` is None) and empty ``files``."""
    folder.mkdir(parents=True)
    if stage is not None:
        (folder / "_manifest.json").write_text(json.dumps({"stage": stage, "counts": {}}))
    for name in files:
        (folder / name).write_text("{}")
    return folder


def _listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def _refused(args: list[str], folder: Path) -> str:
    """Run ``cxr-spark <args>`` in ``folder``; assert it was refused before Spark, in one line; return it."""
    before = _listing(folder)
    done = subprocess.run([sys.executable, "-m", "cxr_spark.cli", *args, "--spark-conf", str(folder / "absent.conf")],
                          cwd=folder, capture_output=True, text=True, timeout=300)
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(output) == 1, output
    assert "Traceback" not in output[0] and "WARN" not in output[0] and "SparkContext" not in output[0]
    assert _listing(folder) == before  # no output, lock, staging or spark-warehouse appeared
    return output[0]


@pytest.fixture()
def runs(tmp_path) -> Path:
    """A run folder with a raw dataset, an images dataset, predictions and a model, as their manifests say."""
    _dataset(tmp_path / "raw", "ingest")
    _dataset(tmp_path / "images_32", "preprocess")
    _dataset(tmp_path / "predictions", "score")
    _dataset(tmp_path / "model", "train", "model.json", "model.keras")
    return tmp_path


# ---------------------------------------------------------------------------------------------
# the four mistakes


def test_a_nonexistent_ingest_images_folder(tmp_path):
    line = _refused(["ingest", "--images", "no_dump", "--out", "raw"], tmp_path)
    assert line == "cxr-spark ingest: error: --images no_dump: no such folder"


def test_a_missing_ingest_metadata_file(tmp_path):
    (tmp_path / "dump").mkdir()
    line = _refused(["ingest", "--images", "dump", "--metadata", "dump/Data_Entry_2017.csv", "--out", "raw"],
                    tmp_path)
    assert line == "cxr-spark ingest: error: --metadata dump/Data_Entry_2017.csv: no such file"


def test_score_in_pointing_at_the_raw_dataset(runs):
    line = _refused(["score", "--in", "raw", "--model", "model", "--out", "predictions_2"], runs)
    assert line == (f"cxr-spark score: error: --in raw is a raw dataset (written by ingest); score takes "
                    f"{IMAGES_TAKEN}")


def test_a_score_model_folder_that_does_not_exist(runs):
    line = _refused(["score", "--in", "images_32", "--model", "models/v2", "--out", "predictions_2"], runs)
    assert line == f"cxr-spark score: error: --model models/v2: no such folder; score takes {MODEL_TAKEN}"


# ---------------------------------------------------------------------------------------------
# more inputs of the wrong kind


def test_a_score_model_folder_without_model_json(runs):
    line = _refused(["score", "--in", "images_32", "--model", "images_32", "--out", "predictions_2"], runs)
    assert line == f"cxr-spark score: error: --model images_32 has no model.json; score takes {MODEL_TAKEN}"


def test_preprocess_in_pointing_at_an_images_dataset(runs):
    line = _refused(["preprocess", "--in", "images_32", "--out", "images_64", "--size", "64"], runs)
    assert line == (f"cxr-spark preprocess: error: --in images_32 is {IMAGES_TAKEN}; preprocess takes a raw "
                    f"dataset (written by ingest)")


def test_features_in_pointing_at_a_folder_cxr_spark_did_not_write(runs):
    _dataset(runs / "my_pngs", None, "a.png")
    line = _refused(["features", "--in", "my_pngs", "--out", "features"], runs)
    assert line == ("cxr-spark features: error: --in my_pngs has no readable _manifest.json, so it is not a "
                    f"dataset cxr-spark wrote; features takes {IMAGES_TAKEN}")


def test_report_predictions_and_model_of_the_wrong_kinds(runs):
    line = _refused(["report", "--predictions", "images_32", "--out", "report"], runs)
    assert line == (f"cxr-spark report: error: --predictions images_32 is {IMAGES_TAKEN}; report takes a "
                    f"predictions dataset (written by score) or baseline predictions (written by features "
                    f"--baseline-out)")
    line = _refused(["report", "--predictions", "predictions", "--model", "raw", "--out", "report"], runs)
    assert line == f"cxr-spark report: error: --model raw has no model.json; report takes {MODEL_TAKEN}"
    line = _refused(["report", "--predictions", "predictions", "--images-dataset", "predictions", "--out", "report"],
                    runs)
    assert line == (f"cxr-spark report: error: --images-dataset predictions is a predictions dataset (written by "
                    f"score); report takes {IMAGES_TAKEN}")


def test_batch_score_model_that_is_a_predictions_dataset(runs):
    (runs / "predictions" / "model.json").write_text("{}")  # has the file, but its manifest says score wrote it
    (runs / "inbox").mkdir()
    done = subprocess.run([sys.executable, "-m", "cxr_spark.cli", "batch-score", "--images", "inbox", "--model",
                           "predictions", "--out", "store", "--spark-conf", "absent.conf"],
                          cwd=runs, capture_output=True, text=True, timeout=300)
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(output) == 1, output
    (record,) = (runs / "store" / "_runs").iterdir()
    assert output[0] == ("cxr-spark batch-score: error: --model predictions is a predictions dataset (written by "
                         f"score); batch-score takes {MODEL_TAKEN}; the refused run is recorded in {record}")


# ---------------------------------------------------------------------------------------------
# what is accepted


def _check(argv: list[str]) -> None:
    from cxr_spark.cli import SPARK_STAGES

    SPARK_STAGES[argv[0]][0].check_args(args_parser().parse_args(argv))


def test_inputs_of_the_right_kinds_pass(runs):
    _check(["score", "--in", str(runs / "images_32"), "--model", str(runs / "model"), "--out", str(runs / "p2")])
    _check(["report", "--predictions", str(runs / "predictions"), "--images-dataset", str(runs / "images_32"),
            "--model", str(runs / "model"), "--out", str(runs / "report")])
    hand_made = _dataset(runs / "hand_made_model", None, "model.json")  # a model card without a manifest
    _check(["score", "--in", str(runs / "images_32"), "--model", str(hand_made), "--out", str(runs / "p3")])
    # another filesystem is left to the run
    _check(["score", "--in", "hdfs://nn/images_32", "--model", "hdfs://nn/model", "--out", str(runs / "p4")])
    # an MLflow model URI: the version must be registered in the store (a real local one, made here)
    from mlflow import MlflowClient

    store = f"file://{runs / 'mlruns'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    client.create_registered_model("cxr-spark-multilabel")
    for _ in range(3):
        client.create_model_version("cxr-spark-multilabel", str(runs / "model"))
    (runs / "inbox").mkdir()
    _check(["batch-score", "--images", str(runs / "inbox"), "--model", "models:/cxr-spark-multilabel/3",
            "--tracking-uri", store, "--out", str(runs / "store")])
    assert not (runs / "store").exists()  # a run that was not refused writes nothing before Spark
    with pytest.raises(UsageError, match="no such registered model version"):
        _check(["batch-score", "--images", str(runs / "inbox"), "--model", "models:/cxr-spark-multilabel/4",
                "--tracking-uri", store, "--out", str(runs / "store4")])
    with pytest.raises(UsageError, match="needs --tracking-uri or MLFLOW_TRACKING_URI"):
        _check(["batch-score", "--images", str(runs / "inbox"), "--model", "models:/cxr-spark-multilabel/3",
                "--out", str(runs / "store5")])
    with pytest.raises(UsageError, match="is a raw dataset"):
        _check(["score", "--in", f"file://{runs / 'raw'}", "--model", str(runs / "model"), "--out", str(runs / "p5")])


def test_real_datasets_are_of_the_kinds_their_stages_take(tiny_raw, tiny_images, tmp_path):
    raw, _ = tiny_raw
    images, _ = tiny_images
    model = _dataset(tmp_path / "model", "train", "model.json")
    _check(["preprocess", "--in", str(raw), "--out", str(tmp_path / "images")])
    _check(["features", "--in", str(images), "--out", str(tmp_path / "features")])
    _check(["score", "--in", str(images), "--model", str(model), "--out", str(tmp_path / "predictions")])
    with pytest.raises(UsageError, match=f"^--in {raw} is a raw dataset"):
        _check(["score", "--in", str(raw), "--model", str(model), "--out", str(tmp_path / "predictions")])
    with pytest.raises(UsageError, match=f"^--in {images} is an images_<size> dataset"):
        _check(["preprocess", "--in", str(images), "--out", str(tmp_path / "images")])


# ---------------------------------------------------------------------------------------------
# batch-score: a refused run is recorded in the store


def test_a_batch_score_run_without_its_inbox_leaves_a_refused_run_record(runs):
    store = runs / "store"
    (store / "_runs").mkdir(parents=True)
    earlier = store / "_runs" / "20240101T021500Z-0a1b2c3d.json"
    earlier.write_text('{"counts": {"status": "scored"}}')
    done = subprocess.run([sys.executable, "-m", "cxr_spark.cli", "batch-score", "--images", "incoming", "--model",
                           "model", "--out", "store", "--batch-size", "8", "--spark-conf", "absent.conf"],
                          cwd=runs, capture_output=True, text=True, timeout=300)
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(output) == 1, output
    records = sorted(set((store / "_runs").iterdir()) - {earlier})
    assert len(records) == 1 and records[0].suffix == ".json"
    assert output[0] == (f"cxr-spark batch-score: error: --images incoming: no such folder; the refused run is "
                         f"recorded in {records[0]}")
    record = json.loads(records[0].read_text())
    run_id = records[0].name[:-len(".json")]
    assert record["run_id"] == record["counts"]["run_id"] == run_id
    assert record["counts"]["status"] == "refused" and record["counts"]["exit_code"] == 2
    assert record["error"] == record["counts"]["error"] == "--images incoming: no such folder"
    assert record["counts"]["scored"] == record["counts"]["files_listed"] == 0
    assert record["inputs"]["images"] == f"file://{runs / 'incoming'}"
    assert record["config"]["batch-score"]["batch_size"] == 8
    assert earlier.read_text() == '{"counts": {"status": "scored"}}'
    assert sorted(path.name for path in store.iterdir()) == ["_runs"]  # no lock, staging or rows left
    assert sorted(path.name for path in (store / "_runs").iterdir()) == sorted([earlier.name, records[0].name])


def test_a_refused_batch_score_run_creates_a_new_store_for_its_record(runs):
    done = subprocess.run([sys.executable, "-m", "cxr_spark.cli", "batch-score", "--images", "incoming", "--model",
                           "no_model", "--out", "stores/nightly", "--spark-conf", "absent.conf"],
                          cwd=runs, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    (record_file,) = (runs / "stores" / "nightly" / "_runs").iterdir()
    record = json.loads(record_file.read_text())
    # the first refusal found is recorded: the missing inbox
    assert record["counts"]["error"] == "--images incoming: no such folder"
    assert record["counts"]["model_version"] is None


def test_a_refused_batch_score_run_writes_nothing_where_the_store_may_not_be(runs):
    (runs / "inbox").mkdir()
    before = _listing(runs)
    # a store inside the model folder: refused for the overlap, and no record is written into the model
    line = _refused(["batch-score", "--images", "missing", "--model", "model", "--out", "model/store"], runs)
    assert line.startswith("cxr-spark batch-score: error: --out model/store is inside --model model")
    # an existing folder that is not a store: refused, no _runs/ added to it
    line = _refused(["batch-score", "--images", "missing", "--model", "model", "--out", "predictions"], runs)
    assert "is not a batch-score store" in line
    assert _listing(runs) == before


@pytest.mark.parametrize("args, expected", [
    (["train", "--in", "images_32", "--out", "model2", "--input-workers", "-1"],
     "cxr-spark train: error: argument --input-workers: must be 0 or more, not -1"),
    (["train", "--in", "images_32", "--out", "model2", "--epochs", "many"],
     "cxr-spark train: error: argument --epochs: invalid int value: 'many'"),
    (["report", "--predictions", "predictions", "--out", "report", "--bootstrap-seed", "-1"],
     "cxr-spark report: error: argument --bootstrap-seed: must be 0 or more, not -1"),
    (["score", "--in", "images_32", "--model", "model"],
     "cxr-spark score: error: the following arguments are required: --out")])
def test_a_value_argparse_rejects_is_one_line_naming_the_flag_not_the_usage_block(runs, args, expected):
    line = _refused(args, runs)
    assert line == expected + " (--help for usage)"
