"""Experiment tracking with MLflow: a training run with its settings, per-epoch metrics and model folder, a
registered model version per trained model, the report's test metrics on the same run, and ``models:/``
URIs resolved to a model folder.

The store is a local folder unless the user names a server: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``,
else ``[tracking] uri`` in conf, else ``mlruns/`` beside the model folder (the demo: ``runs/demo/mlruns``).
Nothing here contacts a network unless one of those is an ``http(s)://`` server. Only the driver logs, after
Horovod returns rank 0's history and model: no Horovod or Spark worker imports MLflow.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any

from cxr_spark.config import TrackingConfig
from cxr_spark.core.guards import MODEL_URI_PREFIX, UsageError

log = logging.getLogger(__name__)

#: Where ``--model`` names a registered model version (``models:/NAME/VERSION``) or alias (``models:/NAME@ALIAS``).
REGISTRY_SCHEME = MODEL_URI_PREFIX


def store_uri(settings: TrackingConfig, beside: str, flag: str | None = None) -> str | None:
    """The tracking URI a run logs to, or None when tracking is switched off.

    ``beside`` is the model folder's path: the default store is ``mlruns/`` in its parent folder.

    >>> store_uri(TrackingConfig(True, "", "cxr-spark", "cxr-spark-{task}"), "/runs/demo/model")
    'file:///runs/demo/mlruns'
    >>> store_uri(TrackingConfig(False, "", "x", "x"), "/runs/demo/model") is None
    True
    """
    if flag:
        return _as_uri(flag)
    if not settings.enabled:
        return None
    chosen = os.environ.get("MLFLOW_TRACKING_URI") or settings.uri
    if chosen:
        return _as_uri(chosen)
    from cxr_spark.io.storage import local_path, to_url

    parent = local_path(to_url(beside).rstrip("/").rsplit("/", 1)[0])
    return _as_uri(os.path.join(parent or os.getcwd(), "mlruns"))


def _as_uri(location: str) -> str:
    """A plain path as a ``file://`` URI (MLflow reads a bare path relative to the working folder)."""
    return location if "://" in location or location.startswith("databricks") else "file://" + os.path.abspath(location)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _flat(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    """Nested settings as MLflow params: ``augmentation.zoom = 0.1``; lists and None as JSON text."""
    if isinstance(value, dict):
        for key, item in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) or value is None else str(value)
    return out


def flat_params(settings: dict) -> dict[str, str]:
    """
    >>> flat_params({"a": 1, "b": {"c": [1, 2], "d": None}})
    {'a': '1', 'b.c': '[1, 2]', 'b.d': 'null'}
    """
    return _flat("", settings, {})


def open_experiment(uri: str, settings: TrackingConfig) -> str:
    """The id of the configured experiment in the store at ``uri``, created when new (so that a store that
    cannot be written fails before training, not after it)."""
    client = _client(uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    return experiment.experiment_id if experiment else client.create_experiment(settings.experiment)


def start_training_run(uri: str, experiment_id: str, settings: TrackingConfig, task: str, params: dict,
                       history: dict, tags: dict[str, str]) -> dict:
    """Open a run with ``params``, the per-epoch ``history`` (step = epoch) and ``tags``, and reserve a new
    version of the registered model for it; return what ``model.json`` records of both.

    The version is created before the model folder is logged so that the ``model.json`` inside it can name
    its own version; :func:`finish_training_run` logs the folder the version points at.
    """
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    run = client.create_run(experiment_id, run_name=f"train-{task}", tags=tags)
    run_id = run.info.run_id
    metrics = [Metric(key, float(value), 0, step) for key, values in history.items()
               for step, value in enumerate(values, start=1)]
    param_list = [Param(key, value[:6000]) for key, value in flat_params(params).items()]
    for start in range(0, max(len(metrics), len(param_list), 1), 100):  # MLflow's batch limit for params
        client.log_batch(run_id, metrics=metrics[start:start + 100], params=param_list[start:start + 100],
                         tags=[RunTag(k, v) for k, v in tags.items()] if start == 0 else [])
    name = settings.registered_model.replace("{task}", task)
    try:
        client.create_registered_model(name, description="cxr-spark chest X-ray models (NIH ChestX-ray14 findings)")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id)
    return {"tracking_uri": uri, "experiment": settings.experiment, "run_id": run_id,
            "registered_model": name, "version": int(version.version),
            "model_uri": f"{REGISTRY_SCHEME}{name}/{version.version}"}


