"""Pure functions: no Spark, no Petastorm, no TensorFlow at import."""
