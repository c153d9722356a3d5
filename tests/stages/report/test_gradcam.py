"""Grad-CAM: heatmaps of hand-built Keras models whose outputs depend only on known image regions equal
what that dependence implies; peaks, boxes and hit fractions on hand-computed cases; and the report run
end to end by Spark (synthetic dump -> ingest -> preprocess -> score with such a model -> report), its
choices and figures checked against pandas, Petastorm and numpy."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import read_rows
from PIL import Image

from cxr_spark.datasets.model_card import MODEL_CARD, MODEL_FILE
from cxr_spark.stages.report.gradcam import (GradCam, GradcamRequest, bbox_table, boxed_scored, default_bbox,
                                             feature_layer)
from cxr_spark.stages.report.job import report
from cxr_spark.stages.report.overlays import hit_fraction, in_boxes, overlay_path, peak_point
from cxr_spark.stages.score import score
from cxr_spark.stages.train.models import build_model

L = tf.keras.layers
SIZE = 32
# (top, left, bottom, right): rows top..bottom-1 and columns left..right-1 of the input. Not square, so a
# swapped x and y shows. Effusion looks at the mediastinum and heart, Mass at the lower left chest wall.
REGIONS = {"Effusion": (8, 12, 22, 19), "Mass": (20, 2, 28, 11)}


def _region_features(inputs, regions: list[tuple[int, int, int, int]], size: int):
    """Channel i: the image (summed over its channels) inside region i, zero elsewhere; standard layers only."""
    branches = []
    for i, (top, left, bottom, right) in enumerate(regions):
        copy = L.Conv2D(1, 1, use_bias=False, kernel_initializer="ones", name=f"copy{i}")(inputs)
        margins = ((top, size - bottom), (left, size - right))
        branches.append(L.ZeroPadding2D(margins, name=f"pad{i}")(L.Cropping2D(margins, name=f"crop{i}")(copy)))
    return L.Concatenate(name="regions")(branches)


def region_model(regions: list[tuple[int, int, int, int]], size: int = SIZE, nested: bool = False) -> tf.keras.Model:
    """Output i = sigmoid(mean over the image of channel i): it depends on region i of the image only.
    ``nested``: the features sit in a backbone model fed three gray channels, as in the zoo's DenseNet."""
    inputs = tf.keras.Input((size, size, 1), name="image")
    if nested:
        rgb_in = tf.keras.Input((size, size, 3))
        pooled = L.GlobalAveragePooling2D(name="gap")(_region_features(rgb_in, regions, size))
        backbone = tf.keras.Model(rgb_in, pooled, name="backbone")
        features = backbone(L.Concatenate(name="gray_to_rgb")([inputs, inputs, inputs]))
    else:
        features = L.GlobalAveragePooling2D(name="gap")(_region_features(inputs, regions, size))
    head = L.Dense(len(regions), activation="sigmoid", use_bias=False, kernel_initializer="identity",
                   name="probabilities")(features)
    return tf.keras.Model(inputs, head, name="regions_model")


def _mask(region, size: int = SIZE) -> np.ndarray:
    top, left, bottom, right = region
    mask = np.zeros((size, size), bool)
    mask[top:bottom, left:right] = True
    return mask


def _expected_peak(image: np.ndarray, region) -> tuple[int, int] | None:
    """The hottest cell a model that looks only at ``region`` must have: the image's largest positive
    value inside it, first in row-major order; None when nothing there is positive."""
    inside = np.where(_mask(region), image, -np.inf)
    if not inside.max() > 0:
        return None
    row, column = np.unravel_index(np.argmax(inside), image.shape)
    return int(row), int(column)


