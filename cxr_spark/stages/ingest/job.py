"""Ingest: an image dump (plus NIH metadata, or a Kaggle folder layout) into the ``raw`` Petastorm dataset and
a quarantine; with ``--images-out``, into ``images_<size>`` too, from the same read of each file.

This module is the command and the run: its checks, its commit (``raw`` and ``images_<size>`` together) and
its counts, which must reconcile (files listed = ingested + skipped + quarantined, and the same for the
metadata and box rows) or the run fails. How the two passes share the work, and why, is in
docs/ingest.md.
"""
from __future__ import annotations

import argparse
import logging
import time

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from cxr_spark.cli_flags import conf_default
from cxr_spark.config import IngestConfig, PipelineConfig, PreprocessConfig, load_config, override
from cxr_spark.core.guards import UsageError, check_metadata_file, check_paths, check_run
from cxr_spark.core.image_formats import CONVERSIONS
from cxr_spark.core.labels import LABELS
from cxr_spark.core.metadata import dump_data_kind
from cxr_spark.datasets.bbox import BBOX_DIR, read_bbox
from cxr_spark.datasets.fields import petastorm_dataset
from cxr_spark.datasets.manifest import finish_manifest
from cxr_spark.datasets.quarantine import QUARANTINE_DIR, write_counted
from cxr_spark.datasets.raw import RawSchema
from cxr_spark.io.commit import OutputRun
from cxr_spark.io.parquet_parts import image_rows_writer, move_parquet_parts, written_rows
from cxr_spark.io.storage import listed_paths, local_path, to_url
from cxr_spark.stages.ingest.copy_pass import (copy_in_spark, copy_in_workers, previous_images, schema_columns,
                                               write_images_beside)
from cxr_spark.stages.ingest.decide import decide_fates, existing_dataset, ingest_quarantine, list_fates, plan_writes
from cxr_spark.stages.ingest.nih_metadata import check_metadata, read_metadata
from cxr_spark.stages.ingest.pass1 import KAGGLE_CLASSES, detect_layout, encode_labels, index_files, list_files

log = logging.getLogger(__name__)

MODES = ("overwrite", "append-new")
LAYOUTS = ("auto", "nih", "kaggle")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True,
                        help="folder of PNG, JPEG and DICOM files (*.png, *.jpg, *.jpeg, *.dcm, *.dicom), searched "
                             "recursively: NIH images_NNN/images/, Kaggle train|val|test/NORMAL|PNEUMONIA/, or flat")
    parser.add_argument("--metadata", help="Data_Entry_2017*.csv[.gz] (2017 or v2020 layout); without it and "
                                           "outside the Kaggle layout every image is 'unlabeled'")
    parser.add_argument("--split-lists", help="folder with NIH train_val_list.txt and test_list.txt (official split)")
    parser.add_argument("--bbox", help="BBox_List_2017.csv[.gz]: written into the dataset as <out>/_bbox/ (Parquet)")
    parser.add_argument("--out", required=True, help="raw dataset to write (replaced atomically)")
    parser.add_argument("--mode", choices=MODES, default="overwrite",
                        help="overwrite (default) or append-new: add only files whose image id and content are "
                             "not already in --out; the dataset is still replaced atomically")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto",
                        help="auto (default: Kaggle when --images has train|val|test/NORMAL|PNEUMONIA), nih, kaggle")
    parser.add_argument("--val-fraction", type=float,
                        help=f"fraction of patients for validation {conf_default('ingest', 'val_fraction')}")
    parser.add_argument("--test-fraction", type=float, help="fraction of patients for test, without split lists "
                                                            f"{conf_default('ingest', 'test_fraction')}")
    parser.add_argument("--split-seed", type=int,
                        help=f"seed of the patient-wise split {conf_default('ingest', 'split_seed')}")
    parser.add_argument("--images-out", help="also write the images_<size> dataset (what preprocess would write from "
                                             "--out) in the same pass over the files: each file is read once and "
                                             "decoded once; a file that does not decode is quarantined here")
    parser.add_argument("--size", type=int,
                        help=f"with --images-out: output side in pixels {conf_default('preprocess', 'size')}")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write the dataset even when no image could be used or no metadata row matched an "
                             "image (by default such a run fails and leaves --out as it was)")


def _paths(images: str, metadata: str | None, split_lists: str | None, bbox: str | None, out: str,
           images_out: str | None) -> tuple[dict, dict]:
    """The run's inputs and outputs by flag, the outputs with the manifest stage an existing one must have."""
    return ({"--images": images, "--metadata": metadata, "--split-lists": split_lists, "--bbox": bbox},
            {"--out": (out, "ingest"), "--images-out": (images_out, "preprocess")})


