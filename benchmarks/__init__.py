"""make bench: ingest + preprocess, training input and Horovod scaling, and scoring throughput, as ratios
measured side by side in one run (docs/benchmarks.md). Not part of the package: run from the project root."""
