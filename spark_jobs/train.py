"""spark-submit entry point: `spark-submit spark_jobs/train.py --help` takes the arguments of `cxr-spark train`."""
import sys

from cxr_spark.cli import submit_main

if __name__ == "__main__":
    sys.exit(submit_main("train", sys.argv[1:]))