@pytest.mark.parametrize("nested", [False, True])
def test_each_heatmap_is_the_image_inside_the_region_its_output_depends_on(nested, tmp_path):
    regions = list(REGIONS.values())
    model = region_model(regions, nested=nested)
    model.save(tmp_path / MODEL_FILE)
    model = tf.keras.models.load_model(tmp_path / MODEL_FILE, compile=False)  # as score and report load it
    rng = np.random.default_rng(4)
    images = rng.normal(0, 1, (5, SIZE, SIZE)).astype(np.float32)
    images[:, 0, SIZE - 1] = 50.0  # the brightest pixel of every image lies outside both regions
    images[4] = -np.abs(images[4])  # nothing positive anywhere: no peak
    before = model(images[..., None], training=False).numpy()
    cam = GradCam(model)
    assert cam.layer.name == "regions" and cam.target == "logit"
    outputs = [0, 1, 0, 1, 0]
    maps = cam(images[..., None], outputs, batch_size=2)  # batches of 2, 2 and 1
    assert maps.shape == (5, SIZE, SIZE)
    for image, output, heatmap in zip(images, outputs, maps):
        region = regions[output]
        # Grad-CAM of such a model: a positive multiple of the image's positive part inside the region
        expected = np.where(_mask(region), np.maximum(image, 0), 0)
        if expected.max() > 0:
            np.testing.assert_allclose(heatmap / heatmap.max(), expected / expected.max(), atol=1e-5)
        else:
            assert heatmap.max() == 0
        cell = _expected_peak(image, region)
        point = peak_point(heatmap, width=1024, height=512)
        assert point == (None if cell is None else ((cell[1] + 0.5) * 1024 / SIZE, (cell[0] + 0.5) * 512 / SIZE))
    # the model is left as it was: its sigmoid back, no layer still recording
    np.testing.assert_array_equal(model(images[..., None], training=False).numpy(), before)
    assert "call" not in vars(cam.layer) and cam.head.activation.__name__ == "sigmoid"


def test_the_default_layer_of_each_zoo_model_is_its_deepest_feature_map():
    names = {"small_cnn": "relu4", "alexnet": "conv4", "densenet121": "relu", "resnet50v2": "post_relu"}
    for model_name, layer_name in names.items():
        model = build_model(model_name, 64, 2, seed=0)
        layer = feature_layer(model)
        assert layer.name == layer_name and len(layer.output_shape) == 4, model_name
    with pytest.raises(ValueError, match="no layer 'gap' with a 4-D"):
        feature_layer(build_model("small_cnn", 64, 2, seed=0), "gap")


def test_peaks_boxes_and_hit_fraction_on_a_hand_computed_case():
    heatmap = np.zeros((4, 4), np.float32)
    heatmap[1, 2] = heatmap[3, 0] = 0.9  # a tie: the first in row-major order wins
    assert peak_point(heatmap, width=1024, height=512) == (2.5 * 256, 1.5 * 128)
    assert peak_point(np.zeros((4, 4)), 1024, 1024) is None
    box = (10.0, 20.0, 30.0, 40.0)  # x 10..40, y 20..60
    peaks = [(10.0, 20.0), (40.0, 60.0), (40.01, 30.0), None, (100.0, 100.0)]
    boxes = [[box], [box], [box], [box], [box, (90.0, 95.0, 20.0, 10.0)]]
    hits = [in_boxes(point, image_boxes) for point, image_boxes in zip(peaks, boxes)]
    assert hits == [True, True, False, False, True]  # edges count; no peak does not
    assert hit_fraction(hits) == {"boxed_images": 5, "peaks_in_box": 3, "bbox_hit_fraction": 0.6}
    assert hit_fraction([]) == {"boxed_images": 0, "peaks_in_box": 0, "bbox_hit_fraction": None}
    assert overlay_path("Pneumonia", "train/PNEUMONIA/a b.jpeg", {"gradcam/Pneumonia/train_PNEUMONIA_a_b.png"}) \
        == "gradcam/Pneumonia/train_PNEUMONIA_a_b-2.png"


def test_boxes_come_from_nihs_csv_or_the_raw_dataset_behind_the_images(spark, tmp_path):
    csv_file = tmp_path / "BBox_List_2017.csv"
    csv_file.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Infiltrate,1,2,3,4\n"
                        "00000002_000.png,Effusion,5.5,6,7,8\n00000003_000.png,Unheard Of,1,1,1,1\n")
    rows = sorted(tuple(row) for row in bbox_table(spark, str(csv_file)).collect())
    assert rows == [("00000001_000.png", "Infiltration", 1.0, 2.0, 3.0, 4.0),
                    ("00000002_000.png", "Effusion", 5.5, 6.0, 7.0, 8.0)]  # NIH's spelling read; bad row left out
    raw, images = tmp_path / "raw", tmp_path / "images_32"
    images.mkdir()
    (images / "_manifest.json").write_text(json.dumps({"inputs": {"raw": {"url": f"file://{raw}"}}}))
    assert default_bbox(spark, f"file://{images}") is None  # no raw/_bbox: no boxes
    bbox_table(spark, str(csv_file)).write.parquet(str(raw / "_bbox"))
    assert default_bbox(spark, f"file://{images}") == f"file://{raw}/_bbox"
    for source in (raw, raw / "_bbox"):
        assert sorted(tuple(row) for row in bbox_table(spark, str(source)).collect()) == rows


