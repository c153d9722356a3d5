"""spark-submit entry point: `spark-submit spark_jobs/report.py --help` takes the arguments of `cxr-spark report`."""
import sys

from cxr_spark.cli import submit_main

if __name__ == "__main__":
    sys.exit(submit_main("report", sys.argv[1:]))
