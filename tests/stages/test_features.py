"""The features stage against the pure function on independently read images; the MLlib baseline through the
report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import read_rows
from sklearn.metrics import roc_auc_score

from cxr_spark.core import image_features as fx
from cxr_spark.core.labels import LABELS
from cxr_spark.core.metrics import tune_thresholds
from cxr_spark.datasets.images import images_schema
from cxr_spark.stages import features as feat
from cxr_spark.stages.report.job import report


@pytest.fixture(scope="module")
def stage(spark, tiny_images, config, tmp_path_factory):
    images, _ = tiny_images
    out = tmp_path_factory.mktemp("features")
    counts = feat.features(spark, str(images), str(out / "features"), config.features,
                           baseline_out=str(out / "baseline"))
    return images, out / "features", out / "baseline", counts


@pytest.fixture(scope="module")
def image_rows(stage):
    images = stage[0]
    return {row.image_id: row for row in read_rows(images, ["image_id", "split", "labels", "image"])}


def test_one_feature_row_per_image_with_the_named_vector(spark, stage, image_rows):
    _, features_dir, _, counts = stage
    written = spark.read.parquet(str(features_dir))
    assert written.columns == ["image_id", "split", "labels", "features"]
    assert written.count() == len(image_rows) == counts["images"]
    expected_splits = {}
    for row in image_rows.values():
        expected_splits[row.split] = expected_splits.get(row.split, 0) + 1
    assert counts["splits"] == expected_splits
    manifest = json.loads((features_dir / "_manifest.json").read_text())
    assert manifest["feature_names"] == list(fx.FEATURE_NAMES)
    assert manifest["counts"]["n_features"] == len(fx.FEATURE_NAMES)
    sizes = {row.features.size for row in written.select("features").collect()}
    assert sizes == {len(fx.FEATURE_NAMES)}


def test_spark_features_equal_the_pure_function_on_images_read_independently(spark, stage, image_rows):
    _, features_dir, _, _ = stage
    chosen = sorted(image_rows)[::17][:6]
    written = (spark.read.parquet(str(features_dir)).where(f"image_id in ({','.join(repr(i) for i in chosen)})")
               .collect())
    assert len(written) == len(chosen)
    for row in written:
        source = image_rows[row.image_id]
        np.testing.assert_allclose(row.features.toArray(), fx.image_features(source.image), rtol=1e-12, atol=1e-15)
        assert list(row.labels) == list(source.labels) and row.split == source.split


def test_baseline_predictions_have_scores_format_and_the_test_labels(spark, stage, image_rows):
    _, _, baseline_dir, counts = stage
    predictions = spark.read.parquet(str(baseline_dir))
    assert dict(predictions.dtypes) == {"image_id": "string", "split": "string", "labels": "array<smallint>",
                                        "probabilities": "array<float>", "model_version": "string",
                                        "scored_at": "timestamp"}
    rows = predictions.collect()
    test_ids = {image_id for image_id, row in image_rows.items() if row.split == "test"}
    assert {row.image_id for row in rows} == test_ids and len(rows) == len(test_ids) == counts["baseline"]["scored"]
    for row in rows:
        assert list(row.labels) == list(image_rows[row.image_id].labels)
        assert len(row.probabilities) == len(LABELS) and all(0.0 <= p <= 1.0 for p in row.probabilities)
    model = json.loads((baseline_dir / "_manifest.json").read_text())["model"]
    assert set(model) >= {"model", "model_version", "task", "labels", "input_size", "thresholds"}
    assert model["labels"] == list(LABELS) and list(model["thresholds"]) == list(LABELS)
    assert model["input_size"] == images_schema(32).fields["image"].shape[0]


def test_saved_mllib_models_reproduce_the_predictions_and_thresholds_come_from_val(spark, stage):
    from pyspark.ml import PipelineModel
    from pyspark.ml.functions import vector_to_array

    _, features_dir, baseline_dir, _ = stage
    model = PipelineModel.load(str(baseline_dir / feat.MLLIB_FOLDER))
    scored = model.transform(spark.read.parquet(str(features_dir)).where("split in ('val', 'test')"))
    probability = [vector_to_array(f"probability_{i}")[1].alias(f"p{i}") for i in range(len(LABELS))]
    rows = scored.select("image_id", "split", "labels", *probability).collect()
    saved = {row.image_id: row.probabilities for row in spark.read.parquet(str(baseline_dir)).collect()}
    test = [row for row in rows if row.split == "test"]
    assert len(test) == len(saved)
    for row in test:
        np.testing.assert_allclose([row[f"p{i}"] for i in range(len(LABELS))], saved[row.image_id], rtol=1e-6)
    val = [row for row in rows if row.split == "val"]
    labels = np.array([row.labels for row in val])
    scores = np.array([[row[f"p{i}"] for i in range(len(LABELS))] for row in val], np.float32)
    thresholds = json.loads((baseline_dir / "_manifest.json").read_text())["model"]["thresholds"]
    assert list(thresholds.values()) == pytest.approx(tune_thresholds(labels, scores))


def test_report_on_the_baseline_equals_sklearn(spark, stage, tmp_path):
    _, features_dir, baseline_dir, counts = stage
    metrics = report(spark, str(baseline_dir), str(tmp_path / "report"))
    rows = spark.read.parquet(str(baseline_dir)).collect()
    labels = np.array([row.labels for row in rows])
    scores = np.array([row.probabilities for row in rows])
    aurocs = []
    for i, name in enumerate(LABELS):
        if 0 < labels[:, i].sum() < len(labels):
            aurocs.append(roc_auc_score(labels[:, i], scores[:, i]))
            assert metrics["per_label"][name]["auroc"] == pytest.approx(aurocs[-1], abs=1e-12), name
        else:
            assert metrics["per_label"][name]["auroc"] is None
    assert metrics["macro"]["auroc"] == pytest.approx(np.mean(aurocs), abs=1e-12)
    assert metrics["model"]["name"] == feat.BASELINE_MODEL and metrics["n_images"] == len(rows)
    manifest = json.loads((features_dir / "_manifest.json").read_text())
    assert manifest["counts"]["baseline_test_macro_auroc"] == pytest.approx(np.mean(aurocs), abs=1e-12)
    assert counts["baseline_test_macro_auroc"] == manifest["counts"]["baseline_test_macro_auroc"]


def test_a_dataset_without_image_size_is_refused_and_the_previous_output_kept(spark, stage, tiny_raw, config):
    _, features_dir, _, _ = stage
    before = sorted(p.name for p in Path(features_dir).iterdir())
    with pytest.raises(ValueError, match="not an images_<size> dataset"):
        feat.features(spark, str(tiny_raw[0]), str(features_dir), config.features)
    assert sorted(p.name for p in Path(features_dir).iterdir()) == before
