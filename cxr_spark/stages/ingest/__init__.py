"""ingest: an image dump and its metadata into the ``raw`` dataset (and ``images_<size>``), with a quarantine
(docs/ingest.md: the two passes, worker file I/O and why)."""
