"""report: metrics in Spark, Grad-CAM, the rendered report."""
