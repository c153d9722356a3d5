"""spark-submit entry point: `spark-submit spark_jobs/batch_score.py --help` takes the arguments of `cxr-spark batch-score`.

Its exit code is the command's: 0 new images processed, 3 nothing new, 4 store locked,
5 drifted with --fail-on-drift (results committed), 1 failed.
"""
import sys

from cxr_spark.cli import submit_main

if __name__ == "__main__":
    sys.exit(submit_main("batch-score", sys.argv[1:]))
