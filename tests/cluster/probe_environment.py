"""spark-submit probe: report, from the executors, which Python they run and what it can import."""
import json
import sys

from pyspark.sql import SparkSession


def describe(_):
    import horovod
    import tensorflow

    import cxr_spark

    yield {"prefix": sys.prefix, "executable": sys.executable, "cxr_spark": cxr_spark.__version__,
           "horovod": horovod.__version__, "tensorflow": tensorflow.__version__}


if __name__ == "__main__":
    spark = SparkSession.builder.appName("cxr-spark environment probe").getOrCreate()
    try:
        found = spark.sparkContext.parallelize(range(2), 2).mapPartitions(describe).collect()
        print("probe: " + json.dumps(found))
    finally:
        spark.stop()
