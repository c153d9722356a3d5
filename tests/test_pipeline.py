"""End to end on tiny data: a real 2-process Horovod-on-Spark training run, Spark scoring, the report,
and the same jobs through spark-submit. Marked slow (about a minute)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import read_rows
from faults import kill_tree
from PIL import Image
from sklearn.metrics import roc_auc_score

from cxr_spark.config import override
from cxr_spark.core.labels import LABELS
from cxr_spark.core.metrics import tune_thresholds
from cxr_spark.datasets.model_card import MODEL_FILE
from cxr_spark.stages.report.job import report
from cxr_spark.stages.score import score
from cxr_spark.stages.train.job import train

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(spark, tiny_images, config):
    images, _ = tiny_images
    out = images.parent / "model"
    counts = train(spark, str(images), str(out), override(config.train, num_proc=2, epochs=2, batch_size=4))
    return out, counts


def test_two_horovod_processes_train_and_write_a_model_card(trained, tiny_images):
    model_dir, counts = trained
    images, image_counts = tiny_images
    card = json.loads((model_dir / "model.json").read_text())
    assert card["labels"] == list(LABELS) and card["input_size"] == 32
    assert card["normalization"]["mean"] == image_counts["normalization"]["mean"]
    assert card["training"]["num_proc"] == 2 and card["model_version"] == counts["model_version"]
    assert len(card["history"]["loss"]) == counts["epochs_run"] == 2
    # the shard contract: every rank runs the steps the smallest of petastorm's two shards can fill
    shards = [len(read_rows(images, ["image_id"], filters=[("split", "=", "train")], cur_shard=r, shard_count=2))
              for r in range(2)]
    assert card["training"]["shard_sizes"] == shards and sum(shards) == image_counts["splits"]["train"]
    assert card["training"]["steps_per_epoch"] == counts["steps_per_epoch"] == min(shards) // 4
    assert card["training"]["remainder_per_epoch"] == image_counts["splits"]["train"] - min(shards) // 4 * 8
    assert card["training"]["augmentation"]["enabled"] and card["training"]["class_weighting"]
    assert (model_dir / MODEL_FILE).stat().st_size > 10_000
    with Image.open(model_dir / "training_curves.png") as curves:
        assert curves.format == "PNG" and curves.size == (1000, 400)


def test_saved_thresholds_are_those_tuned_on_the_validation_split(trained, tiny_images):
    import tensorflow as tf

    model_dir, _ = trained
    images, image_counts = tiny_images
    card = json.loads((model_dir / "model.json").read_text())
    rows = read_rows(images, ["image", "labels"], filters=[("split", "=", "val")])
    assert card["thresholds_tuned_on"]["images"] == len(rows) == image_counts["splits"]["val"]
    model = tf.keras.models.load_model(model_dir / MODEL_FILE, compile=False)
    norm = card["normalization"]
    pixels = np.stack([r.image for r in rows]).astype(np.float32)
    scores = model.predict(((pixels - norm["mean"]) / norm["std"])[..., None], verbose=0)
    expected = tune_thresholds(np.stack([r.labels for r in rows]), scores)
    assert [card["thresholds"][name] for name in LABELS] == pytest.approx(expected, abs=1e-6)


def test_more_processes_than_task_slots_fails_at_once(spark, tiny_images, config, tmp_path):
    images, _ = tiny_images
    with pytest.raises(ValueError, match="exceeds the 2 task slots"):
        train(spark, str(images), str(tmp_path / "model"), override(config.train, num_proc=3))
    assert not (tmp_path / "model").exists()


def test_spark_scores_equal_keras_predict_and_metrics_equal_sklearn(spark, trained, tiny_images, tmp_path):
    import tensorflow as tf

    model_dir, counts = trained
    images, image_counts = tiny_images
    result = score(spark, str(images), str(model_dir), str(tmp_path / "predictions"), "test")
    predictions = pd.read_parquet(tmp_path / "predictions").sort_values("image_id")
    assert result["scored"] == len(predictions) == image_counts["splits"]["test"]
    assert (predictions["model_version"] == counts["model_version"]).all()
    # the predictions' manifest traces them to the exact dataset and model that made them
    inputs = json.loads((tmp_path / "predictions" / "_manifest.json").read_text())["inputs"]
    images_manifest = json.loads((images / "_manifest.json").read_text())
    assert inputs["images"]["finished_at"] == images_manifest["finished_at"]
    assert inputs["images"]["stage"] == "preprocess" and inputs["model"]["model_version"] == counts["model_version"]

    card = json.loads((model_dir / "model.json").read_text())
    rows = sorted(read_rows(images, ["image_id", "image", "labels"], filters=[("split", "=", "test")]),
                  key=lambda r: r.image_id)
    model = tf.keras.models.load_model(model_dir / MODEL_FILE, compile=False)
    pixels = np.stack([r.image for r in rows]).astype(np.float32)
    norm = card["normalization"]
    expected = model.predict(((pixels - norm["mean"]) / norm["std"])[..., None], verbose=0)
    assert [r.image_id for r in rows] == predictions["image_id"].tolist()
    assert np.allclose(np.stack(predictions["probabilities"]), expected, atol=1e-5)
    assert np.array_equal(np.stack(predictions["labels"]), np.stack([r.labels for r in rows]))

    metrics = report(spark, str(tmp_path / "predictions"), str(tmp_path / "report"))
    y, p = np.stack(predictions["labels"]), np.stack(predictions["probabilities"])
    for i, name in enumerate(LABELS):
        row, threshold = metrics["per_label"][name], np.float32(card["thresholds"][name])
        assert row["threshold"] == card["thresholds"][name]  # the report applies the model's tuned thresholds
        assert row["tp"] == int(((p[:, i] >= threshold) & (y[:, i] == 1)).sum())
        assert row["fp"] == int(((p[:, i] >= threshold) & (y[:, i] == 0)).sum())
        assert row["tn"] + row["fn"] == int((p[:, i] < threshold).sum())
        if 0 < y[:, i].sum() < len(y):
            assert row["auroc"] == pytest.approx(roc_auc_score(y[:, i], p[:, i]), abs=1e-9)
    _check_clinical(metrics, images, predictions, y, p, card)


def _check_clinical(metrics, images, predictions, y, p, card):
    """The clinical evaluation of a real pipeline run, recomputed from the predictions joined to the images
    dataset's own attributes (patient, sex, view, age)."""
    attributes = pd.DataFrame([r._asdict() for r in read_rows(images, ["image_id", "patient_id", "sex", "view", "age"],
                                                                filters=[("split", "=", "test")])])
    joined = predictions[["image_id"]].merge(attributes, on="image_id", how="left")
    assert metrics["n_patients"] == joined["patient_id"].nunique() and metrics["bootstrap"]["unit"] == "patient"
    assert metrics["bootstrap"]["units"] == joined["patient_id"].nunique()
    for i, name in enumerate(LABELS):
        calibration = metrics["per_label"][name]["calibration"]
        assert calibration["brier"] == pytest.approx(np.mean((p[:, i].astype(np.float64) - y[:, i]) ** 2), abs=1e-12)
        counts, _ = np.histogram(p[:, i].astype(np.float64), np.linspace(0, 1, 11))
        assert [b["n"] for b in calibration["bins"]] == counts.tolist()
        for sex in ("M", "F"):
            rows = (joined["sex"] == sex).to_numpy()
            cell = metrics["subgroups"]["sex"][sex]["per_label"][name]
            assert cell["support"] == y[rows, i].sum()
            if 0 < y[rows, i].sum() < rows.sum():
                assert cell["auroc"] == pytest.approx(roc_auc_score(y[rows, i], p[rows, i]), abs=1e-9)
            else:
                assert cell["auroc"] is None
    assert metrics["summary"]["n_images"] == len(predictions)


