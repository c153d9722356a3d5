"""spark-submit entry point: `spark-submit spark_jobs/score.py --help` takes the arguments of `cxr-spark score`."""
import sys

from cxr_spark.cli import submit_main

if __name__ == "__main__":
    sys.exit(submit_main("score", sys.argv[1:]))
