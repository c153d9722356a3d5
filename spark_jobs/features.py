"""spark-submit entry point: `spark-submit spark_jobs/features.py --help` takes the arguments of `cxr-spark features`."""
import sys

from cxr_spark.cli import submit_main

if __name__ == "__main__":
    sys.exit(submit_main("features", sys.argv[1:]))
