"""batch-score: nightly scoring of new dumps into an append-only store."""
