"""Storage, commits and locks, the Spark session and its Python worker daemon."""
