"""Deployment files: the Docker images install through scripts/install.sh (the steps CI runs), never a
copy of them; what they COPY exists; the compose cluster and the Spark properties files are complete."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cxr_spark.io.session import read_properties

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_call_the_install_script_instead_of_repeating_it(name):
    text = (ROOT / "docker" / name).read_text()
    runs = " ".join(re.findall(r"^RUN (.+?)(?<!\\)$", text, flags=re.M | re.S))
    assert "bash scripts/install.sh" in runs
    install_steps = ("pip install", "horovod", "tensorflow-cpu", "HOROVOD_WITH_TENSORFLOW", "petastorm")
    assert not [step for step in install_steps if step in runs], f"{name} repeats install.sh's steps"
    for source in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"{name} copies {path}, which the repository does not have"


def test_gpu_image_selects_cuda_tensorflow_and_nccl_through_the_script():
    text = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert "TF_PACKAGE='tensorflow[and-cuda]'" in text and "HOROVOD_GPU_OPERATIONS=NCCL" in text
    script = (ROOT / "scripts" / "install.sh").read_text()
    assert '"$TF_PACKAGE==2.15.1"' in script


def test_compose_runs_a_master_two_workers_and_a_submit_container():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"master", "worker1", "worker2", "submit"}
    for worker in ("worker1", "worker2"):
        command = services[worker]["command"]
        assert command[-1] == "spark://master:7077" and command[command.index("-c") + 1] == "1"
    assert any(volume.startswith("..:") for volume in compose["x-cxr-spark"]["volumes"])


@pytest.mark.parametrize("name", ["local", "standalone", "yarn"])
def test_spark_properties_files_parse_and_size_arrow_batches_for_images(name):
    properties = read_properties(ROOT / "conf" / "spark" / f"{name}.conf")
    assert int(properties["spark.sql.execution.arrow.maxRecordsPerBatch"]) <= 256
    assert properties["spark.python.worker.reuse"] == "true"
    assert ("spark.master" in properties) == (name == "local")  # clusters take --master from spark-submit


def test_no_job_file_or_library_module_sets_a_master():
    for path in [*ROOT.glob("spark_jobs/*.py"), *ROOT.glob("cxr_spark/**/*.py")]:
        assert not re.search(r"\.master\(|spark\.master", path.read_text()), f"{path} hard-codes a master"