def finish_training_run(record: dict, model_folder: str, ok: bool = True) -> None:
    """Log the model folder (``model.keras``, ``model.json``, curves) as the run's ``model`` artifacts and close
    the run; a run whose model could not be written is closed FAILED and its version removed."""
    client = _client(record["tracking_uri"])
    if ok:
        client.log_artifacts(record["run_id"], model_folder, "model")
    else:
        client.delete_model_version(record["registered_model"], str(record["version"]))
    client.set_terminated(record["run_id"], "FINISHED" if ok else "FAILED")


def log_test_metrics(record: dict, metrics: dict, prefix: str = "test") -> None:
    """The report's metrics on the training run: ``test_macro_auroc`` with its interval
    (``test_macro_auroc_ci_lower``/``_upper``), ``test_auroc.<finding>``, the same for average precision, and
    ``test_ece.<finding>`` (``prefix``: the split scored)."""
    from mlflow.entities import Metric

    values = {f"{prefix}_macro_auroc": metrics["macro"].get("auroc"),
              f"{prefix}_macro_average_precision": metrics["macro"].get("average_precision"),
              f"{prefix}_images": metrics.get("n_images")}
    interval = metrics["macro"].get("auroc_ci") or (None, None)
    values.update({f"{prefix}_macro_auroc_ci_lower": interval[0], f"{prefix}_macro_auroc_ci_upper": interval[1]})
    for name, row in metrics["per_label"].items():
        values[f"{prefix}_auroc.{name}"] = row.get("auroc")
        values[f"{prefix}_average_precision.{name}"] = row.get("average_precision")
        values[f"{prefix}_ece.{name}"] = (row.get("calibration") or {}).get("ece")
    client = _client(record["tracking_uri"])
    client.log_batch(record["run_id"], metrics=[Metric(k, float(v), 0, 0) for k, v in values.items() if v is not None])
    log.info("report: test metrics logged to MLflow run %s (%s)", record["run_id"], record["tracking_uri"])


def is_registry_uri(model: str | None) -> bool:
    return bool(model) and model.startswith(REGISTRY_SCHEME)


def _registry_store(model_uri: str, tracking_uri: str | None) -> str:
    """The store a ``models:/`` URI is looked up in: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UsageError(f"--model {model_uri}: a registered model needs --tracking-uri or MLFLOW_TRACKING_URI")
    return uri


def check_registered_model(model_uri: str, tracking_uri: str | None) -> None:
    """Refuse (one line) a ``models:/`` URI whose store is not given or that names no registered version."""
    from mlflow.exceptions import MlflowException

    uri = _registry_store(model_uri, tracking_uri)
    name, sep, alias = model_uri[len(REGISTRY_SCHEME):].partition("@")
    if not sep:
        name, _, version = name.rpartition("/")
    client = _client(_as_uri(uri))
    try:
        client.get_model_version_by_alias(name, alias) if sep else client.get_model_version(name, version)
    except MlflowException as error:
        raise UsageError(f"--model {model_uri}: no such registered model version in {_as_uri(uri)} "
                         f"({error.message.splitlines()[0]})") from error


def download_registered_model(model_uri: str, tracking_uri: str | None) -> str:
    """The model folder a ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` URI names, downloaded into a new
    temporary folder (the caller removes it)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = _registry_store(model_uri, tracking_uri)
    mlflow.set_tracking_uri(_as_uri(uri))
    mlflow.set_registry_uri(_as_uri(uri))
    folder = tempfile.mkdtemp(prefix="cxr-spark-model-")
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=folder)
    except MlflowException as error:
        shutil.rmtree(folder, ignore_errors=True)
        raise UsageError(f"--model {model_uri}: not found in {_as_uri(uri)} "
                         f"({error.message.splitlines()[0]})") from error
