"""The report's building blocks, shared by :mod:`cxr_spark.stages.report.render` and
:mod:`cxr_spark.stages.report.clinical_sections`: a section, a table, a pointed-out cell, and how a cell reads."""
from __future__ import annotations

from dataclasses import dataclass, field

NOT_AVAILABLE = "n/a"


@dataclass
class Table:
    caption: str
    header: list[str]
    rows: list[list]


@dataclass(frozen=True)
class Cell:
    """A table cell to point out: the HTML gives it ``css_class``, the Markdown prints it in bold."""

    value: object
    css_class: str


@dataclass
class Section:
    """One part of the report; ``id`` is the HTML anchor the tests and readers rely on."""

    id: str
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (figure key, caption)
    figure_files: bool = False  # the figure keys are PNG files beside report.md (linked from it)


def fmt(value) -> str:
    """A cell: ``n/a`` for undefined, three decimals for rates, integers as they are."""
    if isinstance(value, Cell):
        return fmt(value.value)
    if value is None:
        return NOT_AVAILABLE
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