def check_args(args: argparse.Namespace) -> None:
    """The run's paths and metadata file, before Spark starts (:mod:`cxr_spark.core.guards`)."""
    if args.size is not None and not args.images_out:
        raise UsageError("--size needs --images-out")
    inputs, outputs = _paths(args.images, args.metadata, args.split_lists, args.bbox, args.out, args.images_out)
    check_run(inputs, outputs, folders=("--images", "--split-lists"))
    check_metadata_file(args.metadata)


def settings(args: argparse.Namespace, config: PipelineConfig) -> dict[str, IngestConfig | PreprocessConfig]:
    """The run's settings by conf section: [ingest] with the flags given, and with ``--images-out`` the
    [preprocess] settings of the images it writes (what ``--print-config`` shows)."""
    sections: dict[str, IngestConfig | PreprocessConfig] = {
        "ingest": override(config.ingest, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                           split_seed=args.split_seed)}
    if args.images_out:
        sections["preprocess"] = override(config.preprocess, size=args.size)
    return sections


def main(spark: SparkSession, args: argparse.Namespace, config: PipelineConfig) -> dict:
    run = settings(args, config)
    return ingest(spark, args.images, args.out, args.metadata, args.split_lists, run["ingest"],
                  bbox=args.bbox, mode=args.mode, layout=args.layout, images_out=args.images_out,
                  images_settings=run.get("preprocess"), allow_empty=args.allow_empty)


# ---------------------------------------------------------------------------------------------
# per-row logic (pure pandas over pure functions; run inside executors)


# ---------------------------------------------------------------------------------------------
# the job


def ingest(spark: SparkSession, images: str, out: str, metadata: str | None = None,
           split_lists: str | None = None, settings: IngestConfig | None = None, *,
           bbox: str | None = None, mode: str = "overwrite", layout: str = "auto",
           images_out: str | None = None, images_settings: PreprocessConfig | None = None,
           allow_empty: bool = False) -> dict:
    """Ingest ``images`` (+ ``metadata``) into the raw dataset at ``out``; returns the run's counts.

    ``mode="append-new"`` keeps every row of the existing ``out`` and adds only files whose image id
    is not in it (a file whose id is there with the same SHA-256 is ``skipped_existing``; with other
    content it is quarantined as ``duplicate_image_id``).

    With ``images_out`` (and ``images_settings``, the preprocess settings) pass 1 also decodes and resizes
    every file, and ``images_<size>`` is written at ``images_out`` from those rows once ``raw`` is in place: the
    dataset preprocess would write from ``out``, without reading the images a second time. Its counts
    are under ``"images"``. In append-new mode the existing ``images_out`` must be the one made from the
    existing ``out``; its rows are kept.

    Nothing is lost: no output may overlap an input, only datasets of their kinds are replaced, ``out`` and
    ``images_out`` are committed together (:class:`cxr_spark.io.commit.OutputRun`), and a run in which no
    image could be used, or no metadata row matched an image, fails unless ``allow_empty``.
    """
    if mode not in MODES or layout not in LAYOUTS:
        raise ValueError(f"mode must be one of {MODES} (got {mode!r}); layout one of {LAYOUTS} (got {layout!r})")
    inputs, outputs = _paths(images, metadata, split_lists, bbox, out, images_out)
    check_paths(inputs, {flag: path for flag, (path, _) in outputs.items()})
    check_metadata(spark, metadata)
    settings = settings or load_config().ingest
    started = time.time()
    if layout == "auto":
        layout = detect_layout(spark, images)
    if layout == "kaggle" and metadata:
        raise ValueError("the Kaggle layout takes its labels from the folders; do not pass --metadata")
    if images_out and images_settings is None:
        raise ValueError("images_out needs images_settings (the preprocess settings: size, row groups, files per "
                         "split)")
    with OutputRun(spark, {"raw": (out, "ingest"), "images": (images_out, "preprocess")}) as run:
        existing = existing_dataset(spark, out) if mode == "append-new" else None
        kept_images = previous_images(spark, out, images_out) if images_out and existing is not None else None
        stage = run.scratch("raw")
        counts = _ingest(spark, images, out, metadata, split_lists, settings, bbox, mode, layout, existing, stage,
                         images_out, images_settings, started, run.tmp("raw"), allow_empty)
        if images_out:
            counts["images"] = write_images_beside(spark, out, run.tmp("raw"), images_out, run.tmp("images"), stage,
                                                   images_settings, kept_images, started, allow_empty,
                                                   data=dump_data_kind(local_path(to_url(images))))
        run.commit()
    return counts