def test_boxed_images_are_the_scored_ones_with_a_box_for_a_predicted_finding(spark):
    predictions = spark.createDataFrame(
        [("a", "test", [0.2, 0.9]), ("b", "test", [0.7, 0.1]), ("c", "test", [0.4, 0.3]), ("d", "test", [0.9, 0.9])],
        "image_id string, split string, probabilities array<float>")
    boxes = spark.createDataFrame(
        [("a", "Effusion", 1.0, 2.0, 3.0, 4.0), ("a", "Effusion", 5.0, 6.0, 7.0, 8.0), ("b", "Effusion", 0.0, 0.0, 1.0, 1.0),
         ("c", "Mass", 9.0, 9.0, 9.0, 9.0), ("e", "Effusion", 0.0, 0.0, 5.0, 5.0), ("d", "Atelectasis", 0.0, 0.0, 5.0, 5.0)],
        "image_id string, finding string, x double, y double, w double, h double")
    for limit, expected in ((5, [("b", 0), ("a", 0), ("c", 1)]), (1, [("b", 0), ("c", 1)]), (0, [])):
        rows, counts = boxed_scored(predictions, boxes, ["Effusion", "Mass"], limit)
        assert sorted((row["image_id"], row["label"]) for row in rows) == sorted(expected), limit
        assert counts == {"Effusion": 2, "Mass": 1}  # e is not scored; nobody predicts Atelectasis
    rows, _ = boxed_scored(predictions, boxes, ["Effusion", "Mass"], 5)
    a = next(row for row in rows if row["image_id"] == "a")
    assert sorted(a["boxes"]) == [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]] and a["p"] == pytest.approx(0.2)
    assert [row["rank"] for row in sorted(rows, key=lambda row: (row["label"], row["rank"]))] == [1, 2, 1]


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def scored(spark, tiny_images, tmp_path_factory):
    """The tiny images dataset scored by a region model for Effusion and Mass (real score, real files)."""
    images, counts = tiny_images
    folder = tmp_path_factory.mktemp("gradcam")
    model_dir = folder / "model"
    model_dir.mkdir()
    region_model(list(REGIONS.values())).save(model_dir / MODEL_FILE)
    normalization = {"mode": "train_mean_std", "mean": counts["normalization"]["mean"],
                     "std": counts["normalization"]["std"], "equalize": False}
    card = {"model_version": "regions-1", "model": "regions", "task": "multilabel", "labels": list(REGIONS),
            "input_size": SIZE, "normalization": normalization, "thresholds": dict.fromkeys(REGIONS, 0.5),
            "history": {}}
    (model_dir / MODEL_CARD).write_text(json.dumps(card))
    score(spark, str(images), str(model_dir), str(folder / "predictions"), "test")
    films = {row.image_id: (row.image, row.width, row.height, row.split)
             for row in read_rows(images, ["image_id", "image", "width", "height", "split"])}
    return folder, images, model_dir, normalization, films


def _expected_point(films: dict, normalization: dict, image_id: str, finding: str) -> tuple[float, float] | None:
    image, width, height, _ = films[image_id]
    cell = _expected_peak((image.astype(np.float32) - normalization["mean"]) / normalization["std"], REGIONS[finding])
    return None if cell is None else ((cell[1] + 0.5) * width / SIZE, (cell[0] + 0.5) * height / SIZE)


