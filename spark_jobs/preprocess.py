"""spark-submit entry point: `spark-submit spark_jobs/preprocess.py --help` takes the arguments of `cxr-spark preprocess`."""
import sys

from cxr_spark.cli import submit_main

if __name__ == "__main__":
    sys.exit(submit_main("preprocess", sys.argv[1:]))
