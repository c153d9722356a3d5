"""Drift monitoring: the PSI against a numpy computation of its formula, the run's Spark histograms against
numpy histograms of what the model saw, a dump of the reference's kind of images not drifted and the same
images inverted (255 - x) drifted, a warning, the exit code kept without --fail-on-drift and 5 with it (results
committed either way), and a model without a reference scoring as before. The slow part trains a real model:
its ``model.json`` reference against a numpy recomputation over the val split, then the demo's kind of
images (the synthetic dump) through ``cxr-spark batch-score``."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_batch_score import (MEAN, STD, _cli, _expected_input, _expected_probabilities, _film, _image_files,
                              _read_store, _save_model)

from cxr_spark.core.drift import DRIFT_THRESHOLD, PSI_FLOOR, drift_summary, drifted, mean_intensity, psi, sampling_noise
from cxr_spark.core.labels import LABELS
from cxr_spark.datasets.model_card import MODEL_CARD
from cxr_spark.stages.batch_score.job import EXIT_DRIFTED, EXIT_SCORED, RUNS_DIR, batch_score

PROBABILITY_EDGES = np.linspace(0.0, 1.0, 11)
INTENSITY_EDGES = np.linspace(0.0, 255.0, 11)


def _numpy_psi(reference, observed, floor=PSI_FLOOR) -> float:
    """The documented formula, written out here: shares floored at ``floor``, sum (o - r) ln(o / r)."""
    r = np.asarray(reference, float) / np.sum(reference)
    o = np.asarray(observed, float) / np.sum(observed)
    r, o = np.where(r < floor, floor, r), np.where(o < floor, floor, o)
    return float(np.sum((o - r) * np.log(o / r)))


def _intensity(path: Path) -> float:
    """The mean of the model input, back on the 0-255 scale, from the test's own OpenCV decoding."""
    return float(_expected_input(path.read_bytes()).astype(np.float64).mean() * STD + MEAN)


def _write_films(folder: Path, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i:03d}.png")
        paths[-1].write_bytes(cv2.imencode(".png", _film(rng, int(rng.integers(40, 90)),
                                                         int(rng.integers(40, 90))))[1].tobytes())
    return paths


def _inverted(files: list[Path], folder: Path) -> list[Path]:
    """The same films with their pixels inverted (255 - x), as new PNGs."""
    folder.mkdir(parents=True)
    out = []
    for path in files:
        image = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_GRAYSCALE)
        out.append(folder / path.name)
        out[-1].write_bytes(cv2.imencode(".png", 255 - image)[1].tobytes())
    return out


def _run_record(store: Path, run_id: str) -> dict:
    return json.loads((store / RUNS_DIR / f"{run_id}.json").read_text())


# ---------------------------------------------------------------------------------------------
# pure


def test_psi_is_the_documented_formula_with_its_floor_for_empty_bins():
    rng = np.random.default_rng(5)
    for _ in range(20):
        reference, observed = rng.integers(0, 40, 10), rng.integers(0, 40, 10)
        reference[rng.integers(0, 10)] = observed[rng.integers(0, 10)] = 0  # an empty bin in each
        assert psi(reference.tolist(), observed.tolist()) == pytest.approx(_numpy_psi(reference, observed), rel=1e-12)
    # by hand: half and half against all in the first bin; the empty bin counts as a share of 1e-4
    expected = (1 - 0.5) * np.log(1 / 0.5) + (1e-4 - 0.5) * np.log(1e-4 / 0.5)
    assert psi([5, 5], [8, 0]) == pytest.approx(expected, rel=1e-12) and expected > 4
    assert psi([3, 7, 0], [3, 7, 0]) == 0.0
    assert psi([0, 0], [1, 2]) is None
    assert drifted({"Mass": DRIFT_THRESHOLD, "Edema": DRIFT_THRESHOLD + 1e-9}, 0.1) == ["Edema"]  # over, not at
    assert drifted({"Mass": 0.0}, 0.25) == ["input"]