def test_report_draws_the_top_images_and_counts_peaks_in_boxes(spark, scored, tmp_path):
    folder, images, model_dir, normalization, films = scored
    predictions = pd.read_parquet(folder / "predictions")
    test_ids = sorted(predictions["image_id"])
    # Effusion: three scored images with a box, two of them around the peak the model must have and one
    # away from it, so the hit fraction is 2/3 (they need not be among the top images).
    chosen = [image_id for image_id in test_ids if _expected_point(films, normalization, image_id, "Effusion")][:3]
    assert len(chosen) == 3
    lines = ["Image Index,Finding Label,Bbox [x,y,w,h],,,"]
    for n, image_id in enumerate(chosen):
        x, y = _expected_point(films, normalization, image_id, "Effusion")
        if n == 2:  # the opposite corner of the image from the peak
            x, y = (10.0 if x > 64 else 110.0), (10.0 if y > 64 else 110.0)
        lines.append(f"{image_id},Effusion,{x - 3},{y - 2},6,4")
    train_id = next(image_id for image_id, film in films.items() if film[3] == "train")
    lines.append(f"{train_id},Effusion,0,0,128,128")  # not scored: not counted
    lines.append(f"{test_ids[0]},Atelectasis,0,0,128,128")  # a finding the model does not predict
    (tmp_path / "BBox_List_2017.csv").write_text("\n".join(lines) + "\n")

    out = tmp_path / "report"
    metrics = report(spark, str(folder / "predictions"), str(out),
                     gradcam=GradcamRequest(images=str(images), bbox=str(tmp_path / "BBox_List_2017.csv"), top_k=2))
    gradcam = json.loads((out / "metrics.json").read_text())["gradcam"]
    assert gradcam == json.loads(json.dumps(metrics["gradcam"]))
    assert (gradcam["status"], gradcam["layer"], gradcam["target"], gradcam["top_k"]) == ("computed", "regions",
                                                                                          "logit", 2)
    assert gradcam["model"] == f"file://{model_dir}"  # from the predictions' manifest
    effusion, mass = gradcam["per_label"]["Effusion"], gradcam["per_label"]["Mass"]
    assert (effusion["boxed_images_scored"], effusion["boxed_images"], effusion["peaks_in_box"]) == (3, 3, 2)
    assert effusion["bbox_hit_fraction"] == pytest.approx(2 / 3)
    assert (mass["boxed_images"], mass["bbox_hit_fraction"]) == (0, None)

    # the top images by pandas; their peaks by numpy on the Petastorm rows
    for i, finding in enumerate(REGIONS):
        ranked = predictions.assign(p=predictions["probabilities"].map(lambda p: float(p[i])),
                                    y=predictions["labels"].map(lambda y: int(y[i])))
        expected = ranked.sort_values(["p", "image_id"], ascending=[False, True]).head(2)
        top = gradcam["per_label"][finding]["top"]
        assert [entry["image_id"] for entry in top] == list(expected["image_id"]), finding
        assert [entry["probability"] for entry in top] == pytest.approx(list(expected["p"]), abs=1e-7)
        assert [entry["label"] for entry in top] == list(expected["y"])
        for entry in top:
            point = _expected_point(films, normalization, entry["image_id"], finding)
            assert entry["peak"] == (None if point is None else pytest.approx(list(point))), entry
            boxed = {chosen[0]: True, chosen[1]: True, chosen[2]: False} if finding == "Effusion" else {}
            assert entry["peak_in_box"] == boxed.get(entry["image_id"])  # None: no box for it
            with Image.open(out / entry["overlay"]) as overlay:
                assert overlay.format == "PNG" and overlay.size == (256, 256) and overlay.mode == "RGB"
                pixels = np.asarray(overlay).astype(int)
            assert (np.abs(pixels[..., 0] - pixels[..., 2]) > 60).any()  # coloured where the heatmap is hot
            assert entry["overlay"] == f"gradcam/{finding}/{entry['image_id'][:-4]}.png"

    page = (out / "report.html").read_text()
    section = page.split('<section id="gradcam">')[1].split("</section>")[0]
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', section)) == 4
    assert "0.667" in section and "n/a" in section  # Effusion's and Mass's hit fractions
    markdown = (out / "report.md").read_text()
    for entry in effusion["top"] + mass["top"]:
        assert re.search(rf"!\[[^\]]*\]\({re.escape(entry['overlay'])}\)", markdown)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["counts"]["gradcam_overlays"] == 4 and manifest["inputs"]["gradcam_images"]["url"] == f"file://{images}"


def test_without_images_or_model_the_report_says_why_there_is_no_gradcam(spark, scored, tmp_path, caplog):
    folder = scored[0]
    with caplog.at_level("INFO", logger="cxr_spark.stages.report.gradcam"):
        metrics = report(spark, str(folder / "predictions"), str(tmp_path / "report"))
    assert metrics["gradcam"]["status"] == "skipped" and "--images" in caplog.text
    assert not (tmp_path / "report" / "gradcam").exists()
    section = (tmp_path / "report" / "report.html").read_text().split('<section id="gradcam">')[1]
    assert section.split("</section>")[0].count("Not computed: not requested") == 1


def test_the_command_line_takes_the_gradcam_inputs():
    from cxr_spark.cli import args_parser

    args = args_parser().parse_args(["report", "--predictions", "p", "--out", "o", "--images", "i", "--bbox",
                                     "BBox_List_2017.csv", "--gradcam-top-k", "5", "--gradcam-layer", "relu"])
    assert (args.images, args.model, args.bbox, args.gradcam_top_k, args.gradcam_layer,
            args.gradcam_max_boxed) == ("i", None, "BBox_List_2017.csv", 5, "relu", 100)
