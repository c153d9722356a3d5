"""The on-disk contracts: each dataset's schema, file names and readers, in one place."""