def test_sampling_noise_is_the_psi_chance_gives_two_samples_of_one_distribution():
    """Against the chi-square approximation where bins are well filled, and against an independent simulation
    (its own generator, 10x the draws) where sparse bins make the floor count; then which names are listed as
    within noise."""
    rng = np.random.default_rng(9)
    filled = np.array([0.1, 0.3, 0.3, 0.2, 0.1, 0, 0, 0, 0, 0])
    reference = rng.multinomial(20000, filled).tolist()
    assert sampling_noise(reference, [2000]) == pytest.approx(4 * (1 / 20000 + 1 / 2000), rel=0.15)
    sparse = np.array([0.05, 0.3, 0.3, 0.2, 0.1, 0.05, 0, 0, 0, 0])
    reference = rng.multinomial(85, sparse).tolist()
    shares = np.array(reference) / 85
    simulated = np.mean([psi(rng.multinomial(85, shares).tolist(), rng.multinomial(50, shares).tolist())
                         for _ in range(2000)])
    assert sampling_noise(reference, [50]) == pytest.approx(simulated, rel=0.15)
    # a same-kind run of 50 that drifts by chance (PSI over 0.2, below the simulated 95th percentile) is within
    # noise; a run with every image in the top bin is drifted and not within noise
    chance = np.percentile([psi(rng.multinomial(85, shares).tolist(), rng.multinomial(50, shares).tolist())
                            for _ in range(2000)], 95)
    same_kind = next(sample for sample in (rng.multinomial(50, shares).tolist() for _ in range(1000))
                     if 0.25 < psi(reference, sample) < 0.8 * chance)
    model = {"bins": 10, "images": 85, "probabilities": {"Mass": reference, "Edema": reference},
             "input_intensity": rng.multinomial(5000, filled).tolist()}
    record = drift_summary(model, {"Mass": same_kind, "Edema": [0] * 9 + [50]}, rng.multinomial(5000, filled).tolist())
    assert record["drifted"] == ["Mass", "Edema"] and record["psi"]["Edema"] > 5
    assert record["within_noise"] == ["Mass"] and record["sampling_noise"]["input"] < 0.01


def test_mean_intensity_recovers_the_pixel_mean_from_the_normalised_input():
    from cxr_spark.core.normalization import model_inputs

    pixels = np.random.default_rng(2).integers(0, 256, (6, 16, 16)).astype(np.uint8)
    for spec in ({"mean": MEAN, "std": STD}, {"mean": 0.0, "std": 255.0}):
        np.testing.assert_allclose(mean_intensity(model_inputs(pixels, spec), spec), pixels.mean(axis=(1, 2)),
                                   atol=1e-3)


# ---------------------------------------------------------------------------------------------
# batch-score with a reference made here


@pytest.fixture(scope="module")
def referenced_model(tmp_path_factory) -> tuple[Path, dict]:
    """The untrained small_cnn of test_batch_score with a drift reference counted here by numpy over 120
    films of the dumps' kind (its "validation split")."""
    folder = tmp_path_factory.mktemp("drift") / "model"
    _save_model(folder, dict.fromkeys(LABELS, 0.5))
    val = _write_films(folder.parent / "val", 120, seed=21)
    probabilities = np.stack(list(_expected_probabilities(folder, val).values()))
    card = json.loads((folder / MODEL_CARD).read_text())
    card["drift_reference"] = {
        "split": "val", "bins": 10, "images": len(val),
        "probabilities": {label: np.histogram(probabilities[:, i], PROBABILITY_EDGES)[0].tolist()
                          for i, label in enumerate(LABELS)},
        "input_intensity": np.histogram([_intensity(p) for p in val], INTENSITY_EDGES)[0].tolist()}
    (folder / MODEL_CARD).write_text(json.dumps(card))
    return folder, card


