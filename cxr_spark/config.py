"""Typed, frozen pipeline configuration: defaults from ``conf/pipeline.toml``, overridden by flags.

Configs are plain frozen dataclasses of numbers and strings, so they pickle to executors as values.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_spark.io.session import CONF_DIR


@dataclass(frozen=True)
class IngestConfig:
    val_fraction: float
    test_fraction: float
    split_seed: int
    row_group_size_mb: int
    worker_file_io: bool


@dataclass(frozen=True)
class PreprocessConfig:
    size: int
    row_group_size_mb: int
    min_files_per_split: int


@dataclass(frozen=True)
class TrainConfig:
    model: str
    num_proc: int
    epochs: int
    batch_size: int
    learning_rate: float
    patience: int
    warmup_epochs: int
    weights: str
    seed: int
    shuffle_buffer: int
    input_workers: int
    task: str
    binary_label: str
    normalization: str
    equalize: bool
    class_weighting: bool
    augment: bool
    rotation_deg: float
    shift_x: float
    shift_y: float
    shear_deg: float
    zoom: float
    horizontal_flip: bool
    fill_mode: str
    mixed_precision: str
    start_timeout_s: int


@dataclass(frozen=True)
class ScoreConfig:
    split: str
    batch_size: int


@dataclass(frozen=True)
class FeaturesConfig:
    max_iter: int
    reg_param: float
    balance_classes: bool
    parallelism: int


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool
    uri: str
    experiment: str
    registered_model: str  # "{task}" is replaced by the training task


@dataclass(frozen=True)
class PipelineConfig:
    ingest: IngestConfig
    preprocess: PreprocessConfig
    train: TrainConfig
    score: ScoreConfig
    features: FeaturesConfig
    tracking: TrackingConfig


def load_config(path: str | Path | None = None) -> PipelineConfig:
    """Load ``conf/pipeline.toml`` (or ``path``); unknown or missing keys are errors that name them."""
    path = Path(path) if path else CONF_DIR / "pipeline.toml"
    with open(path, "rb") as handle:
        raw = tomllib.load(handle)
    sections = {}
    for field in dataclasses.fields(PipelineConfig):
        cls = field.type if isinstance(field.type, type) else globals()[field.type]
        values = raw.get(field.name, {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(values) - names, names - set(values)
        if unknown or missing:
            raise ValueError(f"{path} [{field.name}]: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        sections[field.name] = cls(**values)
    return PipelineConfig(**sections)


def override(section: Any, **flags: Any) -> Any:
    """Replace the fields of a config section whose flag was given (not None)."""
    return dataclasses.replace(section, **{k: v for k, v in flags.items() if v is not None})
