"""spark-submit entry point: `spark-submit spark_jobs/ingest.py --help` takes the arguments of `cxr-spark ingest`."""
import sys

from cxr_spark.cli import submit_main

if __name__ == "__main__":
    sys.exit(submit_main("ingest", sys.argv[1:]))