def _ingest(spark: SparkSession, images: str, out: str, metadata: str | None, split_lists: str | None,
            settings: IngestConfig, bbox: str | None, mode: str, layout: str, existing: DataFrame | None,
            stage: str, images_out: str | None, images_settings: PreprocessConfig | None, started: float, tmp: str,
            allow_empty: bool) -> dict:
    files = list_files(spark, images)  # listed once: pass 1 (index) and pass 2 (copy) share the file index
    paths = listed_paths(files)
    if not allow_empty and not paths:
        raise UsageError(f"--images {images}: no image file in it (*.png, *.jpg, *.jpeg, *.dcm, *.dicom in any "
                         f"case, searched recursively); nothing is replaced (--allow-empty to write an empty dataset)")
    read_files = local_path(to_url(images)) is not None
    meta = None
    if metadata:
        meta = (read_metadata(spark, metadata, split_lists, settings)
                .withColumn("meta_rank", F.row_number().over(
                    Window.partitionBy("image_id").orderBy(F.monotonically_increasing_id())))
                .cache())
    boxes = read_bbox(spark, bbox).cache() if bbox else None
    first_meta = meta.where("meta_rank = 1").drop("meta_rank") if meta is not None else None
    # Python workers that read the files write raw's rows from the bytes in hand (no second read), when
    # raw is local too; the decisions after pass 1 check their choice and pass 2 copies the rest.
    in_workers = settings.worker_file_io and read_files and local_path(to_url(out)) is not None
    size = images_settings.size if images_out else None
    # With images_out local too, they write the images_<size> rows of the files they keep in raw as well
    # (each task one file per split).
    image_parts = ((local_path(f"{stage}/images"), images_settings.row_group_size_mb * 2**20)
                   if in_workers and size and local_path(to_url(images_out)) is not None else None)
    plan = (plan_writes(spark, files, paths, layout, first_meta, existing, images_settings if image_parts else None)
            if in_workers else None)
    index = index_files(spark, files, paths, layout, f"{stage}/index", size, read_files, plan, f"{stage}/raw",
                        settings.row_group_size_mb * 2**20, image_parts).cache()  # no image bytes
    decided = decide_fates(index, first_meta, layout, existing).cache()
    fates = list_fates(decided)

    pending = sum(fate["count"] for fate in fates if fate["accepted"] and not fate["skipped"]
                  and not (image_parts and fate["raw_written"]))
    if size and pending:  # which pass-1 index rows become images_<size> rows, for write_images_beside
        (decided.where("reason IS NULL AND NOT skipped" + (" AND NOT raw_written" if image_parts else ""))
         .select("path", "image_id").write.parquet(f"{stage}/accepted"))
    accepted = decided.where("reason IS NULL AND NOT skipped")
    accepted = accepted.withColumn("labels", encode_labels("labels"))
    with petastorm_dataset(spark, tmp, RawSchema, settings.row_group_size_mb):
        if in_workers:
            if existing is not None:
                image_rows_writer(schema_columns(existing).write, "png").parquet(tmp)
            move_parquet_parts(local_path(f"{stage}/raw"), local_path(tmp))
            rest = [fate for fate in fates if fate["accepted"] and not fate["skipped"] and not fate["raw_written"]]
            copy_in_workers(spark, accepted.where("NOT raw_written"), tmp, settings.row_group_size_mb,
                             sum(fate["bytes"] for fate in rest), sum(fate["count"] for fate in rest))
        else:
            raw = schema_columns(copy_in_spark(files, accepted))
            if existing is not None:
                raw = schema_columns(existing).unionByName(raw)
            image_rows_writer(raw.write, "png").parquet(tmp)
    quarantined = write_counted(ingest_quarantine(decided, meta, boxes), f"{tmp}/{QUARANTINE_DIR}", "raw")
    if boxes is not None:
        (boxes.where("reason IS NULL").select("image_id", "finding", "x", "y", "w", "h")
         .coalesce(1).write.parquet(f"{tmp}/{BBOX_DIR}"))
    counts = _count(spark, tmp, fates, *quarantined, meta, boxes, existing)
    _refuse_if_empty(counts, metadata, allow_empty)
    extra = {"task": "multilabel", "labels": list(LABELS), "layout": layout, "mode": mode,
             "data": dump_data_kind(local_path(to_url(images)))}
    if layout == "kaggle":
        extra.update(task="binary", binary_label=KAGGLE_CLASSES["PNEUMONIA"])
    finish_manifest(spark, tmp, "ingest", started,
                    config=settings, inputs={"images": to_url(images), "metadata": metadata,
                                             "split_lists": split_lists, "bbox": bbox},
                    counts=counts, extra=extra)
    for frame in (index, decided, meta, boxes):
        if frame is not None:
            frame.unpersist()
    return counts


