"""cxr-spark: a Spark pipeline for chest X-rays (NIH ChestX-ray14)."""

__version__ = "0.1.0"