def test_same_kind_is_not_drifted_and_inverted_pixels_are_with_the_exit_code_kept_or_5(spark, referenced_model,
                                                                                      tmp_path, caplog):
    model_dir, card = referenced_model
    reference = card["drift_reference"]
    files = _write_films(tmp_path / "dump", 40, seed=22)
    store = tmp_path / "store"
    summary = batch_score(spark, str(tmp_path / "dump"), str(model_dir), str(store))
    drift = _run_record(store, summary["run_id"])["drift"]
    # the run's histograms, counted by Spark, against numpy's of what the model saw
    intensity = np.histogram([_intensity(p) for p in files], INTENSITY_EDGES)[0].tolist()
    probabilities = np.stack(list(_expected_probabilities(model_dir, files).values()))
    assert drift["histograms"]["input_intensity"] == intensity
    for i, label in enumerate(LABELS):
        assert drift["histograms"]["probabilities"][label] == np.histogram(probabilities[:, i],
                                                                           PROBABILITY_EDGES)[0].tolist()
        assert drift["psi"][label] == pytest.approx(
            _numpy_psi(reference["probabilities"][label], drift["histograms"]["probabilities"][label]), abs=1e-6)
    assert drift["input_psi"] == pytest.approx(_numpy_psi(reference["input_intensity"], intensity), abs=1e-6)
    assert drift["input_psi"] < DRIFT_THRESHOLD and "input" not in drift["drifted"]
    assert drift["threshold"] == DRIFT_THRESHOLD and drift["status"] == "ok"
    assert summary["drifted"] == drift["drifted"] and summary["exit_code"] == EXIT_SCORED

    inverted = _inverted(files, tmp_path / "inverted")
    inverted_intensity = np.histogram([_intensity(p) for p in inverted], INTENSITY_EDGES)[0].tolist()
    with caplog.at_level("WARNING", logger="cxr_spark.stages.batch_score.job"):
        flagged = batch_score(spark, str(tmp_path / "inverted"), str(model_dir), str(store))
    drift = _run_record(store, flagged["run_id"])["drift"]
    assert drift["histograms"]["input_intensity"] == inverted_intensity
    assert drift["input_psi"] == pytest.approx(_numpy_psi(reference["input_intensity"], inverted_intensity),
                                               abs=1e-6)
    assert drift["input_psi"] > DRIFT_THRESHOLD and "input" in drift["drifted"] == flagged["drifted"]
    assert f"run {flagged['run_id']} drifted" in caplog.text and "input" in caplog.text
    assert flagged["exit_code"] == EXIT_SCORED  # without --fail-on-drift the code keeps its meaning
    stored = _read_store(spark, store)
    assert set(stored.loc[stored["run_id"] == flagged["run_id"], "content_sha256"]) == {
        hashlib.sha256(p.read_bytes()).hexdigest() for p in inverted}

    failing_store = tmp_path / "failing_store"
    failed = batch_score(spark, str(tmp_path / "inverted"), str(model_dir), str(failing_store), fail_on_drift=True)
    assert failed["exit_code"] == EXIT_DRIFTED == 5 and "input" in failed["drifted"]
    assert _run_record(failing_store, failed["run_id"])["counts"]["exit_code"] == 5
    assert len(_read_store(spark, failing_store)) == len(inverted)  # committed before exiting 5


def test_a_model_without_a_reference_scores_and_records_why_no_drift_was_measured(spark, referenced_model, tmp_path,
                                                                                caplog):
    model_dir = Path(shutil.copytree(referenced_model[0], tmp_path / "old_model"))
    card = {k: v for k, v in referenced_model[1].items() if k != "drift_reference"}
    (model_dir / MODEL_CARD).write_text(json.dumps(card))
    files = _write_films(tmp_path / "dump", 4, seed=23)
    with caplog.at_level("INFO", logger="cxr_spark.stages.batch_score.job"):
        summary = batch_score(spark, str(tmp_path / "dump"), str(model_dir), str(tmp_path / "store"),
                              fail_on_drift=True)
    assert (summary["scored"], summary["exit_code"], summary["drifted"]) == (len(files), EXIT_SCORED, [])
    drift = _run_record(tmp_path / "store", summary["run_id"])["drift"]
    assert drift["status"] == "no reference" and "no drift_reference" in drift["reason"]
    assert drift["psi"] is None and drift["input_psi"] is None
    assert sum("no drift measured" in line for line in caplog.text.splitlines()) == 1
    assert (tmp_path / "store" / "_monitor.html").exists()


# ---------------------------------------------------------------------------------------------
# a real training's reference, the demo's kind of images


@pytest.fixture(scope="module")
def trained(spark, tiny_images, config, tmp_path_factory) -> Path:
    from cxr_spark.config import override
    from cxr_spark.stages.train.job import train

    images, _ = tiny_images
    folder = tmp_path_factory.mktemp("trained")
    settings = override(config.train, num_proc=2, epochs=1, batch_size=4, warmup_epochs=0, augment=False)
    train(spark, str(images), str(folder / "model"), settings, checkpoint_dir=str(folder / "checkpoints"))
    return folder / "model"