def _refuse_if_empty(counts: dict, metadata: str | None, allow_empty: bool) -> None:
    """A run whose dataset would have no row, or in which no metadata row matched an image, cannot be
    what was meant (an empty folder, a metadata file of another dump): it fails before anything is replaced,
    unless ``allow_empty``."""
    if allow_empty:
        return
    reasons = ", ".join(f"{n} {reason}" for reason, n in counts["quarantine_reasons"].items()) or "none"
    if metadata and counts["files_listed"] and not counts["metadata_matched"]:
        raise UsageError(f"no row of --metadata {metadata} ({counts['metadata_rows']} rows) matched any of the "
                         f"{counts['files_listed']} image files (quarantined: {reasons}); nothing is replaced "
                         f"(--allow-empty to write the result anyway)")
    if not sum(counts["splits"].values()):
        raise UsageError(f"no usable image: {counts['files_listed']} image files listed, "
                         f"{counts['quarantined']} quarantined (reasons: {reasons}); nothing is replaced "
                         f"(--allow-empty to write an empty dataset)")


def _count(spark: SparkSession, tmp: str, fates: list[dict], by_kind: dict[str, int], by_reason: dict[str, int],
           meta: DataFrame | None, boxes: DataFrame | None, existing: DataFrame | None) -> dict:
    """The run's counts, and the checks that they reconcile. The files listed and their fates come from
    :func:`list_fates` (what pass 1 and the decisions made of them), the quarantine's rows by kind and by reason
    from the job that wrote it; the rows in ``raw`` are summed from what was written and must be the accepted
    files (and the existing rows) the fates name."""
    used = [fate for fate in fates if fate["accepted"]]
    by_split = {row["split"]: row["count"] for row in existing.groupBy("split").count().collect()} if (
        existing is not None) else {}
    previous = sum(by_split.values())
    for fate in used:  # the splits the decisions gave; raw's footers check only their total (no job reads it)
        if not fate["skipped"]:
            by_split[fate["split"]] = by_split.get(fate["split"], 0) + fate["count"]
    total = written_rows(spark, tmp)
    metadata_rows = metadata_matched = 0
    if meta is not None:  # a metadata row is matched when it is the first for an image id that was listed
        metadata_rows = meta.count()
        metadata_matched = sum(fate["count"] for fate in fates if fate["first_with_metadata"])
    counts = {
        "files_listed": sum(fate["count"] for fate in fates),
        "ingested": total - previous,
        "quarantined": by_kind.get("file", 0),
        "metadata_rows": metadata_rows,
        "metadata_matched": metadata_matched,
        "metadata_quarantined": by_kind.get("metadata", 0),
        "formats": {fmt: sum(f["count"] for f in used if f["format"] == fmt and not f["skipped"])
                    for fmt in ("png", "jpeg", "dicom")},
        # images whose pixels decode_grayscale converts to 8-bit gray (raw keeps the original bytes)
        "converted": {name: sum(f["count"] for f in used if f["conversion"] == name and not f["skipped"])
                      for name in CONVERSIONS},
        "splits": dict(sorted(by_split.items())),
        "quarantine_reasons": dict(sorted(by_reason.items())),
    }
    if existing is not None:
        counts.update(skipped_existing=sum(f["count"] for f in used if f["skipped"]),
                      previous_rows=previous, rows=total)
    if boxes is not None:
        counts.update(bbox_rows=boxes.count(), bbox_written=written_rows(spark, f"{tmp}/{BBOX_DIR}"),
                      bbox_quarantined=by_kind.get("bbox", 0))
    problems = []
    if total != sum(by_split.values()):
        problems.append(f"raw has {total} rows, not the {sum(by_split.values())} the decisions accepted"
                        + (" and the existing dataset had" if existing is not None else ""))
    if counts["files_listed"] != counts["ingested"] + counts.get("skipped_existing", 0) + counts["quarantined"]:
        problems.append("files_listed != ingested + skipped_existing + quarantined")
    if counts["metadata_rows"] != counts["metadata_matched"] + counts["metadata_quarantined"]:
        problems.append("metadata_rows != metadata_matched + metadata_quarantined")
    if boxes is not None and counts["bbox_rows"] != counts["bbox_written"] + counts["bbox_quarantined"]:
        problems.append("bbox_rows != bbox_written + bbox_quarantined")
    if problems:
        raise RuntimeError(f"ingest counts do not reconcile ({'; '.join(problems)}): {counts}")
    return counts
