"""What is never lost: outputs that cannot eat inputs, refusals instead of empty datasets, only datasets of
their kind replaced, raw and images_<size> committed together through kills at every step, one run per
output, and a reason and a detail on every quarantine row. Real Spark runs, real files, real SIGKILLs."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from faults import cli, kill_at_step, spark_conf

from cxr_spark.config import override
from cxr_spark.core.guards import UsageError, canonical, check_metadata_file, check_paths, check_replaceable_local
from cxr_spark.core.metadata import HEADER
from cxr_spark.datasets.quarantine import QUARANTINE_DIR
from cxr_spark.io.commit import OutputLockedError, settle
from cxr_spark.stages.ingest.job import ingest

N_IMAGES, REMOVED = 30, 6


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its SHA-256, and every folder: the tree byte for byte."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(folder.rglob("*"))}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """Dump A (30 synthetic images in NIH's layout) and dump B: A without 6 of its files."""
    from cxr_spark.synth import SynthSpec, generate

    a = tmp_path_factory.mktemp("dump_a")
    generate(SynthSpec(out=str(a), n_images=N_IMAGES, size=64, seed=11, processes=1))
    b = tmp_path_factory.mktemp("dump_b") / "dump"
    shutil.copytree(a, b)
    for png in sorted(b.rglob("*.png"))[:REMOVED]:
        png.unlink()
    return a, b


def _ingest(spark, config, dump: Path, out: Path, images_out: Path | None = None, **kwargs) -> dict:
    images_settings = override(config.preprocess, size=32, min_files_per_split=2) if images_out else None
    return ingest(spark, str(dump), str(out), str(dump / "Data_Entry_2017.csv"), str(dump), config.ingest,
                  images_out=str(images_out) if images_out else None, images_settings=images_settings, **kwargs)


@pytest.fixture(scope="module")
def previous(spark, dumps, tmp_path_factory, config) -> Path:
    """Run A's raw and images_32 datasets, made once; each test works on a copy (:func:`_copy`)."""
    runs = tmp_path_factory.mktemp("previous") / "runs"
    counts = _ingest(spark, config, dumps[0], runs / "raw", runs / "images_32")
    assert sum(counts["splits"].values()) == N_IMAGES
    return runs


def _copy(previous: Path, tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    shutil.copytree(previous, runs)
    return runs


# ---------------------------------------------------------------------------------------------
# outputs never overlap inputs


def test_an_output_equal_to_containing_or_inside_an_input_is_refused(tmp_path):
    dump = tmp_path / "d" / "dump"
    (dump / "images_001" / "images").mkdir(parents=True)
    (tmp_path / "link").symlink_to(dump)
    inputs = {"--images": str(dump), "--metadata": str(dump / "Data_Entry_2017.csv")}
    for out, word in [(dump, "is"), (tmp_path / "d", "contains"), (dump / "images_001" / "raw", "is inside"),
                      (tmp_path / "link", "is"), (f"{tmp_path}/d/x/../dump", "is"), (f"file://{dump}", "is")]:
        with pytest.raises(UsageError, match=f"^--out {out} {word} --images"):
            check_paths(inputs, {"--out": str(out)})
    check_paths(inputs, {"--out": str(tmp_path / "d" / "raw")})  # a sibling is fine
    with pytest.raises(UsageError, match="--out .* and --images-out .* overlap"):
        check_paths(inputs, {"--out": str(tmp_path / "raw"), "--images-out": str(tmp_path / "raw" / "images")})
    # the metadata file under the output counts too
    with pytest.raises(UsageError, match="contains --metadata"):
        check_paths({"--metadata": str(tmp_path / "meta" / "Data_Entry_2017.csv")}, {"--out": str(tmp_path / "meta")})
    assert canonical("HDFS://nn:8020/a/./b/../c/") == "hdfs://nn:8020/a/c"
    with pytest.raises(UsageError, match="is inside --images"):
        check_paths({"--images": "hdfs://nn/dumps/d1"}, {"--out": "hdfs://NN/dumps/d1/raw"})


@pytest.mark.parametrize("where", ["dump", "parent"])
def test_ingest_refuses_an_out_over_its_dump_in_one_line_before_spark_starts(dumps, tmp_path, where):
    folder = tmp_path / "d"
    dump = folder / "dump"
    shutil.copytree(dumps[0], dump)
    before = _snapshot(folder)
    out = dump if where == "dump" else folder
    done = cli(["ingest", "--images", str(dump), "--metadata", str(dump / "Data_Entry_2017.csv"),
                "--out", str(out)], tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"cxr-spark ingest: error: --out {out} {'is' if where == 'dump' else 'contains'} --images {dump}: writing "
        f"it would replace the input; choose an --out outside every input"]
    assert _snapshot(folder) == before


# ---------------------------------------------------------------------------------------------
# only a dataset of ours, of the same kind, is replaced


def test_only_a_dataset_of_the_same_kind_is_replaced(spark, config, dumps, previous, tmp_path):
    runs = _copy(previous, tmp_path)
    mine = tmp_path / "my_notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's own file")
    before = _snapshot(tmp_path)
    with pytest.raises(UsageError, match="has no readable _manifest.json"):
        check_replaceable_local("--out", str(mine), "ingest")
    with pytest.raises(UsageError, match="is an images dataset .*not a raw dataset"):
        check_replaceable_local("--out", str(runs / "images_32"), "ingest")
    check_replaceable_local("--out", str(runs / "raw"), "ingest")
    # the same refusals from the library call (Spark's filesystem: any URL), before anything is written
    with pytest.raises(UsageError, match="has no readable _manifest.json"):
        _ingest(spark, config, dumps[1], mine)
    with pytest.raises(UsageError, match="is an images dataset"):
        _ingest(spark, config, dumps[1], runs / "images_32")
    with pytest.raises(UsageError, match="is a raw dataset"):
        _ingest(spark, config, dumps[1], runs / "raw2", images_out=runs / "raw")
    assert _snapshot(tmp_path) == before


def test_what_may_be_replaced_is_decided_from_the_folder_and_its_manifest(tmp_path):
    from cxr_spark.core.guards import check_run, replace_problem

    assert replace_problem("ingest", None, None) is None and replace_problem("ingest", [], None) is None  # nothing there
    assert replace_problem("ingest", ["part-0.parquet", "_manifest.json"], {"stage": "ingest"}) is None
    assert replace_problem("ingest", ["notes.txt"], None) == (
        "exists and is not an output of cxr-spark (it has no readable _manifest.json); replacing it would delete it")
    assert replace_problem("ingest", ["x"], ["not", "a", "dict"]).startswith("exists and is not an output")
    assert replace_problem("train", ["_manifest.json"], {"stage": "preprocess"}) == (
        "is an images dataset (written by 'preprocess'), not a model folder; replacing it would delete it")
    assert replace_problem("score", ["_manifest.json"], {"stage": "other"}).startswith(
        "is an output (written by 'other'), not a predictions dataset")
    dataset, foreign, empty, file = tmp_path / "raw", tmp_path / "mine", tmp_path / "empty", tmp_path / "file"
    for folder in (dataset, foreign, empty):
        folder.mkdir()
    (dataset / "_manifest.json").write_text('{"stage": "ingest"}')
    (foreign / "_manifest.json").write_text("{not json")
    file.write_text("x")
    for path in (dataset, empty, tmp_path / "missing"):
        check_replaceable_local("--out", str(path), "ingest")
    check_replaceable_local("--out", "hdfs://nn/raw", "ingest")  # other filesystems: checked at the swap
    with pytest.raises(UsageError, match=f"^--out {foreign} exists and is not an output .*; choose another --out"):
        check_replaceable_local("--out", str(foreign), "ingest")
    with pytest.raises(UsageError, match=f"^--out {file} is a file, not a folder"):
        check_replaceable_local("--out", str(file), "ingest")
    with pytest.raises(UsageError, match=f"^--in {tmp_path / 'nowhere'}: no such folder$"):
        check_run({"--in": str(tmp_path / "nowhere")}, {"--out": (str(tmp_path / "out"), "preprocess")},
                  folders=("--in",))
    with pytest.raises(UsageError, match="is inside --in"):  # the overlap is checked before the kind
        check_run({"--in": str(dataset)}, {"--out": (str(dataset / "x"), "preprocess")}, folders=("--in",))
    with pytest.raises(UsageError, match="is a raw dataset"):
        check_run({"--in": str(empty)}, {"--out": (str(dataset), "preprocess"), "--other": (None, "score")},
                  folders=("--in",))
    check_run({"--in": str(empty), "--bbox": None}, {"--out": (str(tmp_path / "new"), "preprocess"),
                                                     "--checkpoint-dir": (str(foreign), None)}, folders=("--in",))


def test_a_missing_or_unreadable_metadata_file_is_refused_naming_it(tmp_path):
    with pytest.raises(UsageError, match=f"^--metadata {tmp_path / 'none.csv'}: no such file$"):
        check_metadata_file(str(tmp_path / "none.csv"))
    broken = tmp_path / "Data_Entry_2017.csv.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(UsageError, match=f"^--metadata {broken}: cannot be read"):
        check_metadata_file(str(broken))
    check_metadata_file(None)
    check_metadata_file("s3a://bucket/Data_Entry_2017.csv")  # checked by ingest through Spark


# ---------------------------------------------------------------------------------------------
# a run that cannot be right does not replace a good one


def _broken_metadata(kind: str, good: Path, folder: Path) -> Path:
    path = folder / f"{kind}.csv"
    lines = good.read_text().splitlines()
    if kind == "random_bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "column_dropped":  # every line without its Patient ID
        path.write_text("".join(",".join(line.split(",")[:3] + line.split(",")[4:]) + "\n" for line in lines))
    elif kind == "png_renamed":
        path.write_bytes(next(good.parent.rglob("*.png")).read_bytes())
    elif kind == "gzip_of_another_table":
        path = folder / "other.csv.gz"
        path.write_bytes(gzip.compress(b"id,name,value\n1,a,2\n"))
    return path


@pytest.mark.parametrize("kind", ["random_bytes", "column_dropped", "png_renamed", "gzip_of_another_table"])
def test_a_metadata_file_of_another_layout_is_refused_naming_the_file(kind, dumps, tmp_path):
    broken = _broken_metadata(kind, dumps[0] / "Data_Entry_2017.csv", tmp_path)
    with pytest.raises(UsageError, match=f"^--metadata {broken}: not an NIH Data_Entry_2017 file"):
        check_metadata_file(str(broken))


def test_both_published_headers_with_bom_and_crlf_are_accepted(tmp_path):
    for number, text in enumerate([HEADER + "\n", HEADER + ",\r\n", "\ufeff" + HEADER + "\r\n"]):
        path = tmp_path / f"Data_Entry_{number}.csv"
        path.write_text(text + "00000001_000.png,No Finding,0,1,58,M,PA,2682,2749,0.143,0.143\n", newline="")
        check_metadata_file(str(path))
    gz = tmp_path / "Data_Entry_2017_v2020.csv.gz"
    gz.write_bytes(gzip.compress((HEADER + "\n").encode()))
    check_metadata_file(str(gz))


@pytest.mark.parametrize("kind", ["random_bytes", "column_dropped", "png_renamed", "empty_images_folder",
                                  "metadata_of_another_dump"])
def test_a_broken_input_leaves_the_previous_dataset_byte_for_byte(spark, config, dumps, previous, tmp_path, kind):
    runs = _copy(previous, tmp_path)
    dump = tmp_path / "dump"
    shutil.copytree(dumps[1], dump)
    metadata = dump / "Data_Entry_2017.csv"
    if kind == "empty_images_folder":
        shutil.rmtree(dump / "images_001")
        match = "no image file in it"
    elif kind == "metadata_of_another_dump":  # the published header, but none of its rows names a file here
        metadata.write_text(HEADER + "\n" + "".join(f"99999{i:03d}_000.png,No Finding,0,{99999000 + i},40,F,PA,"
                                                    f"1024,1024,0.14,0.14\n" for i in range(20)))
        match = "no row of --metadata .* matched any of the 24 image files"
    else:
        metadata = _broken_metadata(kind, dumps[0] / "Data_Entry_2017.csv", tmp_path)
        match = "not an NIH Data_Entry_2017 file"
    before = _snapshot(runs)
    with pytest.raises(UsageError, match=match):
        ingest(spark, str(dump), str(runs / "raw"), str(metadata), None, config.ingest,
               images_out=str(runs / "images_32"), images_settings=override(config.preprocess, size=32))
    assert _snapshot(runs) == before and _hidden(runs) == []


def test_allow_empty_writes_an_empty_dataset_when_asked(spark, config, dumps, previous, tmp_path):
    runs = _copy(previous, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    counts = ingest(spark, str(empty), str(runs / "raw"), None, None, config.ingest, allow_empty=True)
    assert counts["files_listed"] == 0 and spark.read.parquet(str(runs / "raw")).count() == 0


# ---------------------------------------------------------------------------------------------
# every quarantine row says why


def test_every_quarantine_row_has_a_reason_and_a_detail(spark, config, dumps, tmp_path):
    dump = tmp_path / "dump"
    shutil.copytree(dumps[1], dump)  # 6 metadata rows name files that are not there: no_image
    metadata = dump / "Data_Entry_2017.csv"
    present = {path.name for path in dump.rglob("*.png")}
    header, *rows = metadata.read_text().splitlines()
    listed = [row for row in rows if row.split(",")[0] in present]
    no_meta = listed[0].split(",")[0]  # a file whose metadata row is dropped: no_metadata
    bad_age = listed[1].split(",")
    bad_age[4] = "58Y?"  # unparseable_age
    kept = [",".join(bad_age) if row == listed[1] else row for row in rows if row != listed[0]]
    metadata.write_text("\n".join([header, *kept]) + "\n")
    (dump / "images_001" / "images" / "00099999_000.png").write_bytes(b"not a png")  # not_an_image
    counts = ingest(spark, str(dump), str(tmp_path / "raw"), str(metadata), str(dump), config.ingest)
    rows = spark.read.parquet(str(tmp_path / "raw" / QUARANTINE_DIR)).toPandas()
    reasons = dict(zip(rows["image_id"], rows["reason"]))
    details = dict(zip(rows["image_id"], rows["detail"]))
    assert reasons[no_meta] == "no_metadata" and details[no_meta] == "no row in the metadata CSV for this image id"
    assert reasons[bad_age[0]] == "unparseable_age" and "'58Y?'" in details[bad_age[0]]
    assert reasons["00099999_000.png"] == "not_an_image"
    assert list(rows["reason"]).count("no_image") == REMOVED
    assert rows["detail"].notna().all() and rows["reason"].notna().all(), rows[rows["detail"].isna()]
    assert counts["files_listed"] == sum(counts["splits"].values()) + counts["quarantined"]


# ---------------------------------------------------------------------------------------------
# one run per output; raw and images_<size> committed together, through kills at every step


def _ingest_args(dump: Path, runs: Path) -> list[str]:
    return ["ingest", "--images", str(dump), "--metadata", str(dump / "Data_Entry_2017.csv"),
            "--split-lists", str(dump), "--out", str(runs / "raw"), "--images-out", str(runs / "images_32"),
            "--size", "32"]


def _what_a_reader_sees(spark, runs: Path) -> tuple[int, int]:
    """raw's and images_32's row counts as a stage reads them (:func:`settle` first), after checking that
    images_32 was made from the raw dataset beside it (its manifest names raw's run)."""
    for name in ("raw", "images_32"):
        settle(spark, f"file://{runs / name}")
    raw = json.loads((runs / "raw" / "_manifest.json").read_text())
    images = json.loads((runs / "images_32" / "_manifest.json").read_text())
    assert images["inputs"]["raw"]["finished_at"] == raw["finished_at"], (raw, images["inputs"])
    return (spark.read.parquet(str(runs / "raw")).count(), spark.read.parquet(str(runs / "images_32")).count())


@pytest.mark.slow  # a command-line run per step, each starting Spark
@pytest.mark.parametrize("step, expected", [("written", N_IMAGES), ("committed", N_IMAGES - REMOVED),
                                            ("swapped 1 of 2", N_IMAGES - REMOVED), ("done", N_IMAGES - REMOVED)])
def test_a_killed_ingest_leaves_raw_and_images_of_one_run_and_the_next_run_cleans_up(
        spark, config, dumps, previous, tmp_path, step, expected):
    runs = _copy(previous, tmp_path)
    kill_at_step(_ingest_args(dumps[1], runs), step, tmp_path)
    assert _hidden(runs), "the killed run left nothing to recover: the kill came too late"
    assert _what_a_reader_sees(spark, runs) == (expected, expected)
    counts = _ingest(spark, config, dumps[1], runs / "raw", runs / "images_32")  # the next run
    assert sum(counts["splits"].values()) == N_IMAGES - REMOVED
    # logs: the killed run's log (the command line keeps one beside --out)
    assert _hidden(runs) == [] and sorted(p.name for p in runs.iterdir()) == ["images_32", "logs", "raw"]


@pytest.mark.slow
def test_two_ingests_to_one_out_one_is_refused_with_exit_4(spark, config, dumps, previous, tmp_path):
    runs = _copy(previous, tmp_path)
    args = _ingest_args(dumps[1], runs)
    # the first run holds the locks while it waits at its commit
    first = subprocess.Popen([sys.executable, "-m", "cxr_spark.cli", *args, "--spark-conf", str(spark_conf(tmp_path))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env={**os.environ, "PYSPARK_PYTHON": sys.executable, "CXR_SPARK_PAUSE_AT": "written"})
    try:
        for line in first.stderr:
            if "commit step: written: paused" in line:
                break
        else:
            pytest.fail(f"the first run ended with {first.wait()} before its commit")
        second = cli(args, tmp_path)
        assert second.returncode == 4, second.stderr[-3000:]
        assert f"output file://{runs / 'raw'} is locked by" in second.stderr
        with pytest.raises(OutputLockedError, match=r"held \d+ s"):
            _ingest(spark, config, dumps[1], runs / "raw", runs / "images_32")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert _what_a_reader_sees(spark, runs) == (N_IMAGES, N_IMAGES)  # the killed run had not committed


def test_preprocess_and_features_refuse_an_empty_input_and_leave_their_outputs(spark, config, previous, tmp_path):
    from cxr_spark.stages.features import features
    from cxr_spark.stages.preprocess import preprocess

    runs = _copy(previous, tmp_path)
    empty_dump = tmp_path / "empty_dump"
    empty_dump.mkdir()
    ingest(spark, str(empty_dump), str(tmp_path / "empty_raw"), None, None, config.ingest, allow_empty=True)
    images_settings = override(config.preprocess, size=32, min_files_per_split=1)
    before = _snapshot(runs)
    with pytest.raises(UsageError, match="no usable image among the 0 rows"):
        preprocess(spark, str(tmp_path / "empty_raw"), str(runs / "images_32"), images_settings)
    assert _snapshot(runs) == before and _hidden(runs) == []
    preprocess(spark, str(tmp_path / "empty_raw"), str(tmp_path / "empty_images"), images_settings, allow_empty=True)
    with pytest.raises(UsageError, match="has no image"):
        features(spark, str(tmp_path / "empty_images"), str(tmp_path / "features"), config.features)
    assert not (tmp_path / "features").exists()


def test_guard_details_urls_long_headers_and_long_first_lines(tmp_path):
    from cxr_spark.core.guards import check_folder, check_run, metadata_header_problem, read_first_line

    assert canonical("hdfs://nn/dataX/") == "hdfs://nn/dataX"
    # containment is by whole path components, whatever a folder's last letter, and a bare host is its root
    (tmp_path / "scansX" / "d1").mkdir(parents=True)
    with pytest.raises(UsageError, match="contains --images"):
        check_paths({"--images": str(tmp_path / "scansX" / "d1")}, {"--out": str(tmp_path / "scansX")})
    assert canonical("hdfs://nn:8020") == "hdfs://nn:8020"
    with pytest.raises(UsageError, match="^--out / contains --images"):  # the root holds every input
        check_paths({"--images": str(tmp_path / "scansX")}, {"--out": "/"})
    with pytest.raises(UsageError, match="^--out hdfs://nn:8020 contains --images"):
        check_paths({"--images": "hdfs://nn:8020/dumps"}, {"--out": "hdfs://nn:8020"})
    # a local name with "#" or "?" is a path, not a URL with a fragment or a query
    (tmp_path / "dump#1?x").mkdir()
    check_folder("--images", str(tmp_path / "dump#1?x"))
    with pytest.raises(UsageError, match="no such file"):  # a file: URL is a local path, checked here
        check_metadata_file(f"file://{tmp_path}/none.csv")
    header_of_120 = "Image Index," + "x" * 108  # shown whole up to 120 characters
    assert metadata_header_problem(header_of_120.encode() + b"\n") == f"its header is {header_of_120!r}"
    long_header = "Image Index," + "x" * 200
    assert metadata_header_problem(long_header.encode() + b"\n") == f"its header is {long_header[:117] + '...'!r}"
    (tmp_path / "long.csv").write_text("y" * 5000 + "\n")
    assert read_first_line(str(tmp_path / "long.csv")) == b"y" * 4096
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "_manifest.json").write_text('{"stage": "ingest"}')
    with pytest.raises(UsageError, match=f"^--out {tmp_path / 'raw'} is a raw dataset"):
        check_run({}, {"--out": (str(tmp_path / "raw"), "preprocess")})