@pytest.mark.slow  # a 2-process Horovod training and two command-line runs
def test_the_trained_reference_and_the_demos_kind_of_images_inverted_or_not(trained, tiny_images, tiny_dump,
                                                                           tmp_path):
    import tensorflow as tf
    from conftest import read_rows

    images, counts = tiny_images
    card = json.loads((trained / MODEL_CARD).read_text())
    reference = card["drift_reference"]
    rows = [row for row in read_rows(images, ["image_id", "split", "image"]) if row.split == "val"]
    assert reference["images"] == len(rows) == counts["splits"]["val"] and reference["bins"] == 10
    pixels = np.stack([row.image for row in rows]).astype(np.float64)
    norm = card["normalization"]
    assert not norm["equalize"]
    keras_model = tf.keras.models.load_model(trained / "model.keras", compile=False)
    outputs = keras_model.predict(((pixels - norm["mean"]) / norm["std"]).astype(np.float32)[..., None], verbose=0)
    assert reference["input_intensity"] == np.histogram(pixels.mean(axis=(1, 2)), INTENSITY_EDGES)[0].tolist()
    for i, label in enumerate(card["labels"]):
        assert reference["probabilities"][label] == np.histogram(outputs[:, i], PROBABILITY_EDGES)[0].tolist()

    dump = _image_files(tiny_dump)
    store = tmp_path / "store"
    args = ["--model", str(trained), "--out", str(store)]
    done = _cli(["--images", str(tiny_dump), *args], tmp_path)
    assert done.returncode == EXIT_SCORED, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1].split(": ", 1)[1])
    drift = _run_record(store, summary["run_id"])["drift"]
    assert summary["scored"] == len(dump) and "input" not in summary["drifted"]
    assert drift["input_psi"] < DRIFT_THRESHOLD

    _inverted(dump, tmp_path / "inverted")
    done = _cli(["--images", str(tmp_path / "inverted"), *args], tmp_path)
    assert done.returncode == EXIT_SCORED, done.stderr[-3000:]  # drifted, and the code keeps its meaning
    summary = json.loads(done.stdout.strip().splitlines()[-1].split(": ", 1)[1])
    assert "input" in summary["drifted"] and _run_record(store, summary["run_id"])["drift"]["input_psi"] > 0.2
    assert "drifted from the model's validation split" in done.stderr and "input" in done.stderr
    done = _cli(["--images", str(tmp_path / "inverted"), "--model", str(trained), "--out", str(tmp_path / "s2"),
                 "--fail-on-drift"], tmp_path)
    assert done.returncode == EXIT_DRIFTED, done.stderr[-3000:]
    assert len(_read_store_files(tmp_path / "s2")) > 0  # committed before exiting 5
    assert len(list((tmp_path / "s2" / RUNS_DIR).glob("*.json"))) == 1


def _read_store_files(store: Path) -> list[Path]:
    return sorted(store.glob("scored_date=*/run_id=*/*.parquet"))


def test_equalising_models_judge_the_findings_but_not_the_input(spark):
    """Equalisation gives every film a mean near 128, so a dark dump looks like the reference: the run must not
    claim the input is fine, nor flag it; the findings are judged as before."""
    from cxr_spark.stages.batch_score.drift import drift_record

    reference = {"bins": 10, "images": 100, "probabilities": {"Mass": [100] + [0] * 9},
                 "input_intensity": [0] * 5 + [100] + [0] * 4}
    rows = [([0.95], 20.0)] * 40  # every film dark and every probability high: both drifted
    scored = spark.createDataFrame(rows, "probabilities array<float>, input_intensity double")
    plain = drift_record({"drift_reference": reference, "normalization": {"equalize": False}}, scored, ["Mass"], "r1")
    equalised = drift_record({"drift_reference": reference, "normalization": {"equalize": True}}, scored, ["Mass"],
                             "r2")
    assert plain["drifted"] == ["Mass", "input"] and plain["input_psi"] > 5
    assert equalised["drifted"] == ["Mass"] and equalised["input_psi"] is None and equalised["input_not_measured"]
