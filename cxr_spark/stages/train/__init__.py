"""train: Horovod-on-Spark training of the CNN and its input pipeline."""