def test_spark_submit_runs_a_job_file_with_the_cli_arguments(tiny_dump, tmp_path):
    import pyspark

    spark_home = Path(pyspark.__file__).parent
    env = dict(os.environ, SPARK_HOME=str(spark_home), PYSPARK_PYTHON=sys.executable,
               PYSPARK_DRIVER_PYTHON=sys.executable)
    command = [str(spark_home / "bin" / "spark-submit"), "--properties-file", str(ROOT / "conf/spark/local.conf"),
               "--conf", "spark.ui.enabled=false", str(ROOT / "spark_jobs" / "ingest.py"),
               "--images", str(tiny_dump), "--metadata", str(tiny_dump / "Data_Entry_2017.csv"),
               "--out", str(tmp_path / "raw")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1].split(": ", 1)[1])
    manifest = json.loads((tmp_path / "raw" / "_manifest.json").read_text())
    assert summary["ingested"] == manifest["counts"]["ingested"] == len(list(tiny_dump.rglob("*.png")))
    assert manifest["inputs"]["split_lists"] is None  # hash split: no lists were given


def test_every_command_has_help():
    for stage in ("synth", "ingest", "preprocess", "features", "train", "score", "report", "batch-score", "demo"):
        done = subprocess.run([sys.executable, "-m", "cxr_spark.cli", stage, "--help"], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and f"cxr-spark {stage}" in done.stdout, stage


def test_a_killed_training_run_resumes_from_its_last_checkpoint(spark, tiny_images, config, tmp_path):
    """Kill `cxr-spark train` after its first checkpoint; --resume continues with that epoch, weights
    and optimiser state, and ends at the same epoch count as an uninterrupted run."""
    import tensorflow as tf

    images, _ = tiny_images
    out, checkpoints, epochs = tmp_path / "model", tmp_path / "checkpoints", 4
    conf = tmp_path / "spark.conf"
    conf.write_text((ROOT / "conf/spark/local.conf").read_text()
                    + "spark.ui.enabled false\nspark.ui.showConsoleProgress false\nspark.driver.memory 1g\n")
    command = [sys.executable, "-m", "cxr_spark.cli", "train", "--in", str(images), "--out", str(out),
               "--epochs", str(epochs), "--batch-size", "4", "--checkpoint-dir", str(checkpoints),
               "--spark-conf", str(conf)]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=dict(os.environ, PYSPARK_PYTHON=sys.executable))
    state_file, deadline = checkpoints / "state.json", time.time() + 600
    try:
        while not state_file.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert state_file.exists(), f"no checkpoint appeared (exit code {process.poll()})"
    finally:
        kill_tree(process.pid)  # the driver, its JVM, the Python workers and both Horovod processes
        process.wait()
    assert not out.exists()  # nothing half-written under the model's name
    state = json.loads(state_file.read_text())
    assert 1 <= state["epoch"] < epochs and len(state["history"]["loss"]) == state["epoch"]
    saved_iterations = tf.train.load_checkpoint(state["checkpoint"]).get_tensor(
        "optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE")
    assert saved_iterations == state["optimizer_iterations"] > 0

    counts = train(spark, str(images), str(out), override(config.train, epochs=epochs, batch_size=4),
                   checkpoint_dir=str(checkpoints), resume=True)
    card = json.loads((out / "model.json").read_text())
    resumed = card["training"]["resumed"]
    assert resumed["epoch"] == state["epoch"]
    assert resumed["iterations_at_start"] == saved_iterations  # the optimiser continued from the checkpoint
    assert counts["epochs_run"] == len(card["history"]["loss"]) == epochs
    assert card["history"]["loss"][:state["epoch"]] == state["history"]["loss"]  # the history carried over


def test_a_failing_horovod_process_fails_the_job_with_its_own_error(spark, tiny_images, config, tmp_path):
    """A rank whose shard holds an image that cannot be decoded dies; the job stops (no hang) and says why."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    images, _ = tiny_images
    broken = tmp_path / "images_broken"
    shutil.copytree(images, broken)
    victim = sorted((broken / "split=train").glob("*.parquet"))[0]
    table = pq.read_table(victim)
    column = table.schema.get_field_index("image")
    garbage = pa.array([b"not a png"] + table.column("image").to_pylist()[1:], table.schema.field(column).type)
    pq.write_table(table.set_column(column, table.schema.field(column), garbage), victim)  # one row group, as before
    (victim.parent / f".{victim.name}.crc").unlink()  # Hadoop's checksum of the old bytes
    with pytest.raises(RuntimeError, match=r"training failed on a Horovod process: rank-\d: .*"):
        train(spark, str(broken), str(tmp_path / "model"), override(config.train, epochs=1, batch_size=4),
              checkpoint_dir=str(tmp_path / "checkpoints"))
    assert not (tmp_path / "model").exists()
